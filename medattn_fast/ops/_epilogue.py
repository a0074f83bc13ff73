"""The epilogue position and channel attention share: ``out = γ · (o ⊙ f) + x`` (DANet's ``γ·o + x``,
the guided attention's ``o ⊙ f``), each part skipped when its argument is None. Their ``reference``
and ``torch`` backends run it as plain autograd ops (O(N·d) memory); the fused backends fuse it."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

__all__ = ["epilogue"]


def epilogue(o: Tensor, gamma: Optional[Tensor], residual: Optional[Tensor], multiply: Optional[Tensor]) -> Tensor:
    """``gamma · (o ⊙ multiply) + residual``; gamma (a 0-dim or (1,) tensor) cast to o's dtype."""
    if multiply is not None:
        o = o * multiply
    if gamma is not None:
        o = gamma.to(o.dtype) * o
    if residual is not None:
        o = o + residual
    return o
