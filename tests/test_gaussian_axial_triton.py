"""Gaussian axial attention, ``triton`` backend (triton_kernels/gaussian_axial.py): forward and every gradient
(q, k, v or atten_x, atten_y, v; shift; bias, exactly zero) against the float64 reference loop, under
the Triton interpreter on CPU (fp32, bf16) and on CUDA (``-m gpu``, also fp16 and MT-UNet's shapes).

Tolerances are tied to PyTorch's own error in the same dtype: the fused kernels may be
at most 2× as far from the float64 reference as the ``reference`` backend (the original's loop)
run in that dtype — never another backend, whose bug would widen the bound — plus one unit of
slack for the different summation order. All backends see the same inputs rounded to the dtype, and so does the float64
reference (see ``_compare``).

Shapes stay tiny: the interpreter runs every program in Python.
"""
from __future__ import annotations

import pytest
import torch

import medattn_fast
import medattn_fast.functional as MF
import medattn_fast.triton_kernels.gaussian_axial as triton_axial
from medattn_fast.ops._gaussian_axial_triton import (
    gaussian_axial_triton_qkv_bwd,
    gaussian_axial_triton_qkv_fwd,
    gaussian_axial_triton_scores_bwd,
    gaussian_axial_triton_scores_fwd,
)
from _tolerance import F64, assert_within_twice, default_device, dry_run, gpu_device, max_errors, require_cuda_device


# (B, H, W, D): H ≠ W both ways, primes, B = 1, D = 1, odd D, D over one 64-wide chunk, a 1-pixel line.
SHAPES = [(2, 5, 7, 3), (1, 7, 3, 1), (1, 3, 3, 13), (1, 1, 4, 6), (1, 6, 2, 70)]


def _leaves(entry, batch, height, width, d, device=None):
    """float64 masters: the three tensor inputs of ``entry``, shift θ > 0 and GaussianTrans's bias."""
    device = device or default_device()
    if entry == "qkv":
        # q scaled so the scores have unit variance, as in a trained block (no 1/√D in the op).
        tensors = [torch.randn(batch, height, width, d, dtype=F64, device=device) / d ** 0.5,
                   torch.randn(batch, height, width, d, dtype=F64, device=device),
                   torch.randn(batch, height, width, d, dtype=F64, device=device)]
    else:
        tensors = [torch.randn(batch, height, width, width, dtype=F64, device=device),
                   torch.randn(batch, width, height, height, dtype=F64, device=device),
                   torch.randn(batch, height, width, d, dtype=F64, device=device)]
    shift = torch.rand(1, dtype=F64, device=device) + 0.05
    bias = -torch.rand(1, dtype=F64, device=device)
    return tensors + [shift, bias]


def _run(entry, leaves, backend, cotangent, dtype):
    """Output and the gradients of every leaf (bias last), on copies cast to ``dtype``."""
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in leaves]
    fn = MF.gaussian_axial_attention if entry == "qkv" else MF.gaussian_axial_from_scores
    out = fn(*leaves[:4], bias=leaves[4], backend=backend)
    grads = torch.autograd.grad(out, leaves, cotangent.to(out.dtype))
    return [out, *grads]


def _compare(entry, leaves, dtype):
    """triton vs torch (and the reference loop in ``dtype``) vs the float64 reference loop.

    Every backend gets the same inputs, rounded to ``dtype``, and the float64 reference is taken on
    those rounded values: the errors then measure each backend's arithmetic, not the rounding of
    its inputs (which moves scalar reductions such as dθ by several ulps, luckily for one backend
    and unluckily for another, depending on the seed).
    """
    leaves = [t.to(dtype).to(F64) for t in leaves]
    cot = torch.randn(leaves[2].shape, dtype=F64, device=leaves[2].device).to(dtype).to(F64)
    reference = _run(entry, leaves, "reference", cot, F64)
    # the yardstick is the reference in the same dtype (PyTorch's own error), never another backend
    yardstick = max_errors(_run(entry, leaves, "reference", cot, dtype), reference)
    fused = _run(entry, leaves, "triton", cot, dtype)
    assert fused[0].dtype == dtype and fused[0].shape == reference[0].shape
    for grad, leaf in zip(fused[1:], leaves):
        assert grad.shape == leaf.shape and grad.dtype == dtype
    # the bias cancels in both softmaxes: its gradient is exactly zero, not rounding noise
    assert torch.equal(fused[5], torch.zeros_like(fused[5]))
    names = ["out", *(("q", "k") if entry == "qkv" else ("atten_x", "atten_y")), "v", "shift"]
    assert_within_twice(fused[:5], yardstick, reference[:5], dtype, names, f"{entry} {tuple(leaves[2].shape)} {dtype}")


