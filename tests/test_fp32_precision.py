"""float32 inputs on the tensor cores without losing float32 accuracy (triton_kernels/_util.py).

The kernels multiply float32 tiles as three TF32 products of an explicit hi/lo split ("tf32x3", the
default), exact IEEE FMAs on request ("ieee"), or one TF32 product when PyTorch's own setting allows
TF32 ("tf32"). The split is written out (round to TF32, subtract, round again), so the interpreter
computes the same products as the GPU and these CPU tests measure the real arithmetic: float32
accuracy against the float64 reference for "tf32x3" and "ieee", three orders of magnitude better
than a single TF32 product. The ``-m gpu`` tests fail if float32 silently runs as plain TF32.
"""
import pytest
import torch
import triton
import triton.language as tl

import medattn_fast
from medattn_fast.ops.channel import channel_attention
from medattn_fast.ops.position import position_attention
from medattn_fast.triton_kernels import _util
from _tolerance import F64, assert_within_twice, default_device, gpu_device, max_errors


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 rounded to TF32 (10 mantissa bits, to nearest, ties away), as the kernels do."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & -0x2000).view(torch.float32)


@pytest.fixture
def no_tf32():
    """PyTorch's float32 matmuls at "highest" (no TF32), the setting restored after the test."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(saved)


def test_precision_default_override_and_pytorch_setting(monkeypatch, no_tf32):
    monkeypatch.delenv("MEDATTN_FP32_PRECISION", raising=False)
    assert _util.fp32_precision() == "tf32x3"                   # PyTorch's default "highest"
    assert _util.dot_precision(torch.float32) == "tf32x3"
    assert _util.dot_precision(torch.bfloat16) == "tf32"
    assert _util.fp32_precision(split_default=False) == "ieee"  # kernels whose tiles spill with the split
    torch.set_float32_matmul_precision("high")                  # TF32 allowed: one TF32 product
    assert _util.fp32_precision() == "tf32"
    torch.set_float32_matmul_precision("medium")
    assert _util.fp32_precision() == "tf32" and _util.fp32_precision(split_default=False) == "tf32"
    torch.set_float32_matmul_precision("highest")
    assert _util.fp32_precision() == "tf32x3"
    for value in ("ieee", "tf32x3", "tf32"):
        assert _util.fp32_precision(forced=value) == value      # an explicit choice wins over PyTorch
        assert _util.fp32_precision(split_default=False, forced=value) == value
    with pytest.raises(ValueError, match="fp32_precision must be one of .* got 'fp64'"):
        _util.fp32_precision(forced="fp64")
    # the explicit choice is KernelConfig's; the variable only supplies its default
    assert medattn_fast.kernel_config().fp32_precision is None
    for value in ("ieee", "tf32x3", "tf32", " IEEE "):
        monkeypatch.setenv("MEDATTN_FP32_PRECISION", value)
        assert medattn_fast.kernel_config().fp32_precision == value.strip().lower()
        with medattn_fast.use_kernel_config(medattn_fast.KernelConfig(fp32_precision="tf32x3")):
            assert medattn_fast.kernel_config().fp32_precision == "tf32x3"
    monkeypatch.setenv("MEDATTN_FP32_PRECISION", "fp64")
    with pytest.raises(ValueError, match="MEDATTN_FP32_PRECISION must be one of .* got 'fp64'"):
        medattn_fast.kernel_config()


@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
                   PRECISION: tl.constexpr):
    rows, cols, ks = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + rows[:, None] * K + ks[None, :])
    b = tl.load(b_ptr + ks[:, None] * N + cols[None, :])
    tl.store(c_ptr + rows[:, None] * N + cols[None, :], _util.mma(a, b, PRECISION))


def _matmul(a, b, precision):
    c = torch.empty(a.shape[0], b.shape[1], device=a.device, dtype=torch.float32)
    _matmul_kernel[(1,)](a, b, c, a.shape[0], b.shape[1], a.shape[1], precision)
    return c


@pytest.mark.parametrize("k", [16, 128])
def test_tf32x3_split_is_float32_accurate(k):
    """One tile product (K = 16 and 128) vs float64: "tf32x3" and "ieee" within 2x PyTorch's float32
    matmul error; a single TF32 product (operands rounded to TF32) >= 300x worse than "tf32x3"."""
    dev = default_device()
    a, b = torch.randn(32, k, device=dev), torch.randn(k, 32, device=dev)
    exact = a.double() @ b.double()
    scale = exact.abs().max().item()
    err = {p: (_matmul(a, b, p).double() - exact).abs().max().item() / scale for p in ("tf32x3", "ieee")}
    torch_fp32 = ((a.cpu() @ b.cpu()).double() - exact.cpu()).abs().max().item() / scale
    single_tf32 = ((round_tf32(a).double() @ round_tf32(b).double()) - exact).abs().max().item() / scale
    assert err["ieee"] <= 2 * torch_fp32 + 1e-7, (err, torch_fp32)
    assert err["tf32x3"] <= 2 * torch_fp32 + 1e-7, (err, torch_fp32)
    assert single_tf32 >= 300 * err["tf32x3"], (single_tf32, err)


def _position_leaves(batch, n, dk, dv, device):
    q = torch.randn(batch, dk, n, device=device, requires_grad=True)
    k = torch.randn(batch, dk, n, device=device, requires_grad=True)
    v = torch.randn(batch, dv, n, device=device, requires_grad=True)
    gamma = torch.randn(1, device=device, requires_grad=True)
    x = torch.randn(batch, dv, n, device=device, requires_grad=True)
    return [q, k, v, gamma, x]


def _position(leaves, backend):
    q, k, v, gamma, x = leaves
    return position_attention(q, k, v, layout="channels", scale=0.125, gamma=gamma, residual=x, backend=backend)


def _channel_leaves(batch, c, n, device):
    return [0.1 * torch.randn(batch, c, n, device=device).requires_grad_(True),
            torch.randn(1, device=device, requires_grad=True)]


def _channel(leaves, backend):
    x, gamma = leaves
    return channel_attention(x, gamma=gamma, residual=x, backend=backend)


def _outputs(op, leaves, backend, cot, dtype=None):
    if dtype is not None:
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in leaves]
    out = op(leaves, backend)
    return [out, *torch.autograd.grad(out, leaves, cot.to(out.dtype))]


# op: (function, leaves(device, real_size), names of the results that go through a matmul)
OPS = {"position": (_position, lambda dev, big: _position_leaves(2, 1024, 64, 512, dev) if big
                    else _position_leaves(1, 40, 16, 24, dev),
                    ["output", "grad q", "grad k", "grad v", "grad gamma"]),   # grad x = ∂L/∂out: a copy
       "channel": (_channel, lambda dev, big: _channel_leaves(2, 512, 1024, dev) if big
                   else _channel_leaves(1, 24, 40, dev),
                   ["output", "grad x", "grad gamma"])}


@pytest.mark.parametrize("precision", ["tf32x3", "ieee"])
@pytest.mark.parametrize("op", sorted(OPS))
def test_fused_fp32_within_twice_torch_error(op, precision, monkeypatch, no_tf32):
    """The whole op (forward and every gradient) in float32 vs float64, with each precision."""
    monkeypatch.setenv("MEDATTN_FP32_PRECISION", precision)
    fn, make, _ = OPS[op]
    leaves = make(default_device(), False)
    cot = torch.randn_like(fn(leaves, "torch").double())
    reference = _outputs(fn, leaves, "torch", cot, dtype=F64)
    yardstick = max_errors(_outputs(fn, leaves, "torch", cot), reference)
    fused = _outputs(fn, leaves, "triton", cot)
    assert_within_twice(fused, yardstick, reference, torch.float32,
                        ["output"] + [f"grad {i}" for i in range(len(leaves))], f"{op} {precision}")


def _tf32_errors(fn, leaves, cot, reference):
    """The errors of PyTorch's own float32 op with TF32 allowed: on CUDA its matmuls with
    TF32 allowed; in the CPU dry run (no TF32 there) the same op on TF32-rounded inputs."""
    if leaves[0].device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        try:
            return max_errors(_outputs(fn, leaves, "torch", cot), reference)
        finally:
            torch.set_float32_matmul_precision("highest")
    rounded = [round_tf32(t.detach()).requires_grad_(True) for t in leaves]
    return max_errors(_outputs(fn, rounded, "torch", cot), reference)


def _against_single_tf32(op, dev):
    """(name, float32 error, single-TF32 error) of each result that goes through a matmul."""
    fn, make, names = OPS[op]
    leaves = make(dev, dev.type == "cuda")
    cot = torch.randn_like(fn(leaves, "torch").double())
    reference = _outputs(fn, leaves, "torch", cot, dtype=F64)
    tf32 = _tf32_errors(fn, leaves, cot, reference)
    fused = max_errors(_outputs(fn, leaves, "triton", cot), reference)
    return list(zip(names, fused, tf32))


@pytest.mark.gpu
@pytest.mark.parametrize("op", sorted(OPS))
def test_gpu_fp32_is_not_plain_tf32(op, monkeypatch, no_tf32):
    """At DANet's sizes (C = 512, 32² tokens; the dry run on the CPU: toy sizes), the default
    float32 path's error vs float64 — output and every gradient that goes through a matmul — is
    under a quarter of what one TF32 product per matmul gives (PyTorch's own op with TF32
    allowed): fails if the kernels' float32 dots silently drop to plain TF32."""
    monkeypatch.delenv("MEDATTN_FP32_PRECISION", raising=False)
    for name, err, bound in _against_single_tf32(op, gpu_device()):
        assert err < 0.25 * bound, f"{op} {name}: float32 error {err:.3g} >= 1/4 of single TF32's {bound:.3g}"


@pytest.mark.parametrize("op", sorted(OPS))
def test_plain_tf32_would_fail_the_gpu_check(op, monkeypatch, no_tf32):
    """The check above has teeth: with the kernels forced to one TF32 product (emulated under the
    interpreter as on the tensor cores) the float32 errors reach single TF32's."""
    monkeypatch.setenv("MEDATTN_FP32_PRECISION", "tf32")
    results = _against_single_tf32(op, default_device())
    assert any(err >= 0.25 * bound for _, err, bound in results), results
