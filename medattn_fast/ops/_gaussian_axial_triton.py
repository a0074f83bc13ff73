r"""The ``triton`` backend of Gaussian axial attention: the family's four custom ops
(``_gaussian_axial_fused``) ``medattn::gaussian_axial_triton_{qkv,scores}_{fwd,bwd}`` around
``triton_kernels.gaussian_axial``.

The kernels keep the natural-log log-sum-exp of every pixel's row and column softmax (float32).
On a GPU the ops are ``torch.library.triton_op``s whose launches go through ``wrap_triton``
(``_custom_op.kernel_op``), so Inductor sees the kernels; under the interpreter they are plain
custom ops.
"""
from __future__ import annotations

from typing import List

from .. import backend as B
from ..kernel_config import kernel_config
from . import _gaussian_axial_fused as fused
from ._custom_op import triton_module, with_inert

_kernels = triton_module("gaussian_axial")

KERNELS = fused.define_custom_ops(
    "triton",
    qkv_forward=lambda q, k, v, shift, precision: _kernels().axial_forward(v, shift, q=q, k=k,
                                                                           fp32_precision=precision),
    qkv_backward=lambda grad_out, q, k, v, shift, lse_rows, lse_cols, precision: _kernels().axial_backward(
        grad_out, v, shift, q=q, k=k, lse_rows=lse_rows, lse_cols=lse_cols, fp32_precision=precision),
    scores_forward=lambda atten_x, atten_y, v, shift, precision: _kernels().axial_forward(
        v, shift, atten_x=atten_x, atten_y=atten_y, fp32_precision=precision)[0],
    scores_backward=lambda grad_out, atten_x, atten_y, v, shift, precision: _kernels().axial_backward(
        grad_out, v, shift, atten_x=atten_x, atten_y=atten_y, fp32_precision=precision))
(gaussian_axial_triton_qkv_fwd, gaussian_axial_triton_qkv_bwd, gaussian_axial_triton_scores_fwd,
 gaussian_axial_triton_scores_bwd) = KERNELS


def _reasons(*args, **_kwargs) -> List[str]:
    # shift/bias are read as one float32 value whatever their dtype: only the first three tensors
    # (q, k, v or atten_x, atten_y, v) constrain the call; the line limit is the table's
    return B.triton_reasons(*args[:3])


def _triton_qkv(q, k, v, shift, *, bias=None):
    return KERNELS.qkv_forward(q, k, v, with_inert(shift, bias), kernel_config().fp32_precision)[0]


def _triton_scores(atten_x, atten_y, v, shift, *, bias=None):
    return KERNELS.scores_forward(atten_x, atten_y, v, with_inert(shift, bias), kernel_config().fp32_precision)


def register(op_qkv: B.Op, op_scores: B.Op) -> None:
    """Adds the ``triton`` backend to both dispatchers of the family (called by ``medattn_fast.ops``)."""
    op_qkv.register("triton", reasons=_reasons)(_triton_qkv)
    op_scores.register("triton", reasons=_reasons)(_triton_scores)
