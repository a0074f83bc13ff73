r"""The ``triton`` backend of channel attention: custom ops around ``triton_kernels.channel``, with
the family's contract (the same schema as ``_channel_cpp``):

* ``medattn::channel_triton_fwd(x, gamma?, residual?, multiply?, negate, save, residual_is_x,
  fp32_precision?) -> (out, o, attention)``: ``out`` shaped like x (contiguous), ``o`` = A X before the epilogue
  (float32; only when there is an epilogue and a gradient is wanted; empty otherwise),
  ``attention`` the float32 (B, C, C) softmax — with x, all the backward needs.
  ``residual_is_x``: the residual is x itself (DANet's ``γ·o + x``; ``residual`` is then None).
* ``medattn::channel_triton_bwd(grad_out, x, o, attention, gamma?, multiply?, negate,
  need_multiply_grad, residual_is_x, fp32_precision?) -> [dx, dγ, df]`` (empty when absent); dx includes the
  residual's gradient when ``residual_is_x``.

x (B, C, *S) is read as (B, C, N) through a reshape, a view for every layout whose spatial dims
merge (contiguous, channels_last, transposed spatial dims of equal stride order).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _channel_fused as fused
from ._custom_op import empty, kernel_op, or_empty, triton_module

_kernels = triton_module("channel")


def _flat(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.reshape(t.shape[0], t.shape[1], -1)


@kernel_op("medattn::channel_triton_fwd", mutates_args=())
def channel_triton_fwd(x: Tensor, gamma: Optional[Tensor], residual: Optional[Tensor], multiply: Optional[Tensor],
                       negate: bool, save: bool, residual_is_x: bool,
                       fp32_precision: Optional[str]) -> Tuple[Tensor, Tensor, Tensor]:
    """Fused forward: out = γ · (softmax(∓X Xᵀ) X ⊙ f) + residual (x itself when residual_is_x), shaped like x."""
    out, o, attention = _kernels().channel_forward(
        _flat(x), negate=negate, gamma=gamma, residual=_flat(x if residual_is_x else residual),
        multiply=_flat(multiply), save_for_backward=save, fp32_precision=fp32_precision)
    return out.reshape(x.shape), or_empty(o if o is None else o.reshape(x.shape), x), attention


@channel_triton_fwd.register_fake
def _(x, gamma, residual, multiply, negate, save, residual_is_x, fp32_precision):
    has_epilogue = gamma is not None or residual is not None or multiply is not None or residual_is_x
    o = x.new_empty(x.shape, dtype=torch.float32) if (save and has_epilogue) else empty(x)
    return x.new_empty(x.shape), o, x.new_empty((x.shape[0], x.shape[1], x.shape[1]), dtype=torch.float32)


@kernel_op("medattn::channel_triton_bwd", mutates_args=())
def channel_triton_bwd(grad_out: Tensor, x: Tensor, o: Tensor, attention: Tensor, gamma: Optional[Tensor],
                       multiply: Optional[Tensor], negate: bool, need_multiply_grad: bool, residual_is_x: bool,
                       fp32_precision: Optional[str]) -> List[Tensor]:
    """dx (the residual's gradient included when residual_is_x), dγ, df."""
    dx, d_gamma, d_mul = _kernels().channel_backward(
        _flat(grad_out), _flat(x), _flat(o), attention, negate=negate, gamma=gamma, multiply=_flat(multiply),
        need_multiply_grad=need_multiply_grad, fp32_precision=fp32_precision)
    dx = dx.reshape(x.shape)
    if residual_is_x:
        dx = dx + grad_out.to(dx.dtype)
    return [dx, or_empty(d_gamma, x), or_empty(d_mul if d_mul is None else d_mul.reshape(x.shape), x)]


# completes the ops (backward's fake kernel, the autograd) and adds the dispatcher entry
register = fused.registrar("triton", channel_triton_fwd, channel_triton_bwd, output_when_no_o=True)
