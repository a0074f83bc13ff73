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
and the C×C matrices, O(C·N + C²)). Fused backends register on ``_op`` with the same keywords.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend as B
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


@_op.register("torch")
def _torch(x, *, negate, gamma, residual, multiply):
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
