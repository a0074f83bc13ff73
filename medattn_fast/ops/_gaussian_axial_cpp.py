r"""The ``cpp`` backend of Gaussian axial attention: custom ops around ``csrc/cpu/gaussian_axial.cpp``.

Four ``torch.library`` custom ops with fake kernels and autograd, so each fused path is one opaque
node under ``torch.compile(fullgraph=True)`` and ``torch.library.opcheck`` can check it:

* ``medattn::gaussian_axial_cpp_qkv_fwd(q, k, v, shift, bias?) -> (out, lse_rows, lse_cols)``:
  q, k, v (B, H, W, D) -> out (B, H, W, D) and the per-pixel row and column log-sum-exp (B, H, W)
  in float32 (float64 for float64 inputs) — all the backward keeps besides the inputs;
* ``medattn::gaussian_axial_cpp_qkv_bwd(grad_out, q, k, v, shift, lse_rows, lse_cols)
  -> (dq, dk, dv, dshift)``;
* ``medattn::gaussian_axial_cpp_scores_fwd(atten_x, atten_y, v, shift, bias?) -> out``
  (GaussianTrans's interface: atten_x (B, H, W, W), atten_y (B, W, H, H));
* ``medattn::gaussian_axial_cpp_scores_bwd(grad_out, atten_x, atten_y, v, shift)
  -> (d_atten_x, d_atten_y, dv, dshift)``.

``bias`` is passed only to hand it its exactly-zero gradient (it cancels in both softmaxes).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backend as B


def _ext():
    from .. import _build

    return _build.load("cpu", "gaussian_axial")


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bias_grad(ctx, shift: Tensor) -> Optional[Tensor]:
    """The bias cancels in both softmaxes: its gradient is exactly zero (None when absent)."""
    if ctx.bias_spec is None:
        return None
    shape, dtype = ctx.bias_spec
    return shift.new_zeros(shape, dtype=dtype)  # bias lives on shift's device (validated)


# --- from scores ---

@torch.library.custom_op("medattn::gaussian_axial_cpp_scores_fwd", mutates_args=())
def gaussian_axial_cpp_scores_fwd(atten_x: Tensor, atten_y: Tensor, v: Tensor, shift: Tensor,
                                  bias: Optional[Tensor]) -> Tensor:
    """Fused forward from scores. ``bias`` is accepted only to hand it its (zero) gradient."""
    return _ext().gaussian_axial_scores_forward(atten_x, atten_y, v, shift)


@gaussian_axial_cpp_scores_fwd.register_fake
def _(atten_x, atten_y, v, shift, bias):
    return v.new_empty(v.shape)


@torch.library.custom_op("medattn::gaussian_axial_cpp_scores_bwd", mutates_args=())
def gaussian_axial_cpp_scores_bwd(grad_out: Tensor, atten_x: Tensor, atten_y: Tensor, v: Tensor,
                                  shift: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of atten_x, atten_y, v and shift (shift's: a fixed-order, deterministic sum)."""
    gx, gy, gv, gs = _ext().gaussian_axial_scores_backward(grad_out, atten_x, atten_y, v, shift)
    return gx, gy, gv, gs


@gaussian_axial_cpp_scores_bwd.register_fake
def _(grad_out, atten_x, atten_y, v, shift):
    return atten_x.new_empty(atten_x.shape), atten_y.new_empty(atten_y.shape), v.new_empty(v.shape), \
        shift.new_empty(shift.shape)


def _scores_setup_context(ctx, inputs, output):
    atten_x, atten_y, v, shift, bias = inputs
    ctx.save_for_backward(atten_x, atten_y, v, shift)
    ctx.bias_spec = None if bias is None else (bias.shape, bias.dtype)


def _scores_backward(ctx, grad_out):
    atten_x, atten_y, v, shift = ctx.saved_tensors
    gx, gy, gv, gs = gaussian_axial_cpp_scores_bwd(grad_out, atten_x, atten_y, v, shift)
    return gx, gy, gv, gs, _bias_grad(ctx, shift)


gaussian_axial_cpp_scores_fwd.register_autograd(_scores_backward, setup_context=_scores_setup_context)


# --- from q, k, v ---