# ---------------------------------------------------------------------------------------------
# interpreter (CPU) or CUDA: the public functions, forward and every gradient
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", ["qkv", "scores"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_H{}_W{}_D{}".format(*s))
def test_triton_matches_reference_fp32(shape, entry):
    _compare(entry, _leaves(entry, *shape), torch.float32)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("entry", ["qkv", "scores"])
def test_triton_bf16_within_twice_torch_error(entry, seed):
    torch.manual_seed(seed)
    _compare(entry, _leaves(entry, 2, 5, 6, 24), torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# the launch functions directly: D split across programs, strided inputs, saved statistics
# ---------------------------------------------------------------------------------------------
def _closed_form(atten_x, atten_y, v, shift):
    """The op's math, written independently of every implementation."""
    _, height, width, _ = v.shape
    jw = torch.arange(width, dtype=v.dtype, device=v.device)
    ih = torch.arange(height, dtype=v.dtype, device=v.device)
    logits_x = atten_x - shift * (jw[None, :] - jw[:, None]) ** 2      # [b, r, c, j]
    logits_y = atten_y - shift * (ih[None, :] - ih[:, None]) ** 2      # [b, c, r, i]
    out = torch.einsum("brcj,brjd->brcd", torch.softmax(logits_x, -1), v) + \
        torch.einsum("bcri,bicd->brcd", torch.softmax(logits_y, -1), v)
    return out, torch.logsumexp(logits_x, -1), torch.logsumexp(logits_y, -1).transpose(1, 2)


CONFIGS = [
    triton_axial.AxialConfig(block_d=16, d_per_program=32, num_warps=1, num_stages=1),   # D over 2 programs
    triton_axial.AxialConfig(block_d=16, d_per_program=None, num_warps=2, num_stages=1),  # 3 chunks, 1 program
]


@pytest.mark.parametrize("config", CONFIGS, ids=["split_d", "one_program"])
def test_launch_functions_strided_inputs_and_d_split(config):
    """q, k, v as permuted views of (B, D, W, H) storage; D = 37 in 16-wide chunks, ragged everywhere."""
    batch, height, width, d = 2, 3, 5, 37

    def strided(*shape):
        return torch.randn(shape[0], shape[3], shape[2], shape[1]).permute(0, 3, 2, 1)   # (B, H, W, D) view

    q, k, v = strided(batch, height, width, d) / d ** 0.5, strided(batch, height, width, d), \
        strided(batch, height, width, d)
    shift = torch.tensor(0.4)
    out, lse_rows, lse_cols = triton_axial.axial_forward(v, shift, q=q, k=k, config=config)
    leaves = [t.double().requires_grad_(True) for t in (q, k, v, shift)]
    atten_x = torch.einsum("brcd,brjd->brcj", leaves[0], leaves[1])
    atten_y = torch.einsum("brcd,bicd->bcri", leaves[0], leaves[1])
    ref, ref_lse_rows, ref_lse_cols = _closed_form(atten_x, atten_y, leaves[2], leaves[3])
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_rows.double(), ref_lse_rows.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_cols.double(), ref_lse_cols.detach(), rtol=1e-5, atol=1e-5)
    cot = strided(batch, height, width, d)
    grads = triton_axial.axial_backward(cot, v, shift, q=q, k=k, lse_rows=lse_rows, lse_cols=lse_cols,
                                        config=config)
    expected = torch.autograd.grad(ref, leaves, cot.double())
    for name, g, e in zip(("q", "k", "v", "shift"), grads, expected):
        torch.testing.assert_close(g.double(), e, rtol=2e-5, atol=2e-5, msg=lambda m: f"grad {name}: {m}")

    # the scores entry, with the scores given as transposed views
    ax_view = torch.randn(batch, height, width, width).transpose(2, 3)
    ay_view = torch.randn(batch, width, height, height).transpose(2, 3)
    out, no_lse_rows, no_lse_cols = triton_axial.axial_forward(v, shift, atten_x=ax_view, atten_y=ay_view,
                                                               config=config)
    assert no_lse_rows is None and no_lse_cols is None
    leaves = [t.double().requires_grad_(True) for t in (ax_view, ay_view, v, shift)]
    ref = _closed_form(*leaves)[0]
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    grads = triton_axial.axial_backward(cot, v, shift, atten_x=ax_view, atten_y=ay_view, config=config)
    expected = torch.autograd.grad(ref, leaves, cot.double())
    for name, g, e in zip(("atten_x", "atten_y", "v", "shift"), grads, expected):
        torch.testing.assert_close(g.double(), e, rtol=2e-5, atol=2e-5, msg=lambda m: f"grad {name}: {m}")


