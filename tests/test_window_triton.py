"""Window attention, ``triton`` backend (triton_kernels/window.py): forward and every gradient (x,
the three projection weights and biases, the output projection) against the float64 reference,
under the Triton interpreter on CPU (fp32, bf16) and on CUDA (``-m gpu``), for both pad modes, all
three output layouts, H != W, grids smaller than the pad, B = 1 and odd head dims.

Tolerance: the fused path may be at most 2x as far from the float64 reference as the
``reference`` backend run in the same dtype (never another backend), plus one unit of
slack per dtype (relative to the largest reference value) for the different summation order.
Shapes stay tiny: the interpreter runs every program in Python.
"""
import pytest
import torch

import medattn_fast
from medattn_fast.ops._window_triton import window_triton_bwd, window_triton_fwd
from medattn_fast.ops.window import window_attention
from _tolerance import F64, assert_within_twice, default_device, dry_run, gpu_device, max_errors

NAMES = ["x", "query_weight", "query_bias", "key_weight", "key_bias", "value_weight", "value_bias", "proj_weight",
         "proj_bias"]


def _leaves(B, H, W, C, heads, d, Co, *, biases="all", device=None):
    """Fresh random x and parameters in float64 (weights scaled so the softmaxes are not one-hot).
    ``biases``: "all", "none", or "no_key" (nn.WindowAttention's key projection has none)."""
    device = device or default_device()
    A = heads * d

    def r(*shape, scale=1.0):
        return torch.randn(*shape, dtype=F64, device=device) * scale

    w = C ** -0.5
    q_b, k_b, v_b, p_b = (r(A) * 0.5, r(A) * 0.5, r(A) * 0.5, r(Co) * 0.5)
    if biases == "none":
        q_b = k_b = v_b = p_b = None
    elif biases == "no_key":
        k_b = None
    return [r(B, H, W, C), r(A, C, scale=w * 1.5), q_b, r(A, C, scale=w * 1.5), k_b, r(A, C, scale=w),
            v_b, r(Co, A, scale=A ** -0.5), p_b]


def _run(leaves, kw, backend, cotangent, dtype):
    """Output and the gradient of every (present) leaf, on copies cast to ``dtype``."""
    ts = [t.detach().to(dtype).requires_grad_(True) if t is not None else None for t in leaves]
    out = window_attention(*ts, backend=backend, **kw)
    present = [t for t in ts if t is not None]
    grads = torch.autograd.grad(out, present, cotangent.to(out.dtype))
    return [out, *grads]


def _compare(leaves, dtype, **kw):
    """triton vs the float64 reference, bounded by torch's (and, 16-bit, the reference's) own error."""
    with torch.no_grad():
        ref_out = window_attention(*leaves, backend="reference", **kw)
    cot = torch.randn(ref_out.shape, dtype=F64, device=ref_out.device)
    reference = _run(leaves, kw, "reference", cot, F64)
    # the yardstick is the reference in the same dtype (PyTorch's own error), never another backend
    base = max_errors(_run(leaves, kw, "reference", cot, dtype), reference)
    fused = _run(leaves, kw, "triton", cot, dtype)
    assert fused[0].dtype == dtype and fused[0].shape == reference[0].shape
    names = ["output"] + [n for n, t in zip(NAMES, leaves) if t is not None]
    assert_within_twice(fused, base, reference, dtype, names)


@pytest.mark.parametrize("layout", ["grid", "padded", "windows"])
@pytest.mark.parametrize("pad_mode", ["mtunet", "mask"])
def test_triton_matches_reference_fp32_layouts(pad_mode, layout):
    """H != W, both padded (5x7 -> 8x8 with 4x4 windows: strips and a 3x1 corner), Co != C."""
    leaves = _leaves(2, 5, 7, 6, 2, 3, 5)
    _compare(leaves, torch.float32, window_size=4, num_heads=2, pad_mode=pad_mode, layout=layout)


