r"""Channel attention: C×C attention between the channels of a feature map.

    E = X Xᵀ                      (B, C, C), contraction over the N = prod(S) positions
    A = softmax(−E)               negate=True  (DANet CAM: softmax(rowmax(E) − E), identical)
    A = softmax(E)                negate=False (ChannelAttentionModule of Multi-Scale Guided Attention)
    o = A X,   out = γ · (o ⊙ f) + x   (``gamma``, ``multiply`` = f, ``residual`` = x; all optional)

DANet writes the softmax argument as ``rowmax(E) − E``; softmax is shift invariant per row, so this
is exactly ``softmax(−E)``, which the stable softmax (it subtracts the row max of −E itself)
computes without forming ``rowmax(E) − E``. The original forms E in the input dtype: in float16,
|E| exceeds 65504 for large maps (C=512 at 128²) and ``inf − inf`` gives NaN. Here E, the softmax
and A X are accumulated in float32 for float16/bfloat16 inputs (float64 stays float64), so the
result is finite, and cast back to the input dtype at the end.

Backends: ``reference`` (the original's arithmetic, input dtype, ``rowmax(E) − E`` formed
explicitly), ``torch`` (the float32-accumulating composite; its autograd graph keeps the float32 X
and the C×C matrices, O(C·N + C²); with ``KernelConfig(channel_gemm="16bit")`` its 16-bit inputs
take the cuBLAS path instead, ``_Gemm16``: 16-bit GEMMs with float32 output, a candidate for a GPU
timing). Fused backends register on ``_op`` with the same keywords.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend as B
from ..kernel_config import kernel_config
from . import _validate as V
from ._custom_op import accumulation_dtype
from ._epilogue import epilogue
from ._families import dispatcher

__all__ = ["channel_attention"]

_OP = "channel_attention"
_op = dispatcher(_OP)   # its row in ops/_families.py: auto orders, export backend, limits


def _check(x, negate, gamma, residual, multiply):
    V.tensor(_OP, "x", x, (3, 4, 5))
    V.choice(_OP, "negate", negate, (True, False))
    for name, t in (("residual", residual), ("multiply", multiply)):
        if t is not None:
            V.tensor(_OP, name, t)
            V.shape(_OP, name, t, tuple(x.shape), "x.shape")
            V.same_device_dtype(_OP, x=x, **{name: t})
    if gamma is not None:
        V.scalar_param(_OP, "gamma", gamma, dtype_like=x)


@_op.register("reference")
def _reference(x, *, negate, gamma, residual, multiply):
    feats = x.reshape(x.shape[0], x.shape[1], -1)
    energy = torch.bmm(feats, feats.transpose(1, 2))                     # input dtype, like the original
    if negate:
        energy = energy.amax(dim=-1, keepdim=True).expand_as(energy) - energy
    attention = torch.softmax(energy, dim=-1)
    o = torch.bmm(attention, feats).reshape(x.shape)
    return epilogue(o, gamma, residual, multiply)


def _gemm_float32_out(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` batched, 16-bit operands, float32 result: one cuBLAS 16-bit GEMM with float32
    output on CUDA (``torch.bmm(..., out_dtype=torch.float32)``); on a CPU, which has no such kernel,
    the same product in float32 (the operands' 16-bit values are exact in float32, and both
    accumulate in float32: the same roundings, another summation order)."""
    if a.is_cuda:
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())


