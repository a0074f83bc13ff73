r"""The ``cpp`` backend of channel attention: custom ops around ``csrc/cpu/channel.cpp``.

* ``medattn::channel_cpp_fwd(x, gamma?, residual?, multiply?, negate, save, residual_is_x,
  fp32_precision?) -> (out, o, attention)`` (the family's contract, ``_channel_fused``; the C++
  kernels multiply in IEEE float32/float64 and ignore ``fp32_precision``) — ``out`` shaped like x (contiguous, x's dtype); ``o`` the pre-epilogue
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

from . import _channel_fused as fused
from ._custom_op import accumulation_dtype, empty, extension

__all__ = ["channel_cpp_fwd", "channel_cpp_bwd"]

_ext = extension("cpu", "channel")


@torch.library.custom_op("medattn::channel_cpp_fwd", mutates_args=())
def channel_cpp_fwd(x: Tensor, gamma: Optional[Tensor], residual: Optional[Tensor], multiply: Optional[Tensor],
                    negate: bool, save: bool, residual_is_x: bool,
                    fp32_precision: Optional[str]) -> Tuple[Tensor, Tensor, Tensor]:
    """out = γ · (softmax(∓X Xᵀ) X ⊙ f) + residual (x itself when residual_is_x), shaped like x."""
    out, o, attention = _ext().channel_attention_forward(x, gamma, residual, multiply, negate, save, residual_is_x)
    return out, o, attention


@channel_cpp_fwd.register_fake
def _(x, gamma, residual, multiply, negate, save, residual_is_x, fp32_precision):
    keep_o = save and multiply is not None
    batch, channels = x.shape[0], x.shape[1]
    o = x.new_empty((batch, channels, math.prod(x.shape[2:]))) if keep_o else empty(x)
    stats = accumulation_dtype(x.dtype)
    attention = x.new_empty((batch, channels, channels), dtype=stats) if save else empty(x, stats)
    return x.new_empty(x.shape), o, attention


@torch.library.custom_op("medattn::channel_cpp_bwd", mutates_args=())
def channel_cpp_bwd(grad_out: Tensor, x: Tensor, o: Tensor, attention: Tensor, gamma: Optional[Tensor],
                    multiply: Optional[Tensor], negate: bool, need_multiply_grad: bool, residual_is_x: bool,
                    fp32_precision: Optional[str]) -> List[Tensor]:
    """dx (contiguous like x; the residual's g included when residual_is_x), dγ (gamma's shape), df or empty."""
    return list(_ext().channel_attention_backward(grad_out, x, o, attention, gamma, multiply, negate,
                                                  need_multiply_grad, residual_is_x))


# completes the ops (backward's fake kernel, the autograd) and adds the dispatcher entry
register = fused.registrar("cpp", channel_cpp_fwd, channel_cpp_bwd, output_when_no_o=False)
