r"""The ``triton`` backend of position attention: custom ops around ``triton_kernels.position``.

Two ``torch.library`` ops (``_custom_op.kernel_op``: ``triton_op``s on a GPU, whose kernel launches
torch.compile traces into its graph; custom ops under the interpreter, one opaque node each), so the
fused path compiles with ``torch.compile(fullgraph=True)`` and ``torch.library.opcheck`` can check it:

* ``medattn::position_triton_fwd(q, k, v, gamma?, residual?, multiply?, scale, transpose,
  channels_first, save, fp32_precision?, p16, backward, dv_split, hoist?) -> (out, o, lse2)`` — ``out`` token-major
  (B, n_out, dv), a view of channel-first (B, dv, n_out) storage when ``channels_first``; ``o`` the
  pre-epilogue output (float32; saved only when there is an epilogue and a gradient is wanted; an
  empty tensor otherwise); ``lse2`` the (B, Nq) float32 base-2 row log-sum-exp (empty when no
  gradient is wanted). The last five arguments are the kernel variants of the
  :class:`medattn_fast.KernelConfig` in force at the call (the backward runs the forward's).
* ``medattn::position_triton_bwd`` — dq, dk, dv, dγ, df (empty tensors for absent ones).

The backward keeps q, k, v, (o), lse2 and γ/f: O(N·d) memory, never the N×N matrix.
Launches go through ``triton_kernels._util.launch`` (``wrap_triton`` when the kernels are compiled):
Inductor then sees each kernel, not one opaque call (tests/_triton_op_trace.py checks it offline).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import backend as B
from ..kernel_config import kernel_config
from ._custom_op import empty, kernel_op, or_empty, triton_module, wants_grad

_kernels = triton_module("position")


@kernel_op("medattn::position_triton_fwd", mutates_args=())
def position_triton_fwd(q: Tensor, k: Tensor, v: Tensor, gamma: Optional[Tensor], residual: Optional[Tensor],
                        multiply: Optional[Tensor], scale: float, transpose: bool, channels_first: bool, save: bool,
                        fp32_precision: Optional[str], p16: bool, backward: str, dv_split: int,
                        hoist: Optional[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    """Fused forward; q, k, v, residual, multiply are token-major (views of any strides)."""
    out, o, lse = _kernels().position_forward(
        q, k, v, scale=scale, transpose=transpose, gamma=gamma, residual=residual, multiply=multiply,
        channels_first=channels_first, save_for_backward=save, p16=p16, fp32_precision=fp32_precision,
        dv_split=dv_split)
    return out, or_empty(o, q), or_empty(lse, q, torch.float32)


@position_triton_fwd.register_fake
def _(q, k, v, gamma, residual, multiply, scale, transpose, channels_first, save, fp32_precision, p16, backward,
      dv_split, hoist):
    batch, n_q, _ = q.shape
    n_out, d_v = (k.shape[1] if transpose else n_q), v.shape[2]
    out = q.new_empty(batch, d_v, n_out).transpose(1, 2) if channels_first else q.new_empty(batch, n_out, d_v)
    has_epilogue = gamma is not None or residual is not None or multiply is not None
    o = q.new_empty((batch, n_out, d_v), dtype=torch.float32) if (save and has_epilogue) else empty(q)
    lse = q.new_empty((batch, n_q), dtype=torch.float32) if save else empty(q, torch.float32)
    return out, o, lse


@kernel_op("medattn::position_triton_bwd", mutates_args=())
def position_triton_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                        gamma: Optional[Tensor], multiply: Optional[Tensor], scale: float, transpose: bool,
                        need_multiply_grad: bool, fp32_precision: Optional[str], p16: bool,
                        backward: str, dv_split: int, hoist: Optional[bool]) -> List[Tensor]:
    """dq, dk, dv, dγ, df; ``grad_out`` and ``o`` token-major (B, n_out, dv), any strides."""
    dq, dk, dv, d_gamma, d_mul = _kernels().position_backward(
        grad_out, q, k, v, o, lse, scale=scale, transpose=transpose, gamma=gamma, multiply=multiply,
        need_multiply_grad=need_multiply_grad, variant=backward, p16=p16, fp32_precision=fp32_precision,
        dv_split=dv_split, hoist=hoist)
    return [dq, dk, dv, or_empty(d_gamma, q), or_empty(d_mul, q)]


@position_triton_bwd.register_fake
def _(grad_out, q, k, v, o, lse, gamma, multiply, scale, transpose, need_multiply_grad, fp32_precision, p16,
      backward, dv_split, hoist):
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(gamma) if gamma is not None else empty(q),
            torch.empty_like(multiply) if (multiply is not None and need_multiply_grad) else empty(q)]


def _setup_context(ctx, inputs, output):
    q, k, v, gamma, residual, multiply, scale, transpose, _channels_first, _save, *variants = inputs
    out, o, lse = output
    ctx.mark_non_differentiable(o, lse)
    has_epilogue = gamma is not None or residual is not None or multiply is not None
    # Without an epilogue the output itself is o.
    ctx.save_for_backward(q, k, v, o if has_epilogue else out, lse, gamma, multiply)
    ctx.scale, ctx.transpose, ctx.variants = scale, transpose, variants
    ctx.has_residual = residual is not None


def _backward(ctx, grad_out, _grad_o, _grad_lse):
    q, k, v, o, lse, gamma, multiply = ctx.saved_tensors
    need_mul = multiply is not None and ctx.needs_input_grad[5]
    dq, dk, dv, d_gamma, d_mul = position_triton_bwd(
        grad_out, q, k, v, o, lse, gamma, multiply, ctx.scale, ctx.transpose, need_mul, *ctx.variants)
    return (dq, dk, dv, d_gamma if gamma is not None else None, grad_out if ctx.has_residual else None,
            d_mul if need_mul else None, *(None,) * 9)


position_triton_fwd.register_autograd(_backward, setup_context=_setup_context)


def _triton(q, k, v, *, scale, transpose, gamma, residual, multiply, chunk_size, channels_first):
    """Token-major views in and out (``channels_first``: the output's storage; ``chunk_size`` unused)."""
    config = kernel_config()
    out, _o, _lse = position_triton_fwd(q, k, v, gamma, residual, multiply, float(scale), bool(transpose),
                                        bool(channels_first), wants_grad(q, k, v, gamma, residual, multiply),
                                        config.fp32_precision, config.position_p16, config.position_backward,
                                        config.position_dv_split, config.position_hoist)
    return out


def register(op: B.Op) -> None:
    """Adds the ``triton`` backend to ``op``, the family's dispatcher (called by ``medattn_fast.ops``)."""
    op.register("triton")(_triton)
