"""The gradients of the rarely used scalar parameters — γ of position and channel attention, θ
(``shift``) of the Gaussian axial attention — in bfloat16 and float16, at sizes where the sum behind
them has thousands of terms.

Such a gradient is one sum over every output element (dγ = Σ ∂L/∂out ⊙ o, dθ = −Σ dS ⊙ (n−m)²).
Accumulated in 16 bits it drifts by percents (each addition rounds to 8 or 11 bits); accumulated in
float32 it is as good as the inputs' rounding allows. The conformance matrix runs every backend at
small odd sizes, where a 16-bit sum of a hundred terms still passes the tolerance rule; here the sum
is long enough for the rule (2× PyTorch's own error in the dtype, plus one ulp) to tell the two
apart. Every backend that runs on this machine is compared with the float64 reference on fresh
random inputs, with the reference backend in the same dtype as the yardstick.
"""
from __future__ import annotations

import pytest
import torch

import medattn_fast.functional as MF
from _tolerance import F64, assert_within_twice

# every backend in both 16-bit dtypes, but the Triton interpreter on a CPU runs bfloat16 only
CASES = [pytest.param(b, d, id=f"{b}-{str(d)[6:]}") for b in ("torch", "cpp", "triton")
         for d in (torch.bfloat16, torch.float16)
         if not (b == "triton" and d == torch.float16 and not torch.cuda.is_available())]


def _grads(fn, leaves, dtype, cotangent):
    """Output and gradients of ``fn`` on ``leaves`` rounded to ``dtype`` (fresh leaves each run)."""
    cast = [t.detach().to(dtype).requires_grad_(True) for t in leaves]
    out = fn(*cast)
    grads = torch.autograd.grad(out, cast, cotangent.to(dtype))
    return [out.detach(), *[g.detach() for g in grads]]


def _compare(fn_for, leaves, dtype, names, backend):
    cotangent = torch.randn(fn_for("reference")(*leaves).shape, dtype=F64)
    truth = _grads(fn_for("reference"), leaves, F64, cotangent)
    yardstick_run = _grads(fn_for("reference"), leaves, dtype, cotangent)
    yardstick = [(r.double() - t).abs().max().item() for r, t in zip(yardstick_run, truth)]
    fused = _grads(fn_for(backend), leaves, dtype, cotangent)
    assert_within_twice(fused, yardstick, truth, dtype, names, what=f"{backend} {dtype}")


@pytest.mark.parametrize("backend,dtype", CASES)
def test_channel_gamma_gradient_in_16_bit(backend, dtype):
    torch.manual_seed(11)
    x = torch.randn(2, 48, 20, 23, dtype=F64)          # dγ sums 2·48·460 = 44,160 terms
    gamma = torch.tensor([0.7], dtype=F64)

    def fn_for(b):
        return lambda x_, g_: MF.channel_attention(x_, negate=True, gamma=g_, residual=x_, backend=b)

    _compare(fn_for, [x, gamma], dtype, ["out", "dx", "dgamma"], backend)


@pytest.mark.parametrize("backend,dtype", CASES)
def test_position_gamma_gradient_in_16_bit(backend, dtype):
    torch.manual_seed(12)
    n, dk, dv = 301, 16, 40                              # dγ sums 2·40·301 = 24,080 terms
    q, k = torch.randn(2, dk, n, dtype=F64) * 0.5, torch.randn(2, dk, n, dtype=F64) * 0.5
    v, x = torch.randn(2, dv, n, dtype=F64), torch.randn(2, dv, n, dtype=F64)
    gamma = torch.tensor([1.3], dtype=F64)

    def fn_for(b):
        return lambda q_, k_, v_, x_, g_: MF.position_attention(q_, k_, v_, layout="channels", gamma=g_,
                                                                residual=x_, backend=b)

    _compare(fn_for, [q, k, v, x, gamma], dtype, ["out", "dq", "dk", "dv", "dx", "dgamma"], backend)


@pytest.mark.parametrize("backend,dtype", CASES)
def test_gaussian_shift_gradient_in_16_bit(backend, dtype):
    torch.manual_seed(13)
    q, k, v = (torch.randn(1, 13, 17, 8, dtype=F64) * 0.5 for _ in range(3))   # dθ sums 13·17·(13 + 17) terms
    shift = torch.tensor(0.05, dtype=F64)

    def fn_for(b):
        return lambda q_, k_, v_, s_: MF.gaussian_axial_attention(q_, k_, v_, s_, backend=b)

    _compare(fn_for, [q, k, v, shift], dtype, ["out", "dq", "dk", "dv", "dshift"], backend)
