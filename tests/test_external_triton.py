"""External attention, ``triton`` backend (triton_kernels/external.py): forward and every gradient
(x, the query projection, both memories and their biases, the output projection) against the
float64 reference, under the Triton interpreter on CPU (fp32, bf16) and on CUDA (``-m gpu``).

Tolerance: the fused path may be at most 2x as far from the float64 reference as the
``reference`` backend run in the same dtype (never another backend), plus one unit of
slack per dtype (relative to the largest reference value) for the different summation order.
Shapes stay tiny: the interpreter runs every program in Python.
"""
import pytest
import torch

import medattn_fast
import medattn_fast.triton_kernels.external as triton_external
from medattn_fast.ops._external_triton import external_triton_bwd, external_triton_fwd
from medattn_fast.ops.external import external_attention
from _tolerance import F64, assert_within_twice, default_device, dry_run, gpu_device, max_errors

NAMES = ["x", "query_weight", "query_bias", "key_memory", "key_bias", "value_memory", "value_bias", "proj_weight",
         "proj_bias"]


def _leaves(B, N, C, heads, d, S, Co, *, biases=True, device=None):
    """Fresh random x and parameters in float64, scaled like nn.Linear's init (unit-size scores)."""
    device = device or default_device()
    A = heads * d

    def r(*shape, scale=1.0):
        return torch.randn(*shape, dtype=F64, device=device) * scale

    def bias(n):
        return r(n) * 0.5 if biases else None

    return [r(B, N, C), r(A, C, scale=C ** -0.5), bias(A), r(S, d, scale=2 * d ** -0.5), bias(S),
            r(d, S, scale=S ** -0.5), bias(d), r(Co, A, scale=A ** -0.5), bias(Co)]


def _run(leaves, heads, backend, cotangent, dtype):
    ts = [t.detach().to(dtype).requires_grad_(True) if t is not None else None for t in leaves]
    out = external_attention(*ts, num_heads=heads, backend=backend)
    present = [t for t in ts if t is not None]
    return [out, *torch.autograd.grad(out, present, cotangent.to(out.dtype))]


def _compare(leaves, heads, dtype):
    with torch.no_grad():
        ref_out = external_attention(*leaves, num_heads=heads, backend="reference")
    cot = torch.randn(ref_out.shape, dtype=F64, device=ref_out.device)
    reference = _run(leaves, heads, "reference", cot, F64)
    # the yardstick is the reference in the same dtype (PyTorch's own error), never another backend
    base = max_errors(_run(leaves, heads, "reference", cot, dtype), reference)
    fused = _run(leaves, heads, "triton", cot, dtype)
    assert fused[0].dtype == dtype and fused[0].shape == reference[0].shape
    names = ["output"] + [n for n, t in zip(NAMES, leaves) if t is not None]
    assert_within_twice(fused, base, reference, dtype, names)
    if leaves[4] is not None:   # the key bias cancels in the token softmax: exactly zero here
        assert torch.count_nonzero(fused[NAMES.index("key_bias") + 1]) == 0


