r"""The ``triton`` backend of Gaussian axial attention: custom ops around ``triton_kernels.axial``.

Four ``torch.library`` custom ops, so each fused path is one opaque node under
``torch.compile(fullgraph=True)`` and ``torch.library.opcheck`` can check it:

* ``medattn::gaussian_axial_triton_qkv_fwd(q, k, v, shift) -> (out, lse_rows, lse_cols)``:
  q, k, v (B, H, W, D) -> out (B, H, W, D) and the natural-log log-sum-exp of every pixel's row and
  column softmax, (B, H, W) float32 each — all the backward keeps besides q, k, v (the W×W and H×H
  score maps are never stored, in either pass);
* ``medattn::gaussian_axial_triton_qkv_bwd(grad_out, q, k, v, shift, lse_rows, lse_cols)
  -> (dq, dk, dv, dshift)``;
* ``medattn::gaussian_axial_triton_scores_fwd(atten_x, atten_y, v, shift) -> out``
  (GaussianTrans's interface: atten_x (B, H, W, W), atten_y (B, W, H, H));
* ``medattn::gaussian_axial_triton_scores_bwd(grad_out, atten_x, atten_y, v, shift)
  -> (d_atten_x, d_atten_y, dv, dshift)``.

θ (``shift``) is a tensor argument (read by the kernels, never ``.item()``), so no host sync and no
recompile when it trains; its gradient is a fixed-order sum of per-line partials (deterministic).
``bias`` never reaches the kernels: :func:`medattn_fast.ops.gaussian_axial._with_inert_bias` gives
it its exactly-zero gradient. Launches are plain Triton launches inside the custom ops (as in
``_position_triton``), so the kernels stay an opaque call for Inductor.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor

from .. import backend as B
from .gaussian_axial import _with_inert_bias



def _kernels():
    from ..triton_kernels import axial as kernels   # imported on first use: triton is optional

    return kernels


# --- from q, k, v ---

@torch.library.custom_op("medattn::gaussian_axial_triton_qkv_fwd", mutates_args=())
def gaussian_axial_triton_qkv_fwd(q: Tensor, k: Tensor, v: Tensor, shift: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Fused forward from q, k, v (any strides) -> (out, lse_rows, lse_cols)."""
    out, lse_rows, lse_cols = _kernels().axial_forward(v, shift, q=q, k=k)
    return out, lse_rows, lse_cols


@gaussian_axial_triton_qkv_fwd.register_fake
def _(q, k, v, shift):
    stats = q.new_empty(q.shape[:3], dtype=torch.float32)
    return v.new_empty(v.shape), stats, stats.new_empty(stats.shape)


@torch.library.custom_op("medattn::gaussian_axial_triton_qkv_bwd", mutates_args=())
def gaussian_axial_triton_qkv_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, shift: Tensor,
                                  lse_rows: Tensor, lse_cols: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dshift), the probabilities recomputed from the saved statistics."""
    dq, dk, dv, d_shift = _kernels().axial_backward(grad_out, v, shift, q=q, k=k, lse_rows=lse_rows,
                                                    lse_cols=lse_cols)
    return dq, dk, dv, d_shift


@gaussian_axial_triton_qkv_bwd.register_fake
def _(grad_out, q, k, v, shift, lse_rows, lse_cols):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), shift.new_empty(shift.shape)


def _qkv_setup_context(ctx, inputs, output):
    q, k, v, shift = inputs
    _, lse_rows, lse_cols = output
    ctx.mark_non_differentiable(lse_rows, lse_cols)
    ctx.save_for_backward(q, k, v, shift, lse_rows, lse_cols)


def _qkv_backward(ctx, grad_out, _grad_lse_rows, _grad_lse_cols):
    q, k, v, shift, lse_rows, lse_cols = ctx.saved_tensors
    dq, dk, dv, d_shift = gaussian_axial_triton_qkv_bwd(grad_out, q, k, v, shift, lse_rows, lse_cols)
    return dq, dk, dv, d_shift


gaussian_axial_triton_qkv_fwd.register_autograd(_qkv_backward, setup_context=_qkv_setup_context)


# --- from scores ---

@torch.library.custom_op("medattn::gaussian_axial_triton_scores_fwd", mutates_args=())
def gaussian_axial_triton_scores_fwd(atten_x: Tensor, atten_y: Tensor, v: Tensor, shift: Tensor) -> Tensor:
    """Fused forward from precomputed scores (any strides) -> out (B, H, W, D)."""
    out, _, _ = _kernels().axial_forward(v, shift, atten_x=atten_x, atten_y=atten_y)
    return out


@gaussian_axial_triton_scores_fwd.register_fake
def _(atten_x, atten_y, v, shift):
    return v.new_empty(v.shape)


@torch.library.custom_op("medattn::gaussian_axial_triton_scores_bwd", mutates_args=())
def gaussian_axial_triton_scores_bwd(grad_out: Tensor, atten_x: Tensor, atten_y: Tensor, v: Tensor,
                                     shift: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(d_atten_x, d_atten_y, dv, dshift); the softmaxes are recomputed exactly from the scores."""
    d_atten_x, d_atten_y, dv, d_shift = _kernels().axial_backward(grad_out, v, shift, atten_x=atten_x,
                                                                  atten_y=atten_y)
    return d_atten_x, d_atten_y, dv, d_shift


@gaussian_axial_triton_scores_bwd.register_fake
def _(grad_out, atten_x, atten_y, v, shift):
    return (atten_x.new_empty(atten_x.shape), atten_y.new_empty(atten_y.shape), v.new_empty(v.shape),
            shift.new_empty(shift.shape))


def _scores_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _scores_backward(ctx, grad_out):
    atten_x, atten_y, v, shift = ctx.saved_tensors
    d_atten_x, d_atten_y, dv, d_shift = gaussian_axial_triton_scores_bwd(grad_out, atten_x, atten_y, v, shift)
    return d_atten_x, d_atten_y, dv, d_shift


gaussian_axial_triton_scores_fwd.register_autograd(_scores_backward, setup_context=_scores_setup_context)


# --- backend registration ---

def _reasons(*args, **_kwargs) -> List[str]:
    # shift/bias are read as one float32 value whatever their dtype: only the first three tensors
    # (q, k, v or atten_x, atten_y, v) constrain the call; the line limit is the table's
    return B.triton_reasons(*args[:3])


def _triton_qkv(q, k, v, shift, *, bias=None):
    return gaussian_axial_triton_qkv_fwd(q, k, v, _with_inert_bias(shift, bias))[0]


def _triton_scores(atten_x, atten_y, v, shift, *, bias=None):
    return gaussian_axial_triton_scores_fwd(atten_x, atten_y, v, _with_inert_bias(shift, bias))


def register(op_qkv: B.Op, op_scores: B.Op) -> None:
    """Adds the ``triton`` backend to both dispatchers of the family (called by ``medattn_fast.ops``)."""
    op_qkv.register("triton", reasons=_reasons)(_triton_qkv)
    op_scores.register("triton", reasons=_reasons)(_triton_scores)