ODD_CASES = [  # (B, H, W, C, heads, d, Co, ws, pad_mode, layout, biases)
    (1, 1, 2, 4, 2, 2, 4, 4, "mtunet", "padded", "all"),     # grid smaller than the pad: clamped corner
    (1, 3, 6, 5, 1, 7, 3, 8, "mtunet", "windows", "all"),    # ws = 8 (L = 64), pad 5 > H: clamps fold
    (1, 3, 6, 5, 1, 7, 3, 8, "mask", "grid", "all"),
    (1, 8, 4, 7, 3, 5, 6, 4, "mtunet", "grid", "no_key"),    # no padding, odd head dim, no key bias
    (2, 5, 4, 3, 5, 1, 4, 3, "mtunet", "grid", "none"),      # ws = 3 (L = 9), head dim 1, no biases
    (1, 7, 7, 6, 3, 2, 6, 4, "mask", "windows", "no_key"),   # MT-UNet's 7x7 bottleneck grid
]


@pytest.mark.parametrize("case", ODD_CASES, ids=lambda c: "B{}_{}x{}_C{}_h{}_d{}_Co{}_ws{}_{}_{}_{}".format(*c))
def test_triton_matches_reference_fp32_odd_shapes(case):
    B, H, W, C, heads, d, Co, ws, pad_mode, layout, biases = case
    leaves = _leaves(B, H, W, C, heads, d, Co, biases=biases)
    _compare(leaves, torch.float32, window_size=ws, num_heads=heads, pad_mode=pad_mode, layout=layout)


HEAD_DIM_CHUNK_CASES = [  # (dtype, H, W, d, ws, pad_mode, layout)
    (torch.float32, 9, 7, 100, 8, "mtunet", "windows"),   # 16-feature chunks fwd and bwd, corner + strips
    (torch.bfloat16, 9, 7, 100, 8, "mask", "grid"),       # 32-feature chunks in the backward only
    (torch.float32, 5, 6, 128, 6, "mtunet", "padded"),    # ws = 6 (L = 36 in a 64-token tile), d = 128
]


@pytest.mark.parametrize("case", HEAD_DIM_CHUNK_CASES, ids=lambda c: "{}_{}x{}_d{}_ws{}_{}_{}".format(
    str(c[0])[6:], *c[1:]))
def test_head_dim_chunks_at_64_token_windows(case):
    """The kernels' chunked path (``_head_dim_chunk``: scores and dO vᵀ summed over head-dim
    chunks, o/dq/dk/dv stored chunk by chunk), selected at 64-token tiles with padded d = 128,
    where whole-d tiles spilled registers for sm_90: forward and every gradient vs float64."""
    from medattn_fast.triton_kernels import window as triton_window

    dtype, H, W, d, ws, pad_mode, layout = case
    assert triton_window._head_dim_chunk(64, 128, dtype, backward=True)[0] < 128
    torch.manual_seed(d + ws)
    leaves = _leaves(1, H, W, 8, 1, d, 8)
    _compare(leaves, dtype, window_size=ws, num_heads=1, pad_mode=pad_mode, layout=layout)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("pad_mode", ["mtunet", "mask"])
def test_triton_bf16_within_twice_torch_error(pad_mode, seed):
    torch.manual_seed(seed)
    leaves = _leaves(2, 6, 7, 16, 2, 8, 16)
    _compare(leaves, torch.bfloat16, window_size=4, num_heads=2, pad_mode=pad_mode, layout="windows")