CASES = [  # (B, N, C, heads, d, S, Co, biases)
    (2, 49, 8, 4, 4, 16, 8, True),       # 7x7 tokens
    (1, 13, 5, 3, 1, 7, 6, True),        # primes, head dim 1, B = 1
    (3, 1, 4, 1, 8, 64, 4, True),        # one token (softmax over N of one term), MT-UNet's S = 64
    (2, 150, 6, 2, 24, 64, 5, False),    # N over two 64-token tiles, odd head dim, no biases
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_N{}_C{}_h{}_d{}_S{}_Co{}_bias{}".format(*c))
def test_triton_matches_reference_fp32(case):
    B, N, C, heads, d, S, Co, biases = case
    _compare(_leaves(B, N, C, heads, d, S, Co, biases=biases), heads, torch.float32)


@pytest.mark.parametrize("seed", [0, 1])
def test_triton_bf16_within_twice_torch_error(seed):
    torch.manual_seed(seed)
    _compare(_leaves(2, 70, 16, 4, 8, 64, 16), 4, torch.bfloat16)


HEAD_DIM_SPLITS = [  # (dtype, d, forced (D_CHUNK, D_PARTS) of both backward kernels, or None: the default)
    (torch.float32, 100, None),      # float32 at padded d = 128: chunks of 16, dM / dq over 2 programs
    (torch.float32, 128, None),
    (torch.float32, 50, None),       # float32 at padded d = 64: chunks of 32 in one program
    (torch.bfloat16, 100, (32, 2)),  # the chunked path forced in 16-bit (default: memories held)
    (torch.float32, 40, (16, 2)),    # d = 40 padded to 64: a partly masked chunk and part, an empty chunk
]


@pytest.mark.parametrize("case", HEAD_DIM_SPLITS, ids=lambda c: f"{str(c[0])[6:]}_d{c[1]}_split{c[2]}")
def test_backward_head_dim_chunks_and_parts(case, monkeypatch):
    """The backward kernels' chunked path (``_head_dim_split``: the q·M_kᵀ and dy·M_v products in
    head-dim chunks re-read per tile, dq / dM over a third grid axis), the float32 default at d =
    64 and 128 that compiles without register spills for sm_90: forward and every gradient against
    the float64 reference, N = 37 (a ragged 64-token tile), S = 64."""
    dtype, d, forced = case
    if forced is None:
        block_d = triton_external._pow2_at_least_16(d)
        expected = dict(D_CHUNK=16, D_PARTS=2) if block_d == 128 else dict(D_CHUNK=32, D_PARTS=1)
        assert triton_external._head_dim_split(block_d, dtype) == expected
    else:
        split = dict(D_CHUNK=forced[0], D_PARTS=forced[1])
        monkeypatch.setattr(triton_external, "_head_dim_split", lambda block_d, dt: split)
    torch.manual_seed(d)
    _compare(_leaves(1, 37, 24, 2, d, 64, 16), 2, dtype)


@pytest.mark.parametrize("config", [triton_external.ExternalConfig(block_n=16, tiles_per_chunk=1, num_warps=1),
                                    triton_external.ExternalConfig(block_n=16, tiles_per_chunk=2, num_warps=1)],
                         ids=["chunks_of_1_tile", "chunks_of_2_tiles"])
def test_launch_functions_across_chunkings(config):
    """The kernels directly, with several chunks per (b, head): the per-chunk column statistics and
    gradient partials are combined across programs (N = 83: a ragged last tile, and with 2 tiles a
    chunk an empty tile past N). q is a strided view (every other column of a wider buffer)."""
    B, N, heads, d, S = 2, 83, 3, 5, 20
    q = torch.randn(B, N, 2 * heads * d)[:, :, ::2]
    mk, mv, bv = torch.randn(S, d) * 0.6, torch.randn(d, S) * 0.3, torch.randn(d)
    y, lse = triton_external.external_forward(q, mk, mv, bv, num_heads=heads, config=config)
    leaves = [t.double().requires_grad_(True) for t in (q, mk, mv, bv)]
    qh = leaves[0].view(B, N, heads, d)
    scores = qh @ leaves[1].t()                                       # (B, N, heads, S)
    p = torch.softmax(scores, dim=1)
    y_ref = ((p / (1e-9 + p.sum(-1, keepdim=True))) @ leaves[2].t() + leaves[3]).reshape(B, N, heads * d)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    lse_ref = torch.logsumexp(scores, dim=1).reshape(B * heads, S) / torch.log(torch.tensor(2.0))
    torch.testing.assert_close(lse.double(), lse_ref.detach(), rtol=1e-5, atol=1e-5)
    cot = torch.randn(B, N, heads * d)
    grads = triton_external.external_backward(cot, q, mk, mv, lse, num_heads=heads, value_bias_grad=True,
                                              config=config)
    expected = torch.autograd.grad(y_ref, leaves, cot.double())
    for name, g, e in zip(("q", "key_memory", "value_memory", "value_bias"), grads, expected):
        torch.testing.assert_close(g.double(), e, rtol=2e-5, atol=2e-5, msg=lambda m: f"grad {name}: {m}")


def test_no_grad_forward_matches_and_saves_nothing():
    leaves = [t.float() for t in _leaves(2, 21, 6, 2, 4, 9, 6)]
    with torch.no_grad():
        out = external_attention(*leaves, num_heads=2, backend="triton")
        ref = external_attention(*leaves, num_heads=2, backend="reference")
        q = torch.nn.functional.linear(leaves[0], leaves[1], leaves[2])
        _y, lse = external_triton_fwd(q, leaves[3], leaves[4], leaves[5], leaves[6], 2, False, None)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert lse.numel() == 0


def test_triton_reasons_name_the_limits():
    op = medattn_fast.backend.op("external_attention")
    assert tuple(op.auto_cuda)[0] == "triton"

    def args(B=1, d=4, S=8, heads=2, dtype=torch.float32):
        x = torch.randn(B, 3, 4, dtype=dtype)
        return [x, torch.randn(heads * d, 4, dtype=dtype), None, torch.randn(S, d, dtype=dtype), None,
                torch.randn(d, S, dtype=dtype), None, torch.randn(4, heads * d, dtype=dtype), None]

    wide = args(d=130)
    assert any("head dim <= 128, got 130" in r for r in op.why_not("triton", *wide, num_heads=2))
    with pytest.raises(medattn_fast.BackendUnavailable, match="head dim <= 128, got 130"):
        external_attention(*wide, num_heads=2, backend="triton")
    many_slots = args(S=129)
    assert any("memory slots <= 128, got 129" in r for r in op.why_not("triton", *many_slots, num_heads=2))
    with pytest.raises(medattn_fast.BackendUnavailable, match="memory slots <= 128, got 129"):
        external_attention(*many_slots, num_heads=2, backend="triton")
    assert any("B·heads <= 65535, got 65536" in r for r in op.why_not("triton", *args(B=32768), num_heads=2))
    assert any("float32/bfloat16" in r for r in op.why_not("triton", *args(dtype=F64), num_heads=2))


def test_opcheck_forward_and_backward_ops():
    q = torch.randn(1, 5, 6, requires_grad=True)
    mk, kb = torch.randn(4, 3, requires_grad=True), torch.randn(4, requires_grad=True)
    mv, vb = torch.randn(3, 4, requires_grad=True), torch.randn(3, requires_grad=True)
    fwd_args = (q, mk, kb, mv, vb, 2, True, None)   # fp32_precision None: KernelConfig's default
    torch.library.opcheck(external_triton_fwd, fwd_args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    y, lse = external_triton_fwd(q.detach(), mk.detach(), kb.detach(), mv.detach(), vb.detach(), 2, True, None)
    torch.library.opcheck(external_triton_bwd, (torch.randn_like(y), q.detach(), mk.detach(), mv.detach(),
                                                          lse, 2, True, None),
                          test_utils=("test_schema", "test_faketensor"))


def test_compiles_fullgraph_without_recompiles():
    leaves = [t.float() for t in _leaves(1, 7, 4, 2, 3, 5, 4)]

    def fn(x):
        return external_attention(x, *leaves[1:], num_heads=2, backend="triton")

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    for _ in range(2):
        x = torch.randn(1, 7, 4)
        torch.testing.assert_close(compiled(x), fn(x))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


# ---------------------------------------------------------------------------------------------
# CUDA only
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_mtunet_shapes_within_twice_torch_error(dtype):
    """MEAttention at MT-UNet's levels (32 heads, S = 64): 28² tokens with C = 256 (d = 32), 7²
    with C = 1024 (d = 128), and a prime token count with an odd head dim (the dry run on the CPU:
    the last at a size the interpreter runs in seconds)."""
    cuda = gpu_device()
    if dry_run():
        _compare(_leaves(1, 37, 15, 3, 5, 16, 12, biases=False, device=cuda), 3, dtype)
        return
    _compare(_leaves(2, 784, 256, 32, 32, 64, 256, device=cuda), 32, dtype)
    _compare(_leaves(2, 49, 1024, 32, 128, 64, 1024, device=cuda), 32, dtype)
    _compare(_leaves(3, 1031, 40, 5, 24, 64, 40, biases=False, device=cuda), 5, dtype)


@pytest.mark.gpu
def test_gpu_backward_is_deterministic():
    leaves = _leaves(4, 3136, 256, 32, 32, 64, 256, device=gpu_device())
    cot = torch.randn(4, 3136, 256, dtype=F64, device=gpu_device())
    first, second = (_run(leaves, 32, "triton", cot, torch.bfloat16) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)
