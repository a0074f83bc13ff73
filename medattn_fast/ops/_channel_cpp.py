r"""The ``cpp`` backend of channel attention: custom ops around ``csrc/cpu/channel.cpp``.

* ``medattn::channel_cpp_fwd(x, gamma?, residual?, multiply?, negate, save, residual_is_x)
  -> (out, o, attention)`` — ``out`` shaped like x (contiguous, x's dtype); ``o`` the pre-epilogue
  output (B, C, N) in x's dtype, kept only when a gradient is wanted and there is a multiply f
  (dγ is computed from the C×C matrices otherwise); ``attention`` the (B, C, C) softmax in float32
  (float64 for float64 x), kept when a gradient is wanted (C×C is small next to the C×N map).
  ``residual_is_x``: the residual is x itself (DANet's ``γ·o + x``; ``residual`` is then None), so
  the forward is one GEMM writing ``x + γ A X`` and backward adds the residual's gradient inside
  dx's GEMM instead of a separate autograd accumulation.
* ``medattn::channel_cpp_bwd`` — dx (the attention path, plus g when residual_is_x),
  dγ, df.

Both are one opaque node under ``torch.compile(fullgraph=True)``; ``torch.library.opcheck`` checks
them against their fake kernels.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import backend as B

__all__ = ["channel_cpp_fwd", "channel_cpp_bwd"]



def _ext():
    from .. import _build

    return _build.load("cpu", "channel")


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty(like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    return like.new_empty((0,), dtype=dtype)


@torch.library.custom_op("medattn::channel_cpp_fwd", mutates_args=())
def channel_cpp_fwd(x: Tensor, gamma: Optional[Tensor], residual: Optional[Tensor],
                              multiply: Optional[Tensor], negate: bool, save: bool,
                              residual_is_x: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """out = γ · (softmax(∓X Xᵀ) X ⊙ f) + residual (x itself when residual_is_x), shaped like x."""
    out, o, attention = _ext().channel_attention_forward(x, gamma, residual, multiply, negate, save, residual_is_x)
    return out, o, attention


@channel_cpp_fwd.register_fake
def _(x, gamma, residual, multiply, negate, save, residual_is_x):
    keep_o = save and multiply is not None
    batch, channels = x.shape[0], x.shape[1]
    o = x.new_empty((batch, channels, math.prod(x.shape[2:]))) if keep_o else _empty(x)
    stats = _stats_dtype(x.dtype)
    attention = x.new_empty((batch, channels, channels), dtype=stats) if save else _empty(x, stats)
    return x.new_empty(x.shape), o, attention


@torch.library.custom_op("medattn::channel_cpp_bwd", mutates_args=())
def channel_cpp_bwd(grad_out: Tensor, x: Tensor, o: Tensor, attention: Tensor, gamma: Optional[Tensor],
                              multiply: Optional[Tensor], negate: bool, need_multiply_grad: bool,
                              residual_is_x: bool) -> List[Tensor]:
    """dx (contiguous like x; the residual's g included when residual_is_x), dγ (gamma's shape), df or empty."""
    return list(_ext().channel_attention_backward(grad_out, x, o, attention, gamma, multiply, negate,
                                                  need_multiply_grad, residual_is_x))


@channel_cpp_bwd.register_fake
def _(grad_out, x, o, attention, gamma, multiply, negate, need_multiply_grad, residual_is_x):
    return [x.new_empty(x.shape), gamma.new_empty(gamma.shape) if gamma is not None else _empty(x),
            x.new_empty(x.shape) if (multiply is not None and need_multiply_grad) else _empty(x)]


def _setup_context(ctx, inputs, output):
    x, gamma, residual, multiply, negate, _save, residual_is_x = inputs
    _out, o, attention = output
    ctx.mark_non_differentiable(o, attention)
    ctx.save_for_backward(x, o, attention, gamma, multiply)
    ctx.negate, ctx.has_residual, ctx.residual_is_x = negate, residual is not None, residual_is_x


def _backward(ctx, grad_out, _grad_o, _grad_attention):
    x, o, attention, gamma, multiply = ctx.saved_tensors
    need_mul = multiply is not None and ctx.needs_input_grad[3]
    dx, d_gamma, d_mul = channel_cpp_bwd(grad_out, x, o, attention, gamma, multiply, ctx.negate, need_mul,
                                                   ctx.residual_is_x)
    return (dx, d_gamma if gamma is not None else None, grad_out if ctx.has_residual else None,
            d_mul if need_mul else None, None, None, None)


channel_cpp_fwd.register_autograd(_backward, setup_context=_setup_context)


def _cpp(x, *, negate, gamma, residual, multiply):
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, gamma, residual, multiply))
    residual_is_x = residual is x
    out, _o, _attention = channel_cpp_fwd(x, gamma, None if residual_is_x else residual, multiply,
                                                    bool(negate), wants_grad, residual_is_x)
    return out


def register(op: B.Op) -> None:
    """Adds the ``cpp`` backend to ``op``, the family's dispatcher (called by ``medattn_fast.ops``)."""
    op.register("cpp")(_cpp)