def test_launch_functions_reject_bad_configs_and_arguments():
    v = torch.randn(1, 2, 3, 20)
    with pytest.raises(ValueError, match="d_per_program \\(24\\) must be a multiple of block_d \\(16\\)"):
        triton_axial.axial_forward(v, torch.tensor(0.1), q=v, k=v,
                                   config=triton_axial.AxialConfig(block_d=16, d_per_program=24))
    with pytest.raises(ValueError, match="either q and k or atten_x and atten_y"):
        triton_axial.axial_forward(v, torch.tensor(0.1))
    long = torch.randn(1, 1, 129, 1)
    with pytest.raises(ValueError, match="must be <= 128 pixels, got H=1, W=129"):
        triton_axial.axial_forward(long, torch.tensor(0.1), q=long, k=long)


def test_default_config_splits_d_only_for_small_grids():
    # MT-UNet's bottleneck at B = 12: 24 lines per pass, D = 1024 -> D spread over more programs
    small = triton_axial.default_config(12, 2, 2, 1024, torch.bfloat16)
    assert small.d_per_program is not None and small.d_per_program % small.block_d == 0
    assert triton_axial.default_config(64, 28, 28, 256, torch.bfloat16).d_per_program is None


# ---------------------------------------------------------------------------------------------
# dispatch: reasons, custom ops, torch.compile
# ---------------------------------------------------------------------------------------------
def test_triton_reasons_name_the_limits():
    qkv_op = medattn_fast.backend.op("gaussian_axial")
    scores_op = medattn_fast.backend.op("gaussian_axial_from_scores")
    shift = torch.tensor(0.5)
    long = torch.randn(1, 2, 129, 3)
    message = "H and W <= 128, got 129"
    assert any(message in r for r in qkv_op.why_not("triton", long, long, long, shift, bias=None))
    ax, ay = torch.randn(1, 2, 129, 129), torch.randn(1, 129, 2, 2)
    assert any(message in r for r in scores_op.why_not("triton", ax, ay, long, shift, bias=None))
    with pytest.raises(medattn_fast.BackendUnavailable, match=message):
        MF.gaussian_axial_attention(long, long, long, shift, backend="triton")
    with pytest.raises(medattn_fast.BackendUnavailable, match=message):
        MF.gaussian_axial_from_scores(ax, ay, long, shift, backend="triton")
    if not torch.cuda.is_available():
        wide = torch.randn(1, 2, 3, 4, dtype=F64)
        assert any("float32/bfloat16" in r for r in qkv_op.why_not("triton", wide, wide, wide, shift))


