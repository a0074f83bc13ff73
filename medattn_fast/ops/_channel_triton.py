r"""The ``triton`` backend of channel attention: custom ops around ``triton_kernels.channel``.

* ``medattn::channel_triton_fwd(x, gamma?, residual?, multiply?, negate, save)
  -> (out, o, attention)``: ``out`` shaped like x (contiguous), ``o`` = A X before the epilogue
  (only when there is an epilogue and a gradient is wanted; empty otherwise), ``attention`` the
  float32 (B, C, C) softmax — with x, all the backward needs.
* ``medattn::channel_triton_bwd`` -> dx (the attention path), dγ, df (empty when absent);
  the residual's gradient is the incoming gradient itself.

x (B, C, *S) is read as (B, C, N) through a reshape, a view for every layout whose spatial dims
merge (contiguous, channels_last, transposed spatial dims of equal stride order).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import backend as B



def _kernels():
    from ..triton_kernels import channel as kernels   # imported on first use: triton is optional

    return kernels


def _flat(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.reshape(t.shape[0], t.shape[1], -1)


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


@torch.library.custom_op("medattn::channel_triton_fwd", mutates_args=())
def channel_triton_fwd(x: Tensor, gamma: Optional[Tensor], residual: Optional[Tensor],
                                 multiply: Optional[Tensor], negate: bool, save: bool
                                 ) -> Tuple[Tensor, Tensor, Tensor]:
    """Fused forward: out = γ · (softmax(∓X Xᵀ) X ⊙ f) + x_res, shaped like x."""
    out, o, attention = _kernels().channel_forward(
        _flat(x), negate=negate, gamma=gamma, residual=_flat(residual), multiply=_flat(multiply),
        save_for_backward=save)
    return out.reshape(x.shape), (o.reshape(x.shape) if o is not None else _empty(x)), attention


@channel_triton_fwd.register_fake
def _(x, gamma, residual, multiply, negate, save):
    has_epilogue = gamma is not None or residual is not None or multiply is not None
    out = x.new_empty(x.shape)
    o = x.new_empty(x.shape, dtype=torch.float32) if (save and has_epilogue) else _empty(x)
    return out, o, x.new_empty((x.shape[0], x.shape[1], x.shape[1]), dtype=torch.float32)


@torch.library.custom_op("medattn::channel_triton_bwd", mutates_args=())
def channel_triton_bwd(grad_out: Tensor, x: Tensor, o: Tensor, attention: Tensor,
                                 gamma: Optional[Tensor], multiply: Optional[Tensor], negate: bool,
                                 need_multiply_grad: bool) -> List[Tensor]:
    """dx (attention path only), dγ, df."""
    dx, d_gamma, d_mul = _kernels().channel_backward(
        _flat(grad_out), _flat(x), _flat(o), attention, negate=negate, gamma=gamma, multiply=_flat(multiply),
        need_multiply_grad=need_multiply_grad)
    return [dx.reshape(x.shape), d_gamma if d_gamma is not None else _empty(x),
            d_mul.reshape(x.shape) if d_mul is not None else _empty(x)]


@channel_triton_bwd.register_fake
def _(grad_out, x, o, attention, gamma, multiply, negate, need_multiply_grad):
    return [x.new_empty(x.shape), gamma.new_empty(gamma.shape) if gamma is not None else _empty(x),
            x.new_empty(x.shape) if (multiply is not None and need_multiply_grad) else _empty(x)]


def _setup_context(ctx, inputs, output):
    x, gamma, residual, multiply, negate, _save = inputs
    out, o, attention = output
    ctx.mark_non_differentiable(o, attention)
    ctx.has_epilogue = gamma is not None or residual is not None or multiply is not None
    ctx.save_for_backward(x, o if ctx.has_epilogue else out, attention, gamma, multiply)
    ctx.negate, ctx.has_residual = negate, residual is not None


def _backward(ctx, grad_out, _grad_o, _grad_attention):
    x, o, attention, gamma, multiply = ctx.saved_tensors
    need_mul = multiply is not None and ctx.needs_input_grad[3]
    dx, d_gamma, d_mul = channel_triton_bwd(grad_out, x, o, attention, gamma, multiply,
                                                      ctx.negate, need_mul)
    return (dx, d_gamma if gamma is not None else None, grad_out if ctx.has_residual else None,
            d_mul if need_mul else None, None, None)


channel_triton_fwd.register_autograd(_backward, setup_context=_setup_context)


def _triton(x, *, negate, gamma, residual, multiply):
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, gamma, residual, multiply))
    out, _o, _attention = channel_triton_fwd(x, gamma, residual, multiply, bool(negate), wants_grad)
    return out


def register(op: B.Op) -> None:
    """Adds the ``triton`` backend to ``op``, the family's dispatcher (called by ``medattn_fast.ops``)."""
    op.register("triton")(_triton)