class _Gemm16(torch.autograd.Function):
    """Channel attention with 16-bit GEMMs (the cuBLAS path, ``KernelConfig(channel_gemm="16bit")``)
    on x (B, C, N) in float16/bfloat16:

        E = X Xᵀ (16-bit GEMM, float32 out)      A = softmax(rowmax(E) − E) (negate, DANet) or softmax(E)
        o = A₁₆ X (A rounded to x's dtype)      out = γ · (o ⊙ f) + residual, in float32, rounded once

    Backward, g = γ ∂L/∂out ⊙ f:  dA = g₁₆ Xᵀ,  dE = ±A ⊙ (dA − rowsum(dA ⊙ A)),
    dX = A₁₆ᵀ g₁₆ + (dE + dEᵀ)₁₆ X (+ ∂L/∂out when the residual is x), each a 16-bit GEMM with float32
    output; dγ = Σ ∂L/∂out ⊙ f ⊙ o and df = γ ∂L/∂out ⊙ o in float32. E, A, dA and dE are
    float32 (B, C, C): no float16 overflow of E (DANet's NaN), the max subtracted before exp. The
    16-bit operands are x, A (≤ 1), g and dE + dEᵀ; the last two can pass float16's 65504 only
    where dX itself, a float16 result, does (|dX| ≥ |dE + dEᵀ| · |X| summed over the channels).
    Activations saved: x and the (B, C, C) A in float32 and x's dtype, o when there is an epilogue."""

    @staticmethod
    def forward(ctx, x, gamma, residual, multiply, negate, residual_is_x):
        dtype = x.dtype
        energy = _gemm_float32_out(x, x.transpose(1, 2))
        if negate:   # DANet's energy_new = rowmax(E) − E, then the softmax (its own max subtracted)
            energy = energy.amax(dim=-1, keepdim=True) - energy
        attention = torch.softmax(energy, dim=-1)
        attention16 = attention.to(dtype)
        o = _gemm_float32_out(attention16, x)
        scaled = o if multiply is None else o * multiply
        if residual_is_x:
            residual = x
        if gamma is not None and residual is not None:
            out = torch.addcmul(residual.float(), gamma.float(), scaled)       # γ·o + x in one pass
        else:
            out = scaled if gamma is None else gamma.float() * scaled
            out = out if residual is None else out + residual
        ctx.save_for_backward(x, attention, attention16, o if (gamma is not None or multiply is not None) else None,
                              gamma, multiply)
        ctx.negate, ctx.residual_is_x, ctx.has_residual = negate, residual_is_x, residual is not None
        return out.to(dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, attention, attention16, o, gamma, multiply = ctx.saved_tensors
        dtype = x.dtype
        g = grad_out.float()
        d_gamma = d_mul = None
        if multiply is not None:
            if ctx.needs_input_grad[3]:
                d_mul = (g * o if gamma is None else g * o * gamma.float()).to(multiply.dtype)
            g = g * multiply
        if gamma is not None:
            if ctx.needs_input_grad[1]:
                d_gamma = (g * o).sum().reshape(gamma.shape).to(gamma.dtype)
            g = g * gamma.float()
        g16 = g.to(dtype)
        d_attention = _gemm_float32_out(g16, x.transpose(1, 2))                       # dA = g Xᵀ
        d_energy = attention * (d_attention - (d_attention * attention).sum(dim=-1, keepdim=True))
        if ctx.negate:
            d_energy = d_energy.neg()
        symmetric = (d_energy + d_energy.transpose(1, 2)).to(dtype)
        dx = _gemm_float32_out(attention16.transpose(1, 2), g16) + _gemm_float32_out(symmetric, x)
        if ctx.residual_is_x:
            dx = dx + grad_out
        d_residual = grad_out if ctx.has_residual and not ctx.residual_is_x else None
        return dx.to(dtype), d_gamma, d_residual, d_mul, None, None


def _torch_gemm16(x, *, negate, gamma, residual, multiply):
    flat = (lambda t: t if t is None else t.reshape(t.shape[0], t.shape[1], -1))
    residual_is_x = residual is x
    out = _Gemm16.apply(flat(x), gamma, None if residual_is_x else flat(residual), flat(multiply), bool(negate),
                        residual_is_x)
    return out.reshape(x.shape)


@_op.register("torch")
def _torch(x, *, negate, gamma, residual, multiply):
    if x.dtype in (torch.float16, torch.bfloat16) and kernel_config().channel_gemm == "16bit":
        return _torch_gemm16(x, negate=negate, gamma=gamma, residual=residual, multiply=multiply)
    dtype = accumulation_dtype(x.dtype)
    feats = x.reshape(x.shape[0], x.shape[1], -1).to(dtype)             # (B, C, N), a view when it can be
    energy = torch.bmm(feats, feats.transpose(1, 2))                     # (B, C, C) accumulated in fp32
    attention = torch.softmax(energy.neg() if negate else energy, dim=-1)
    o = torch.bmm(attention, feats).reshape(x.shape)
    # The epilogue also runs in the compute dtype: γ·o + x is then rounded once.
    cast = (lambda t: t if t is None else t.to(dtype))
    return epilogue(o, gamma, cast(residual), cast(multiply)).to(x.dtype)


@B.autocast_entry()
def channel_attention(x: Tensor, *, negate: bool = True, gamma: Optional[Tensor] = None,
                      residual: Optional[Tensor] = None, multiply: Optional[Tensor] = None,
                      backend: Optional[str] = None) -> Tensor:
    r"""C×C channel attention: ``out = γ · (softmax(∓X Xᵀ) X ⊙ multiply) + residual``.

    ``E = X Xᵀ`` (B, C, C), contracted over the N = prod(S) positions; ``A = softmax(−E)``
    (``negate=True``: DANet's channel attention module, CAM, Fu et al., CVPR 2019, which writes
    ``softmax(rowmax(E) − E)``, the same by shift invariance) or ``A = softmax(E)``
    (``negate=False``: the channel attention of Multi-Scale Guided Attention, Sinha & Dolz 2020);
    ``o = A X``. E, the softmax and A X accumulate in float32 for float16/bfloat16 inputs, so
    large maps do not overflow where the original's float16 E does.

    Args:
        x: (B, C, *S) with S one to three spatial dims (any strides); N = prod(S).
        negate: True for DANet's ``softmax(rowmax(E) − E) = softmax(−E)``, False for ``softmax(E)``.
        gamma: 0-dim or (1,) tensor (DANet's learnable scale), or None.
        residual, multiply: tensors shaped like x, or None.
        backend: force a backend for this call (``"reference"``, ``"torch"``, ``"cpp"``,
            ``"triton"``); default: the one in force (see :mod:`medattn_fast.backend`).

    Returns:
        A tensor shaped like x, in x's dtype (E accumulated in float32 for float16/bfloat16).
    """
    _check(x, negate, gamma, residual, multiply)
    return _op(x, negate=negate, gamma=gamma, residual=residual, multiply=multiply, backend=backend)
