r"""The ``triton`` backend of external attention: custom ops around ``triton_kernels.external``.

The backend is three steps; only the middle one is a custom op, the Linear layers stay ATen GEMMs
and their gradients are ordinary autograd::

    q   = x W_qᵀ + b_q                                                   (B, N, heads·d)
    y   = medattn::external_triton_fwd(q, M_k, b_k?, M_v, b_v?)  both softmaxes fused,
                                                                         the N × S matrix never stored
    out = y W_oᵀ + b_o

* ``medattn::external_triton_fwd(q, key_memory, key_bias?, value_memory, value_bias?,
  num_heads, save, fp32_precision?) -> (y, lse2)`` (``fp32_precision``: the :class:`medattn_fast.KernelConfig`'s in force): ``lse2`` (B·heads, S) float32 column statistics (empty when no
  gradient is wanted). ``key_bias`` is an input only so that it gets its exact gradient, 0: it adds
  a per-slot constant over the tokens the softmax runs over and never reaches the kernels.
* ``medattn::external_triton_bwd(grad_y, q, key_memory, value_memory, lse2, num_heads,
  value_bias_grad, fp32_precision?) -> [dq, dM_k, dM_v, db_v]`` (db_v empty unless asked).

Reasons the backend cannot run a call: the generic Triton ones (device, dtype), a head dim or a
slot count above 128 (the memories of a head live in registers), B·heads above 65535 (a grid axis).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backend as B
from ..kernel_config import kernel_config
from ._custom_op import kernel_op, or_empty, triton_module, wants_grad

_kernels = triton_module("external")


@kernel_op("medattn::external_triton_fwd", mutates_args=())
def external_triton_fwd(q: Tensor, key_memory: Tensor, key_bias: Optional[Tensor], value_memory: Tensor,
                        value_bias: Optional[Tensor], num_heads: int, save: bool,
                        fp32_precision: Optional[str]) -> Tuple[Tensor, Tensor]:
    """y (B, N, heads·d) and the float32 column statistics lse2 (B·heads, S) (empty unless ``save``)."""
    y, lse = _kernels().external_forward(q, key_memory, value_memory, value_bias, num_heads=num_heads,
                                         save_for_backward=save, fp32_precision=fp32_precision)
    return y, or_empty(lse, q, torch.float32)


@external_triton_fwd.register_fake
def _(q, key_memory, key_bias, value_memory, value_bias, num_heads, save, fp32_precision):
    lse_shape = (q.shape[0] * num_heads, key_memory.shape[0]) if save else (0,)
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


@kernel_op("medattn::external_triton_bwd", mutates_args=())
def external_triton_bwd(grad_y: Tensor, q: Tensor, key_memory: Tensor, value_memory: Tensor, lse: Tensor,
                        num_heads: int, value_bias_grad: bool, fp32_precision: Optional[str]) -> List[Tensor]:
    """[dq, dM_k, dM_v, db_v (empty unless ``value_bias_grad``)]."""
    dq, dmk, dmv, dbv = _kernels().external_backward(grad_y, q, key_memory, value_memory, lse, num_heads=num_heads,
                                                     value_bias_grad=value_bias_grad, fp32_precision=fp32_precision)
    return [dq, dmk, dmv, or_empty(dbv, q)]


@external_triton_bwd.register_fake
def _(grad_y, q, key_memory, value_memory, lse, num_heads, value_bias_grad, fp32_precision):
    d = value_memory.shape[0]
    return [q.new_empty(q.shape), key_memory.new_empty(key_memory.shape), value_memory.new_empty(value_memory.shape),
            value_memory.new_empty((d,) if value_bias_grad else (0,))]


def _setup_context(ctx, inputs, output):
    q, key_memory, key_bias, value_memory, value_bias, num_heads, _save, fp32_precision = inputs
    _y, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, key_memory, value_memory, lse, key_bias)
    ctx.num_heads, ctx.fp32_precision = num_heads, fp32_precision
    ctx.has_value_bias = value_bias is not None


def _backward(ctx, grad_y, _grad_lse):
    q, key_memory, value_memory, lse, key_bias = ctx.saved_tensors
    dq, dmk, dmv, dbv = external_triton_bwd(grad_y, q, key_memory, value_memory, lse, ctx.num_heads,
                                            ctx.has_value_bias, ctx.fp32_precision)
    d_key_bias = torch.zeros_like(key_bias) if key_bias is not None else None   # cancels in the softmax
    return dq, dmk, d_key_bias, dmv, (dbv if ctx.has_value_bias else None), None, None, None


external_triton_fwd.register_autograd(_backward, setup_context=_setup_context)


def _triton(x, query_weight, query_bias, key_memory, key_bias, value_memory, value_bias, proj_weight, proj_bias,
            *, num_heads):
    """Query GEMM, fused external attention core, output GEMM (see the module docstring)."""
    q = F.linear(x, query_weight, query_bias)   # (B, N, heads·d)
    y, _lse = external_triton_fwd(q, key_memory, key_bias, value_memory, value_bias, int(num_heads),
                                  wants_grad(x, query_weight, query_bias, key_memory, key_bias, value_memory, value_bias),
                                  kernel_config().fp32_precision)
    return F.linear(y, proj_weight, proj_bias)


def register(op: B.Op) -> None:
    """Adds the ``triton`` backend to ``op``, the family's dispatcher (called by ``medattn_fast.ops``)."""
    op.register("triton")(_triton)
