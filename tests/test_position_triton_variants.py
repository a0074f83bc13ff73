"""The switchable variants of the Triton position-attention kernels (triton_kernels/position.py),
forward and every gradient against the float64 reference, under the interpreter (or on CUDA):

* ``KernelConfig(position_backward="fused")`` (``MEDATTN_POSITION_BWD=fused``; the kernel's
  ``variant="fused"``): dS computed once per tile, dq added with atomics — same bound as the default
  backward;
* ``KernelConfig(position_p16=True)`` (``MEDATTN_POSITION_P16=1``): 16-bit P and dS in the P·V / dS·K / dSᵀ·Q products (flash attention's
  choice) — its extra rounding of P (8 bits for bf16 instead of TF32's 11) is allowed up to 4x
  PyTorch's own error, and must still beat a kernel that dropped a term by far.

bench/gpu_check.sh times them beside the default on a GPU.
"""
import pytest
import torch

import medattn_fast
from medattn_fast.ops.position import position_attention
import medattn_fast.triton_kernels.position as triton_position
from _tolerance import EPS, F64, default_device, max_errors, worse


def _leaves(dtype, transpose, device):
    batch, nq, nk, dk, dv = 2, 37, 37 if transpose else 29, 4, 24
    q = torch.randn(batch, dk, nq, device=device, dtype=dtype, requires_grad=True)     # channel-first
    k = torch.randn(batch, dk, nk, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, dv, nq if transpose else nk, device=device, dtype=dtype, requires_grad=True)
    n_out = nk if transpose else nq
    gamma = torch.randn(1, device=device, dtype=dtype, requires_grad=True)
    x = torch.randn(batch, dv, n_out, device=device, dtype=dtype, requires_grad=True)
    f = torch.randn(batch, dv, n_out, device=device, dtype=dtype, requires_grad=True)
    return [q, k, v, gamma, x, f]


def _run(leaves, backend, transpose, cot, dtype=None):
    if dtype is not None:
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in leaves]
    q, k, v, gamma, x, f = leaves
    out = position_attention(q, k, v, scale=0.7, transpose=transpose, layout="channels", gamma=gamma,
                             residual=x, multiply=f, backend=backend)
    return [out, *torch.autograd.grad(out, leaves, cot.to(out.dtype))]


def _errors(dtype, transpose):
    leaves = _leaves(dtype, transpose, default_device())
    cot = torch.randn(leaves[4].shape, device=leaves[4].device, dtype=F64)
    reference = _run(leaves, "reference", transpose, cot, dtype=F64)
    yardstick = max_errors(_run(leaves, "torch", transpose, cot), reference)
    if dtype != torch.float32:
        yardstick = worse(yardstick, max_errors(_run(leaves, "reference", transpose, cot), reference))
    fused = max_errors(_run(leaves, "triton", transpose, cot), reference)
    slack = [EPS[dtype] * max(1.0, r.abs().max().item()) for r in reference]
    return fused, yardstick, slack


