"""Input checks shared by every op: clear errors before any kernel launch.

Every message names the argument, what was expected and what was received, e.g.
``position_attention: argument 'k' must have shape (B, Nk, dk) = (2, *, 8), got (2, 5, 4)``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

Dim = Union[int, str, None]  # an int must match; a str names a free dim; None: anything


def tensor(op: str, name: str, t, ndim: Union[int, Sequence[int], None] = None, *, floating: bool = True,
           allow_empty: bool = False) -> torch.Tensor:
    """``t`` is a floating tensor of rank ``ndim`` (an int or the allowed ranks) with no empty dim."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if floating and t.dtype not in FLOATS:
        raise TypeError(
            f"{op}: argument '{name}' must be float32, float16, bfloat16 or float64, got {t.dtype}"
        )
    if ndim is not None:
        ranks = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in ranks:
            want = " or ".join(str(r) for r in ranks)
            raise ValueError(
                f"{op}: argument '{name}' must have {want} dimensions, got {t.dim()} (shape {tuple(t.shape)})"
            )
    if not allow_empty and t.numel() == 0:
        raise ValueError(f"{op}: argument '{name}' must not have an empty dimension, got shape {tuple(t.shape)}")
    return t


def shape(op: str, name: str, t: torch.Tensor, expected: Sequence[Dim], names: Optional[str] = None) -> None:
    """``t.shape`` matches ``expected`` (ints must match, None/str are free); ``names`` documents dims."""
    got = tuple(t.shape)
    ok = len(got) == len(expected) and all(e is None or isinstance(e, str) or e == g for e, g in zip(expected, got))
    if not ok:
        exp = "(" + ", ".join("*" if (e is None or isinstance(e, str)) else str(e) for e in expected) + ")"
        label = f"{names} = {exp}" if names else exp
        raise ValueError(f"{op}: argument '{name}' must have shape {label}, got {got}")


def same_device_dtype(op: str, **tensors: torch.Tensor) -> Tuple[torch.device, torch.dtype]:
    """All tensors on one device with one dtype."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    n0, t0 = items[0]
    for n, t in items[1:]:
        if t.device != t0.device:
            raise ValueError(f"{op}: argument '{n}' is on {t.device} but '{n0}' is on {t0.device}")
        if t.dtype != t0.dtype:
            raise TypeError(f"{op}: argument '{n}' has dtype {t.dtype} but '{n0}' has {t0.dtype}")
    return t0.device, t0.dtype


def scalar_param(op: str, name: str, t, *, dtype_like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A learnable scalar given as a 0-dim or (1,) tensor (e.g. GaussianTrans.shift, DANet gamma)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: argument '{name}' must be a 0-dim or shape-(1,) tensor, got {type(t).__name__}")
    if t.dtype not in FLOATS:
        raise TypeError(f"{op}: argument '{name}' must be a floating tensor, got {t.dtype}")
    if not (t.dim() == 0 or tuple(t.shape) == (1,)):
        raise ValueError(f"{op}: argument '{name}' must be a 0-dim or shape-(1,) tensor, got shape {tuple(t.shape)}")
    if dtype_like is not None and t.device != dtype_like.device:
        raise ValueError(f"{op}: argument '{name}' is on {t.device} but the inputs are on {dtype_like.device}")
    return t


def choice(op: str, name: str, value, allowed: Sequence) -> None:
    if value not in allowed:
        raise ValueError(f"{op}: argument '{name}' must be one of {tuple(allowed)}, got {value!r}")


def positive_int(op: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{op}: argument '{name}' must be a positive int, got {value!r}")


def head_projection(op: str, name: str, weight, channels: int, num_heads: int) -> int:
    """``weight`` is a (heads·d, C) matrix whose rows split into ``num_heads`` heads; returns heads·d."""
    tensor(op, name, weight, 2)
    shape(op, name, weight, ("A", channels), names="(heads·d, C)")
    rows = weight.shape[0]
    if rows % num_heads != 0:
        raise ValueError(f"{op}: argument '{name}' must have a first dim divisible by num_heads={num_heads} "
                         f"(heads·d, C), got shape {tuple(weight.shape)}")
    return rows


def optional_vectors(op: str, *vectors) -> None:
    """Each ``(name, t, length)``: ``t`` is None or a 1-D tensor of that length (a bias)."""
    for name, t, length in vectors:
        if t is not None:
            tensor(op, name, t, 1)
            shape(op, name, t, (length,))


def head_output(op: str, name: str, weight, rows: int) -> int:
    """``weight`` is the (Co, heads·d) output projection after the heads; returns Co."""
    tensor(op, name, weight, 2)
    shape(op, name, weight, ("Co", rows), names="(Co, heads·d)")
    return weight.shape[0]