def test_backward_is_deterministic_and_no_grad_forward_matches():
    """The corner fold and the bias partials are plain ordered sums: two backward runs agree bitwise."""
    leaves = _leaves(2, 6, 5, 8, 2, 4, 8)
    kw = dict(window_size=4, num_heads=2, pad_mode="mtunet", layout="padded")
    cot = torch.randn(2, 8, 8, 8, dtype=F64)
    first, second = (_run(leaves, kw, "triton", cot, torch.float32) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    with torch.no_grad():
        out = window_attention(*[t.float() if t is not None else None for t in leaves], backend="triton", **kw)
    assert torch.equal(out, first[0])


def test_triton_reasons_name_the_limits():
    op = medattn_fast.backend.op("window_attention")
    assert tuple(op.auto_cuda)[0] == "triton"
    kw = dict(window_size=4, num_heads=1, pad_mode="mtunet", layout="grid")
    x = torch.randn(1, 4, 4, 8)
    wide = [x, torch.randn(129, 8), None, torch.randn(129, 8), None, torch.randn(129, 8), None,
            torch.randn(8, 129), None]
    assert any("head dim <= 128, got 129" in r for r in op.why_not("triton", *wide, **kw))
    with pytest.raises(medattn_fast.BackendUnavailable, match="head dim <= 128, got 129"):
        window_attention(*wide, backend="triton", **kw)
    narrow = [x, torch.randn(8, 8), None, torch.randn(8, 8), None, torch.randn(8, 8), None, torch.randn(8, 8), None]
    big_window = dict(kw, window_size=9)
    assert any("window_size <= 8, got 9" in r for r in op.why_not("triton", *narrow, **big_window))
    with pytest.raises(medattn_fast.BackendUnavailable, match="window_size <= 8, got 9"):
        window_attention(*narrow, backend="triton", **big_window)
    huge_batch = [torch.randn(65536, 1, 1, 8)] + narrow[1:]
    assert any("batch <= 65535, got 65536" in r for r in op.why_not("triton", *huge_batch, **kw))
    double = [t.double() if t is not None else None for t in narrow]
    assert any("float32/bfloat16" in r for r in op.why_not("triton", *double, **kw))


def test_opcheck_forward_and_backward_ops():
    """Tiniest shape with every kind of token: 1x3 grid, 2x2 windows -> strips and a corner."""
    qkv = torch.randn(1, 1, 3, 12, requires_grad=True)
    bias = torch.randn(12, requires_grad=True)
    for pad_mode, layout in (("mtunet", "windows"), ("mask", "grid")):
        args = (qkv, bias, 2, 2, pad_mode, layout, None)   # fp32_precision None: KernelConfig's default
        torch.library.opcheck(window_triton_fwd, args,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
        o = window_triton_fwd(qkv.detach(), bias.detach(), 2, 2, pad_mode, layout, None)
        torch.library.opcheck(window_triton_bwd,
                              (torch.randn_like(o), qkv.detach(), bias.detach(), 2, 2, pad_mode, layout, None),
                              test_utils=("test_schema", "test_faketensor"))


def test_compiles_fullgraph_without_recompiles():
    leaves = [t.float() if t is not None else None for t in _leaves(1, 3, 5, 4, 2, 2, 4)]

    def fn(x):
        return window_attention(x, *leaves[1:], window_size=2, num_heads=2, layout="windows", backend="triton")

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    for _ in range(2):
        x = torch.randn(1, 3, 5, 4)
        torch.testing.assert_close(compiled(x), fn(x))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


# ---------------------------------------------------------------------------------------------
# CUDA only
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pad_mode", ["mtunet", "mask"])
def test_gpu_mtunet_shapes_within_twice_torch_error(pad_mode, dtype):
    """MT-UNet levels at 224²: 28² C=256 (d=32, no padding) and 7² C=1024 (d=128, padded to 8²),
    8 heads, 4x4 windows; plus an H != W grid with ws = 8 (the dry run on the CPU: one padded H != W
    grid at a size the interpreter runs in seconds)."""
    cuda = gpu_device()
    if dry_run():
        _compare(_leaves(1, 7, 9, 16, 2, 8, 12, device=cuda), dtype, window_size=4, num_heads=2,
                 pad_mode=pad_mode, layout="padded")
        return
    _compare(_leaves(2, 28, 28, 256, 8, 32, 256, device=cuda), dtype, window_size=4, num_heads=8,
             pad_mode=pad_mode, layout="windows")
    _compare(_leaves(2, 7, 7, 1024, 8, 128, 1024, device=cuda), dtype, window_size=4, num_heads=8,
             pad_mode=pad_mode, layout="padded")
    _compare(_leaves(3, 13, 21, 96, 3, 32, 64, biases="no_key", device=cuda), dtype, window_size=8, num_heads=3,
             pad_mode=pad_mode, layout="grid")


@pytest.mark.gpu
def test_gpu_backward_is_deterministic():
    leaves = _leaves(4, 14, 14, 512, 8, 64, 512, device=gpu_device())
    kw = dict(window_size=4, num_heads=8, pad_mode="mtunet", layout="windows")
    cot = torch.randn(4, 4, 4, 16, 512, dtype=F64, device=gpu_device())
    first, second = (_run(leaves, kw, "triton", cot, torch.bfloat16) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)
