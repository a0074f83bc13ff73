r"""The ``cpp`` backend of Gaussian axial attention: the family's four custom ops
(``_gaussian_axial_fused``) ``medattn::gaussian_axial_cpp_{qkv,scores}_{fwd,bwd}`` around
``csrc/cpu/gaussian_axial.cpp``, plus an eager fast path around the same kernels.
"""
from __future__ import annotations

import torch

from .. import backend as B
from . import _gaussian_axial_fused as fused
from ._custom_op import extension, with_inert

_ext = extension("cpu", "gaussian_axial")


# (the C++ kernels multiply in IEEE float32/float64: the contract's fp32_precision is not theirs)
KERNELS = fused.define_custom_ops(
    "cpp",
    qkv_forward=lambda *args: _ext().gaussian_axial_qkv_forward(*args[:4]),
    qkv_backward=lambda *args: _ext().gaussian_axial_qkv_backward(*args[:7]),
    scores_forward=lambda *args: _ext().gaussian_axial_scores_forward(*args[:4]),
    scores_backward=lambda *args: _ext().gaussian_axial_scores_backward(*args[:5]))
(gaussian_axial_cpp_qkv_fwd, gaussian_axial_cpp_qkv_bwd, gaussian_axial_cpp_scores_fwd,
 gaussian_axial_cpp_scores_bwd) = KERNELS


# --- eager fast path ---
# The custom ops above are what torch.compile traces (and what opcheck checks). In eager mode their
# dispatch — custom-op wrappers around the forward and the backward, a Python autograd node —
# costs ~250 µs per forward+backward, a quarter of the whole call at MT-UNet's sizes (the kernels
# themselves take ~0.7 ms at B=2, 14×14, D=512). Eager calls therefore go through this plain
# autograd.Function around the same extension functions (same results, bit for bit: tested).

class _ScoresEager(torch.autograd.Function):
    @staticmethod
    def forward(ctx, atten_x, atten_y, v, shift):
        ctx.save_for_backward(atten_x, atten_y, v, shift)
        return _ext().gaussian_axial_scores_forward(atten_x, atten_y, v, shift)

    @staticmethod
    def backward(ctx, grad_out):
        return tuple(_ext().gaussian_axial_scores_backward(grad_out, *ctx.saved_tensors))


class _QkvEager(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, shift):
        out, lse_rows, lse_cols = _ext().gaussian_axial_qkv_forward(q, k, v, shift)
        ctx.save_for_backward(q, k, v, shift, lse_rows, lse_cols)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return tuple(_ext().gaussian_axial_qkv_backward(grad_out, *ctx.saved_tensors))


def _cpp_scores(atten_x, atten_y, v, shift, *, bias=None):
    shift = with_inert(shift, bias)
    if torch.compiler.is_compiling():
        return gaussian_axial_cpp_scores_fwd(atten_x, atten_y, v, shift, None)
    return _ScoresEager.apply(atten_x, atten_y, v, shift)


def _cpp_qkv(q, k, v, shift, *, bias=None):
    shift = with_inert(shift, bias)
    if torch.compiler.is_compiling():
        return gaussian_axial_cpp_qkv_fwd(q, k, v, shift, None)[0]
    return _QkvEager.apply(q, k, v, shift)


def register(op_qkv: B.Op, op_scores: B.Op) -> None:
    """Adds the ``cpp`` backend to both dispatchers of the family (called by ``medattn_fast.ops``)."""
    op_qkv.register("cpp")(_cpp_qkv)
    op_scores.register("cpp")(_cpp_scores)
