"""Position attention, ``triton`` backend (triton_kernels/position.py): forward and every gradient
against the float64 reference, under the Triton interpreter on CPU (fp32, bf16) and on CUDA
(``-m gpu``). Tolerances are tied to PyTorch's own error in the same dtype: the fused
kernels may be at most 2× as far from the float64 reference as the ``reference`` backend (the
originals' arithmetic) run in that dtype — never another backend, whose bug would widen the bound —
plus a small epsilon for the different (online-softmax, blocked) summation order. The bfloat16
rounding itself is bounded tightly in tests/test_path_switches.py (one rounding, not two).

Shapes stay tiny: the interpreter runs every program in Python.
"""

import pytest
import torch

import medattn_fast
from medattn_fast.ops._position_triton import position_triton_bwd, position_triton_fwd
from medattn_fast.ops.position import position_attention
import medattn_fast.triton_kernels.position as triton_position
from _tolerance import (F64, assert_within_twice, default_device, dry_run, gpu_device, max_errors,
                        require_cuda_device)


def _make(batch, n, d, channels_first, dtype, device):
    """A fresh random (B, n, d) token-major tensor; channel-first storage read through a transposed
    view (the conv-output case) with every other element of a wider buffer (no dense strides)."""
    if channels_first:
        wide = torch.randn(batch, d, 2 * n, device=device, dtype=dtype)
        return wide[:, :, ::2].detach().requires_grad_(True)        # (B, d, n), caller layout
    return torch.randn(batch, n, d, device=device, dtype=dtype, requires_grad=True)


def _case(batch, nq, nk, dk, dv, *, transpose, layout, epilogue, dtype, device=None):
    """Leaves and keyword arguments of one call; the epilogue is DANet's γ·o + x or the guided attention's o ⊙ f."""
    device = device or default_device()
    cf = layout == "channels"
    n_out = nk if transpose else nq
    q = _make(batch, nq, dk, cf, dtype, device)
    k = _make(batch, nk, dk, cf, dtype, device)
    v = _make(batch, nq if transpose else nk, dv, cf, dtype, device)
    leaves, kw = [q, k, v], dict(scale=0.7, transpose=transpose, layout=layout)
    out_shape = (batch, dv, n_out) if cf else (batch, n_out, dv)
    if epilogue in ("gamma_residual", "all"):
        kw["gamma"] = torch.randn(1, device=device, dtype=dtype, requires_grad=True)
        kw["residual"] = torch.randn(out_shape, device=device, dtype=dtype, requires_grad=True)
        leaves += [kw["gamma"], kw["residual"]]
    if epilogue in ("multiply", "all"):
        kw["multiply"] = torch.randn(out_shape, device=device, dtype=dtype, requires_grad=True)
        leaves.append(kw["multiply"])
    return leaves, kw


def _run(leaves, kw, backend, cotangent, dtype=None):
    """Output and the gradients of every leaf, optionally on copies cast to ``dtype``."""
    if dtype is not None:
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in leaves]
    names = ["q", "k", "v"] + [n for n in ("gamma", "residual", "multiply") if n in kw]
    call_kw = dict(kw, **{n: t for n, t in zip(names[3:], leaves[3:])})
    out = position_attention(*leaves[:3], backend=backend, **call_kw)
    grads = torch.autograd.grad(out, leaves, cotangent.to(out.dtype))
    return [out, *grads]


def _compare(leaves, kw, dtype):
    """triton vs torch vs float64 reference, output and every gradient."""
    ref_out = position_attention(*[t.detach().double() for t in leaves[:3]], backend="reference",
                                 **{n: (t.detach().double() if isinstance(t, torch.Tensor) else t)
                                    for n, t in kw.items()})
    cot = torch.randn(ref_out.shape, device=ref_out.device, dtype=F64)
    reference = _run(leaves, kw, "reference", cot, dtype=F64)
    # the yardstick is the reference in the same dtype (PyTorch's own error), never another backend
    yardstick = max_errors(_run(leaves, kw, "reference", cot), reference)
    fused = _run(leaves, kw, "triton", cot)
    assert fused[0].dtype == dtype and fused[0].shape == reference[0].shape
    for g, leaf in zip(fused[1:], leaves):
        assert g.shape == leaf.shape
    names = ["output"] + [f"grad {i}" for i in range(len(leaves))]
    assert_within_twice(fused, yardstick, reference, dtype, names, "triton vs float64 reference")