NAMES = ["output", "grad q", "grad k", "grad v", "grad gamma", "grad x", "grad f"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("transpose", [False, True], ids=["AV", "VA"])
def test_fused_backward_matches_reference(transpose, dtype):
    with medattn_fast.use_kernel_config(medattn_fast.KernelConfig(position_backward="fused")):
        fused, yardstick, slack = _errors(dtype, transpose)
    for name, err, base, eps in zip(NAMES, fused, yardstick, slack):
        assert err <= 2 * base + eps, f"fused backward {name}: {err:.3g} > 2 x {base:.3g} + {eps:.3g}"


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("transpose", [False, True], ids=["AV", "VA"])
def test_16bit_probabilities_within_four_times_pytorch_error(transpose, seed, monkeypatch):
    torch.manual_seed(seed)
    monkeypatch.setenv("MEDATTN_POSITION_P16", "1")   # the environment supplies the default
    fused, yardstick, slack = _errors(torch.bfloat16, transpose)
    for name, err, base, eps in zip(NAMES, fused, yardstick, slack):
        assert err <= 4 * base + eps, f"P16 {name}: {err:.3g} > 4 x {base:.3g} + {eps:.3g}"


def test_switches_reach_the_launch_and_bad_values_are_refused(monkeypatch):
    assert not triton_position._resolve(None, 64, 512, torch.bfloat16, p16=True).fp32_probabilities
    assert triton_position._resolve(None, 64, 512, torch.float32, p16=True).fp32_probabilities  # float32: no 16-bit P
    assert triton_position._resolve(None, 64, 512, torch.bfloat16, p16=False).fp32_probabilities
    explicit = triton_position.PositionConfig()
    assert triton_position._resolve(explicit, 64, 512, torch.bfloat16, p16=True) is explicit   # a config wins
    # the environment only supplies the defaults, read in one place (KernelConfig.from_environment)
    monkeypatch.setenv("MEDATTN_POSITION_P16", "1")
    monkeypatch.setenv("MEDATTN_POSITION_BWD", "fused")
    assert medattn_fast.kernel_config() == medattn_fast.KernelConfig(position_backward="fused", position_p16=True)
    with medattn_fast.use_kernel_config(medattn_fast.KernelConfig()):   # an explicit config wins over it
        assert medattn_fast.kernel_config() == medattn_fast.KernelConfig()
    monkeypatch.setenv("MEDATTN_POSITION_BWD", "atomic")
    with pytest.raises(ValueError,
                       match=r"MEDATTN_POSITION_BWD\) must be one of \('separate', 'fused'\), got 'atomic'"):
        medattn_fast.kernel_config()
    with pytest.raises(ValueError, match=r"position_backward must be one of \('separate', 'fused'\), got 'atomic'"):
        medattn_fast.KernelConfig(position_backward="atomic")
    with pytest.raises(ValueError, match=r"variant must be one of \('separate', 'fused'\), got 'atomic'"):
        triton_position._backward_variant("atomic")
    assert triton_position._backward_variant("fused") == "fused"


def test_the_kernel_config_reaches_the_launches(monkeypatch):
    """What the Triton backend passes to the kernels is the KernelConfig in force at the call (a
    context, the process-wide choice, or the environment's default), forward and backward alike."""
    seen = []
    forward, backward = triton_position.position_forward, triton_position.position_backward

    def spy_forward(*args, **kwargs):
        seen.append(("forward", kwargs["p16"], kwargs["fp32_precision"]))
        return forward(*args, **kwargs)

    def spy_backward(*args, **kwargs):
        seen.append(("backward", kwargs["variant"], kwargs["p16"], kwargs["fp32_precision"]))
        return backward(*args, **kwargs)

    monkeypatch.setattr(triton_position, "position_forward", spy_forward)
    monkeypatch.setattr(triton_position, "position_backward", spy_backward)
    monkeypatch.delenv("MEDATTN_POSITION_BWD", raising=False)
    q, k, v = (torch.randn(1, 9, 4, requires_grad=True) for _ in range(3))

    def step():
        seen.clear()
        position_attention(q, k, v, backend="triton").sum().backward()
        return list(seen)

    assert step() == [("forward", False, None), ("backward", "separate", False, None)]
    config = medattn_fast.KernelConfig(fp32_precision="ieee", position_backward="fused", position_p16=True)
    with medattn_fast.use_kernel_config(config):
        assert step() == [("forward", True, "ieee"), ("backward", "fused", True, "ieee")]
    medattn_fast.set_kernel_config(medattn_fast.KernelConfig(position_backward="fused"))
    try:
        assert step() == [("forward", False, None), ("backward", "fused", False, None)]
    finally:
        medattn_fast.set_kernel_config(None)
    monkeypatch.setenv("MEDATTN_POSITION_BWD", "fused")
    assert step()[1] == ("backward", "fused", False, None)