def test_opcheck_custom_ops():
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    q, k, v = (torch.randn(1, 2, 3, 2, requires_grad=True) for _ in range(3))
    shift = torch.tensor([0.3], requires_grad=True)
    precision = None   # the contract's fp32_precision (KernelConfig's default)
    torch.library.opcheck(gaussian_axial_triton_qkv_fwd, (q, k, v, shift, precision), test_utils=checks)
    out, lse_rows, lse_cols = gaussian_axial_triton_qkv_fwd(q.detach(), k.detach(), v.detach(), shift.detach(),
                                                            precision)
    torch.library.opcheck(gaussian_axial_triton_qkv_bwd,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), shift.detach(), lse_rows,
                           lse_cols, precision), test_utils=("test_schema", "test_faketensor"))
    ax = torch.randn(1, 2, 3, 3, requires_grad=True)
    ay = torch.randn(1, 3, 2, 2, requires_grad=True)
    torch.library.opcheck(gaussian_axial_triton_scores_fwd, (ax, ay, v, shift, precision), test_utils=checks)
    torch.library.opcheck(gaussian_axial_triton_scores_bwd,
                          (torch.randn_like(out), ax.detach(), ay.detach(), v.detach(), shift.detach(), precision),
                          test_utils=("test_schema", "test_faketensor"))


def test_compiles_fullgraph_without_recompiles():
    shift = torch.tensor([0.3], requires_grad=True)
    bias = torch.tensor([-0.1], requires_grad=True)

    def fn(q, k, v):
        return MF.gaussian_axial_attention(q, k, v, shift, bias=bias, backend="triton")

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    for _ in range(2):
        q, k, v = (torch.randn(1, 3, 4, 5, requires_grad=True) for _ in range(3))
        out = compiled(q, k, v)
        torch.testing.assert_close(out, fn(q, k, v))
        out.sum().backward()
        assert q.grad is not None and torch.equal(bias.grad, torch.zeros_like(bias))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


# ---------------------------------------------------------------------------------------------
# CUDA only
# ---------------------------------------------------------------------------------------------
# GaussianTrans inside MT-UNet at 224² and B = 12: the encoder's 28² tokens (C = 256) become a 7×7
# grid, 14² (C = 512) a 4×4 grid, the bottleneck's 7² (C = 1024) a 2×2 grid; the last decoder stage
# a 7×7 grid with C = 512. Plus larger grids (the bench's 14×14, 28×28) and an odd H ≠ W grid.
GPU_SHAPES = [(12, 7, 7, 256), (12, 4, 4, 512), (12, 2, 2, 1024), (12, 7, 7, 512), (2, 14, 14, 512),
              (2, 28, 28, 256), (3, 13, 29, 97)]
if dry_run():   # the CPU dry run of the GPU check: one odd shape the interpreter runs in seconds
    GPU_SHAPES = [(1, 5, 7, 12)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("entry", ["qkv", "scores"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "B{}_H{}_W{}_D{}".format(*s))
def test_gpu_mtunet_shapes_within_twice_torch_error(shape, entry, dtype):
    _compare(entry, _leaves(entry, *shape, device=gpu_device()), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("entry", ["qkv", "scores"])
def test_gpu_backward_is_deterministic(entry):
    """No atomics anywhere: two backward passes agree bit for bit (shift's gradient included)."""
    leaves = _leaves(entry, 12, 7, 7, 512, device=gpu_device())
    cot = torch.randn(leaves[2].shape, dtype=F64, device=gpu_device())
    first = _run(entry, leaves, "triton", cot, torch.bfloat16)
    second = _run(entry, leaves, "triton", cot, torch.bfloat16)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_auto_prefers_triton_and_falls_through_for_long_lines():
    require_cuda_device("auto's order on CUDA tensors (on the CPU auto prefers the cpp backend)")
    op = medattn_fast.backend.op("gaussian_axial")
    shift = torch.tensor(0.2, device=gpu_device())
    q = torch.randn(12, 7, 7, 256, device=gpu_device())
    assert op.choose(q, q, q, shift, bias=None) == "triton"
    long = torch.randn(1, 1, 130, 2, device=gpu_device())
    assert op.choose(long, long, long, shift, bias=None) != "triton"
    torch.testing.assert_close(MF.gaussian_axial_attention(long, long, long, shift),
                               MF.gaussian_axial_attention(long, long, long, shift, backend="torch"))