SHAPES = [  # (B, Nq, Nk, dk, dv)
    (1, 1, 1, 1, 1),        # N = 1, dk = 1
    (2, 37, 37, 1, 12),     # prime N, C/8 = 1, dv not a power of two
    (1, 67, 29, 8, 24),     # Nq != Nk, B = 1, primes
    (2, 19, 41, 3, 5),      # Nk > Nq, odd everything
]


@pytest.mark.parametrize("transpose", [False, True], ids=["AV", "VA"])
@pytest.mark.parametrize("layout", ["tokens", "channels"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_Nq{}_Nk{}_dk{}_dv{}".format(*s))
def test_triton_matches_reference_fp32(shape, layout, transpose):
    batch, nq, nk, dk, dv = shape
    if transpose and layout == "channels" and nq != nk:
        nk = nq   # keep one self-attention seed-001 case per shape in the channel-first layout
    leaves, kw = _case(batch, nq, nk, dk, dv, transpose=transpose, layout=layout,
                       epilogue="all" if shape[1] % 2 else "none", dtype=torch.float32)
    _compare(leaves, kw, torch.float32)


@pytest.mark.parametrize("epilogue", ["gamma_residual", "multiply"])
@pytest.mark.parametrize("transpose", [False, True], ids=["AV", "VA"])
def test_triton_epilogues_fp32(epilogue, transpose):
    """DANet's γ·o + x and the guided attention's o ⊙ f alone, with the gradients of γ, x and f."""
    leaves, kw = _case(2, 23, 23, 2, 12, transpose=transpose, layout="channels", epilogue=epilogue,
                       dtype=torch.float32)
    _compare(leaves, kw, torch.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("layout", ["tokens", "channels"])
@pytest.mark.parametrize("transpose", [False, True], ids=["AV", "VA"])
def test_triton_bf16_within_twice_torch_error(transpose, layout, seed):
    torch.manual_seed(seed)
    leaves, kw = _case(2, 37, 29 if not transpose else 37, 4, 24, transpose=transpose, layout=layout,
                       epilogue="all", dtype=torch.bfloat16)
    _compare(leaves, kw, torch.bfloat16)


@pytest.mark.parametrize("dk, dtype", [(200, torch.float32), (200, torch.bfloat16), (100, torch.float32),
                                       (100, torch.bfloat16)])
@pytest.mark.parametrize("transpose", [False, True], ids=["AV", "VA"])
def test_wide_dk_default_tiles_within_twice_torch_error(dk, dtype, transpose):
    """dk in (64, 128] and (128, 256] take their own default tiles (``default_config``: at 256 16×16,
    8 warps, one stage in float32 so the kernels fit the H100's shared memory, 64×32 with 32-wide
    chunks and 16-row dq programs for 16-bit inputs; at 128 32×16 with 16-wide chunks in float32,
    64-wide chunks and 32-row dq programs for 16-bit inputs; no spills): forward and every
    gradient at dk = 200 / 100 (padded to 256 / 128, a ragged dk block), odd N and a dv that
    splits across programs, against the float64 reference."""
    wide = triton_position.default_config(dk, 1024, dtype).block_dv
    dv = wide + wide // 2 + 3                       # 51, 99 or 195: one whole dv block and a ragged one
    cfg = triton_position.default_config(dk, dv, dtype)
    assert cfg != triton_position.default_config(64, dv, dtype)                   # not the dk = 64 tiles
    assert dv > cfg.block_dv and dv % cfg.block_dv                                # a ragged dv split
    torch.manual_seed(3)
    leaves, kw = _case(1, 37 if not transpose else 23, 23, dk, dv, transpose=transpose, layout="channels",
                       epilogue="all", dtype=dtype)
    _compare(leaves, kw, dtype)


CONFIGS = [
    triton_position.PositionConfig(block_m=16, block_n=16, block_dv=16, num_warps=1, num_stages=1),  # dv split
    triton_position.PositionConfig(block_m=32, block_n=16, block_dv=32, num_warps=2, num_stages=1),  # one dv block
]


@pytest.mark.parametrize("config", CONFIGS, ids=["m16n16dv16", "m32n16dv32"])
@pytest.mark.parametrize("transpose", [False, True], ids=["AV", "VA"])
def test_launch_functions_across_tile_configs(config, transpose):
    """The kernels directly (no autograd), forward and backward, for two tile shapes: blocks that
    split dv across programs and leave ragged edges in every dimension, and one whole-dv block."""
    batch, nq, nk, dk, dv = 2, 37, 23, 3, 24
    n_out = nk if transpose else nq
    q, k = torch.randn(batch, nq, dk), torch.randn(batch, nk, dk)
    v_store = torch.randn(batch, dv, nq if transpose else nk)      # channel-first, read through strides
    v = v_store.transpose(1, 2)
    gamma, residual, multiply = torch.randn(1), torch.randn(batch, n_out, dv), torch.randn(batch, n_out, dv)
    out, o, lse = triton_position.position_forward(q, k, v, scale=0.5, transpose=transpose, gamma=gamma,
                                                   residual=residual, multiply=multiply, channels_first=True,
                                                   config=config)
    assert out.stride(1) == 1 and out.shape == (batch, n_out, dv)   # written channel-first
    leaves = [t.double().requires_grad_(True) for t in (q, k, v, gamma, multiply)]
    scores = torch.softmax(0.5 * leaves[0] @ leaves[1].transpose(1, 2), dim=-1)
    o_ref = (scores.transpose(1, 2) if transpose else scores) @ leaves[2]
    out_ref = leaves[3] * (o_ref * leaves[4]) + residual.double()
    torch.testing.assert_close(out.double(), out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-5, atol=1e-5)
    lse_ref = torch.logsumexp(0.5 * leaves[0] @ leaves[1].transpose(1, 2), dim=-1) / torch.log(torch.tensor(2.0))
    torch.testing.assert_close(lse.double(), lse_ref.detach(), rtol=1e-5, atol=1e-5)
    cot = torch.randn(batch, n_out, dv)
    grads = triton_position.position_backward(cot, q, k, v, o, lse, scale=0.5, transpose=transpose,
                                              gamma=gamma, multiply=multiply, config=config)
    expected = torch.autograd.grad(out_ref, leaves, cot.double())
    for name, g, e in zip(("q", "k", "v", "gamma", "multiply"), grads, expected):
        torch.testing.assert_close(g.double(), e, rtol=2e-5, atol=2e-5, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("dv", [64, 40], ids=["even", "masked"])
def test_row_statistics_block_and_even_only_dp_chunk(dv):
    """``block_n_lse`` (the row statistics' own key block) and ``block_dv_chunk_even`` (the unmasked
    dq/dk kernels' wider dP chunk, float32 dk = 256's defaults): at sizes that are whole blocks the
    dq/dk launches take the EVEN kernels with the 32-wide chunk, the masked ones with the
    16-wide chunk at dv = 40; both orientations match the float64 reference, forward and every gradient."""
    cfg = triton_position.PositionConfig(block_m=16, block_n=16, block_dv=32, num_warps=2, num_stages=1,
                                         block_dv_chunk=16, block_dv_chunk_even=32, block_n_lse=32)
    pairs = ((32, 16), (32, 16), (16, 16))
    assert triton_position._dp_chunk(cfg, *pairs, d_v=dv) == ((32, True) if dv == 64 else (16, False))
    torch.manual_seed(5)
    for transpose in (False, True):
        q, k, v = torch.randn(1, 32, 16), torch.randn(1, 32, 16), torch.randn(1, 32, dv)
        out, o, lse = triton_position.position_forward(q, k, v, scale=0.3, transpose=transpose, config=cfg)
        leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
        scores = torch.softmax(0.3 * leaves[0] @ leaves[1].transpose(1, 2), dim=-1)
        out_ref = (scores.transpose(1, 2) if transpose else scores) @ leaves[2]
        torch.testing.assert_close(out.double(), out_ref, rtol=1e-5, atol=1e-5)
        cot = torch.randn(1, 32, dv)
        grads = triton_position.position_backward(cot, q, k, v, out, lse, scale=0.3, transpose=transpose,
                                                  config=cfg)[:3]
        for name, g, e in zip("qkv", grads, torch.autograd.grad(out_ref, leaves, cot.double())):
            torch.testing.assert_close(g.double(), e, rtol=2e-5, atol=2e-5, msg=lambda m: f"grad {name}: {m}")


def test_no_grad_forward_matches_and_skips_saved_state():
    q, k, v = torch.randn(1, 29, 2), torch.randn(1, 31, 2), torch.randn(1, 31, 12)
    gamma, residual = torch.randn(1), torch.randn(1, 29, 12)
    out, o, lse = triton_position.position_forward(q, k, v, scale=1.0, transpose=False, gamma=gamma,
                                                   residual=residual, save_for_backward=False)
    assert o is None and lse is None
    with torch.no_grad():
        ref = position_attention(q, k, v, gamma=gamma, residual=residual, backend="reference")
        api = position_attention(q, k, v, gamma=gamma, residual=residual, backend="triton")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(api, ref, rtol=1e-5, atol=1e-5)


def test_triton_reasons_name_the_limits():
    op = medattn_fast.backend.op("position_attention")
    kw = dict(scale=1.0, transpose=False, gamma=None, residual=None, multiply=None, chunk_size=None,
              channels_first=False)
    wide = torch.randn(1, 3, 300)
    assert any("dk <= 256, got 300" in r for r in op.why_not("triton", wide, wide, torch.randn(1, 3, 4), **kw))
    small = torch.randn(1, 3, 4, dtype=F64)
    assert any("float32/bfloat16" in r for r in op.why_not("triton", small, small, small, **kw))
    with pytest.raises(medattn_fast.BackendUnavailable, match="dk <= 256, got 300"):
        position_attention(wide, wide, torch.randn(1, 3, 4), backend="triton")


def test_opcheck_forward_and_backward_ops():
    q, k, v = (torch.randn(1, 17, 3, requires_grad=True), torch.randn(1, 19, 3, requires_grad=True),
               torch.randn(1, 19, 5, requires_grad=True))
    gamma = torch.randn(1, requires_grad=True)
    residual = torch.randn(1, 17, 5, requires_grad=True)
    variants = (None, True, "separate", 0, None)   # fp32_precision, p16, backward, dv_split, hoist: the defaults
    fwd_args = (q, k, v, gamma, residual, None, 0.5, False, False, True, *variants)
    torch.library.opcheck(position_triton_fwd, fwd_args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    out, o, lse = position_triton_fwd(*(a.detach() if isinstance(a, torch.Tensor) else a
                                                  for a in fwd_args))
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), o, lse, gamma.detach(), None,
                0.5, False, False, *variants)
    torch.library.opcheck(position_triton_bwd, bwd_args, test_utils=("test_schema", "test_faketensor"))


def test_compiles_fullgraph_without_recompiles():
    q, k, v = torch.randn(2, 3, 21), torch.randn(2, 3, 21), torch.randn(2, 8, 21)
    gamma = torch.randn(1)

    def fn(q, k, v, x):
        return position_attention(q, k, v, layout="channels", gamma=gamma, residual=x, backend="triton")

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    for _ in range(2):
        x = torch.randn(2, 8, 21)
        torch.testing.assert_close(compiled(q, k, v, x), fn(q, k, v, x))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


# ---------------------------------------------------------------------------------------------
# CUDA only
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transpose", [False, True], ids=["AV", "VA"])
def test_gpu_danet_shapes_within_twice_torch_error(dtype, transpose):
    """DANet PAM at 32×32 (C=512: dk=64, dv=512) and a prime-N strided case, all gradients (the
    dry run on the CPU: the second case at a size the interpreter runs in seconds)."""
    if not dry_run():
        leaves, kw = _case(2, 1024, 1024, 64, 512, transpose=transpose, layout="channels", epilogue="all",
                           dtype=dtype, device=gpu_device())
        _compare(leaves, kw, dtype)
    batch, nq, nk = (1, 67, 61) if dry_run() else (3, 1031, 997)
    leaves, kw = _case(batch, nq, nq if transpose else nk, 1, 24, transpose=transpose, layout="channels",
                       epilogue="gamma_residual", dtype=dtype, device=gpu_device())
    _compare(leaves, kw, dtype)


@pytest.mark.gpu
def test_gpu_memory_is_linear_in_tokens():
    """fwd+bwd at 128×128 tokens (N = 16384, C = 512) stays far below one N×N float32 matrix."""
    dev = gpu_device()
    require_cuda_device("CUDA memory statistics")
    leaves, kw = _case(1, 16384, 16384, 64, 512, transpose=False, layout="channels", epilogue="gamma_residual",
                       dtype=torch.bfloat16, device=dev)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = position_attention(*leaves[:3], backend="triton", **dict(kw, gamma=leaves[3], residual=leaves[4]))
    torch.autograd.grad(out, leaves, torch.randn_like(out))
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 16384 * 16384 * 4 // 8, f"peak extra memory {extra / 2**20:.0f} MiB"