@torch.library.custom_op("medattn::gaussian_axial_cpp_qkv_fwd", mutates_args=())
def gaussian_axial_cpp_qkv_fwd(q: Tensor, k: Tensor, v: Tensor, shift: Tensor,
                               bias: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """Fused forward from q, k, v -> (out, row log-sum-exp (B,H,W), column log-sum-exp (B,H,W)).

    The per-pixel softmax statistics are all the backward keeps besides the inputs.
    """
    out, lse_rows, lse_cols = _ext().gaussian_axial_qkv_forward(q, k, v, shift)
    return out, lse_rows, lse_cols


@gaussian_axial_cpp_qkv_fwd.register_fake
def _(q, k, v, shift, bias):
    stats = q.new_empty(q.shape[:3], dtype=_stats_dtype(q.dtype))
    return q.new_empty(q.shape), stats, stats.new_empty(stats.shape)


@torch.library.custom_op("medattn::gaussian_axial_cpp_qkv_bwd", mutates_args=())
def gaussian_axial_cpp_qkv_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, shift: Tensor,
                               lse_rows: Tensor, lse_cols: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of q, k, v and shift, recomputing the probabilities from the saved statistics."""
    gq, gk, gv, gs = _ext().gaussian_axial_qkv_backward(grad_out, q, k, v, shift, lse_rows, lse_cols)
    return gq, gk, gv, gs


@gaussian_axial_cpp_qkv_bwd.register_fake
def _(grad_out, q, k, v, shift, lse_rows, lse_cols):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), shift.new_empty(shift.shape)


def _qkv_setup_context(ctx, inputs, output):
    q, k, v, shift, bias = inputs
    _, lse_rows, lse_cols = output
    ctx.mark_non_differentiable(lse_rows, lse_cols)
    ctx.save_for_backward(q, k, v, shift, lse_rows, lse_cols)
    ctx.bias_spec = None if bias is None else (bias.shape, bias.dtype)


def _qkv_backward(ctx, grad_out, _grad_lse_rows, _grad_lse_cols):
    q, k, v, shift, lse_rows, lse_cols = ctx.saved_tensors
    gq, gk, gv, gs = gaussian_axial_cpp_qkv_bwd(grad_out, q, k, v, shift, lse_rows, lse_cols)
    return gq, gk, gv, gs, _bias_grad(ctx, shift)


gaussian_axial_cpp_qkv_fwd.register_autograd(_qkv_backward, setup_context=_qkv_setup_context)




# --- eager fast path ---
# The custom ops above are what torch.compile traces (and what opcheck checks). In eager mode their
# dispatch — custom-op wrappers around the forward and the backward, a Python autograd node —
# costs ~250 µs per forward+backward, a quarter of the whole call at MT-UNet's sizes (the kernels
# themselves take ~0.7 ms at B=2, 14×14, D=512). Eager calls therefore go through this plain
# autograd.Function around the same extension functions (same results, bit for bit: tested).

class _ScoresEager(torch.autograd.Function):
    @staticmethod
    def forward(ctx, atten_x, atten_y, v, shift, bias):
        ctx.save_for_backward(atten_x, atten_y, v, shift)
        ctx.bias_spec = None if bias is None else (bias.shape, bias.dtype)
        return _ext().gaussian_axial_scores_forward(atten_x, atten_y, v, shift)

    @staticmethod
    def backward(ctx, grad_out):
        atten_x, atten_y, v, shift = ctx.saved_tensors
        gx, gy, gv, gs = _ext().gaussian_axial_scores_backward(grad_out, atten_x, atten_y, v, shift)
        return gx, gy, gv, gs, _bias_grad(ctx, shift)


class _QkvEager(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, shift, bias):
        out, lse_rows, lse_cols = _ext().gaussian_axial_qkv_forward(q, k, v, shift)
        ctx.save_for_backward(q, k, v, shift, lse_rows, lse_cols)
        ctx.bias_spec = None if bias is None else (bias.shape, bias.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, shift, lse_rows, lse_cols = ctx.saved_tensors
        gq, gk, gv, gs = _ext().gaussian_axial_qkv_backward(grad_out, q, k, v, shift, lse_rows,
                                                            lse_cols)
        return gq, gk, gv, gs, _bias_grad(ctx, shift)


def _cpp_scores(atten_x, atten_y, v, shift, *, bias=None):
    if torch.compiler.is_compiling():
        return gaussian_axial_cpp_scores_fwd(atten_x, atten_y, v, shift, bias)
    return _ScoresEager.apply(atten_x, atten_y, v, shift, bias)


def _cpp_qkv(q, k, v, shift, *, bias=None):
    if torch.compiler.is_compiling():
        return gaussian_axial_cpp_qkv_fwd(q, k, v, shift, bias)[0]
    return _QkvEager.apply(q, k, v, shift, bias)


def register(op_qkv: B.Op, op_scores: B.Op) -> None:
    """Adds the ``cpp`` backend to both dispatchers of the family (called by ``medattn_fast.ops``)."""
    op_qkv.register("cpp")(_cpp_qkv)
    op_scores.register("cpp")(_cpp_scores)
