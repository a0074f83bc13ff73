r"""The ``cpp`` backend of position attention: custom ops around ``csrc/cpu/position.cpp``.

Two ``torch.library`` custom ops, so the fused path is one opaque node under
``torch.compile(fullgraph=True)`` and ``torch.library.opcheck`` can check it:

* ``medattn::position_cpp_fwd(q, k, v, gamma?, residual?, multiply?, scale, transpose,
  channels_first, save, block_q, block_k) -> (out, o, lse)`` — ``out`` token-major (B, n_out, dv),
  a view of channel-first (B, dv, n_out) storage when ``channels_first``; ``o`` the pre-epilogue output
  (B, n_out, dv), kept only when there is an epilogue and a gradient is wanted (empty otherwise);
  ``lse`` the (B, Nq) row log-sum-exp in float32 (float64 for float64 inputs; empty when no
  gradient is wanted).
* ``medattn::position_cpp_bwd`` — dq, dk, dv, dγ, df (empty tensors for absent ones).

Backward keeps q, k, v, (o), lse and γ/f: O(N·d) memory, never an Nq×Nk matrix; the kernels hold
one (block_q × block_k) score tile per thread. ``block_q`` (query rows per tile) is the public
``chunk_size`` when given; ``block_k`` (keys per tile) is :data:`DEFAULT_BLOCK_K`. Both are
launch parameters of the custom ops (the tests sweep them).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import backend as B
from ._custom_op import accumulation_dtype, empty, extension, wants_grad

__all__ = ["DEFAULT_BLOCK_Q", "DEFAULT_BLOCK_K", "position_cpp_fwd", "position_cpp_bwd"]


# Tile of the kernels: block_q query rows × block_k keys, in float32 64 KiB per tile — two tiles
# (probabilities and their gradient) stay in L2 beside the operand blocks.
DEFAULT_BLOCK_Q = 64
DEFAULT_BLOCK_K = 256

_ext = extension("cpu", "position")


@torch.library.custom_op("medattn::position_cpp_fwd", mutates_args=())
def position_cpp_fwd(q: Tensor, k: Tensor, v: Tensor, gamma: Optional[Tensor],
                               residual: Optional[Tensor], multiply: Optional[Tensor], scale: float,
                               transpose: bool, channels_first: bool, save: bool, block_q: int,
                               block_k: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Fused forward; q, k, v, residual, multiply are token-major (views of any strides)."""
    has_epilogue = gamma is not None or residual is not None or multiply is not None
    out, o, lse = _ext().position_attention_forward(
        q, k, v, gamma, residual, multiply, scale, transpose, channels_first, save and has_epilogue, save,
        block_q, block_k)
    return out, o, lse


@position_cpp_fwd.register_fake
def _(q, k, v, gamma, residual, multiply, scale, transpose, channels_first, save, block_q, block_k):
    batch, n_q, _ = q.shape
    n_out, d_v = (k.shape[1] if transpose else n_q), v.shape[2]
    out = q.new_empty(batch, d_v, n_out).transpose(1, 2) if channels_first else q.new_empty(batch, n_out, d_v)
    has_epilogue = gamma is not None or residual is not None or multiply is not None
    o = q.new_empty((batch, n_out, d_v)) if (save and has_epilogue) else empty(q)
    stats = accumulation_dtype(q.dtype)
    lse = q.new_empty((batch, n_q), dtype=stats) if save else empty(q, stats)
    return out, o, lse


@torch.library.custom_op("medattn::position_cpp_bwd", mutates_args=())
def position_cpp_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                               gamma: Optional[Tensor], multiply: Optional[Tensor], scale: float,
                               transpose: bool, need_multiply_grad: bool, block_q: int,
                               block_k: int) -> List[Tensor]:
    """dq, dk, dv (shaped and strided like q, k, v), dγ, df; ``grad_out``/``o`` token-major (B, n_out, dv)."""
    return list(_ext().position_attention_backward(grad_out, q, k, v, o, lse, gamma, multiply, scale, transpose,
                                                   need_multiply_grad, block_q, block_k))


@position_cpp_bwd.register_fake
def _(grad_out, q, k, v, o, lse, gamma, multiply, scale, transpose, need_multiply_grad, block_q, block_k):
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(gamma) if gamma is not None else empty(q),
            torch.empty_like(multiply) if (multiply is not None and need_multiply_grad) else empty(q)]


def _setup_context(ctx, inputs, output):
    q, k, v, gamma, residual, multiply, scale, transpose, channels_first, _save, block_q, block_k = inputs
    out, o, lse = output
    ctx.mark_non_differentiable(o, lse)
    has_epilogue = gamma is not None or residual is not None or multiply is not None
    # Without an epilogue the output itself is o.
    ctx.save_for_backward(q, k, v, o if has_epilogue else out, lse, gamma, multiply)
    ctx.scale, ctx.transpose = scale, transpose
    ctx.block_q, ctx.block_k = block_q, block_k
    ctx.has_residual = residual is not None


def _backward(ctx, grad_out, _grad_o, _grad_lse):
    q, k, v, o, lse, gamma, multiply = ctx.saved_tensors
    need_multiply_grad = multiply is not None and ctx.needs_input_grad[5]
    dq, dk, dv, d_gamma, d_mul = position_cpp_bwd(
        grad_out, q, k, v, o, lse, gamma, multiply, ctx.scale, ctx.transpose, need_multiply_grad,
        ctx.block_q, ctx.block_k)
    return (dq, dk, dv, d_gamma if gamma is not None else None,
            grad_out if ctx.has_residual else None, d_mul if need_multiply_grad else None,
            None, None, None, None, None, None)


position_cpp_fwd.register_autograd(_backward, setup_context=_setup_context)


def _cpp(q, k, v, *, scale, transpose, gamma, residual, multiply, chunk_size, channels_first):
    """Token-major views in and out (``channels_first``: the output's storage); ``chunk_size`` = block_q."""
    out, _o, _lse = position_cpp_fwd(
        q, k, v, gamma, residual, multiply, float(scale), bool(transpose), bool(channels_first),
        wants_grad(q, k, v, gamma, residual, multiply),
        int(chunk_size or DEFAULT_BLOCK_Q), DEFAULT_BLOCK_K)
    return out


def register(op: B.Op) -> None:
    """Adds the ``cpp`` backend to ``op``, the family's dispatcher (called by ``medattn_fast.ops``)."""
    op.register("cpp")(_cpp)
