r"""The contract of Gaussian axial attention's fused backends (``cpp``, ``triton``), written once: the
four custom ops of a backend, their fake kernels and autograd, around that backend's kernels.

* ``medattn::gaussian_axial_<backend>_qkv_fwd(q, k, v, shift, fp32_precision?) -> (out, lse_rows, lse_cols)``:
  q, k, v (B, H, W, D) -> out (B, H, W, D) and the per-pixel row and column log-sum-exp (B, H, W)
  in the accumulation dtype (float32; float64 for float64 inputs) — all the backward keeps besides
  the inputs (the W×W and H×H score maps are never stored, in either pass);
* ``..._qkv_bwd(grad_out, q, k, v, shift, lse_rows, lse_cols, fp32_precision?) -> (dq, dk, dv, dshift)``;
* ``..._scores_fwd(atten_x, atten_y, v, shift, fp32_precision?) -> out`` (GaussianTrans's
  interface: atten_x (B, H, W, W), atten_y (B, W, H, H));
* ``..._scores_bwd(grad_out, atten_x, atten_y, v, shift, fp32_precision?) -> (d_atten_x, d_atten_y, dv,
  dshift)``.

``fp32_precision``: the :class:`medattn_fast.KernelConfig`'s in force at the call (how tensor-core
dots multiply float32 tiles; the C++ kernels multiply in IEEE float32/float64 and ignore it).

θ (``shift``) is a tensor argument (read by the kernels, never ``.item()``): no host sync and no
recompile when it trains; its gradient is a fixed-order sum (deterministic). The ``bias`` of the
original never reaches the kernels: it cancels in both softmaxes, and the dispatcher entry gives it
its exactly-zero gradient (``_custom_op.with_inert``).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ._custom_op import accumulation_dtype, kernel_op

__all__ = ["AxialKernels", "define_custom_ops"]


class AxialKernels(NamedTuple):
    """The four custom ops of one backend (see the module docstring)."""

    qkv_forward: Callable
    qkv_backward: Callable
    scores_forward: Callable
    scores_backward: Callable


def define_custom_ops(backend: str, qkv_forward: Callable, qkv_backward: Callable, scores_forward: Callable,
                      scores_backward: Callable) -> AxialKernels:
    """The custom ops of ``backend`` around its kernel calls, which take and return the ops'
    arguments and results (as listed in the module docstring, ``fp32_precision`` last)."""
    name = f"medattn::gaussian_axial_{backend}"
    # the Triton backend's ops are triton_ops on a GPU (their launches traced by torch.compile)
    define = (kernel_op if backend == "triton" else
              (lambda op_name, mutates_args: torch.library.custom_op(op_name, mutates_args=mutates_args)))

    @define(f"{name}_qkv_fwd", mutates_args=())
    def qkv_fwd(q: Tensor, k: Tensor, v: Tensor, shift: Tensor,
                fp32_precision: Optional[str]) -> Tuple[Tensor, Tensor, Tensor]:
        out, lse_rows, lse_cols = qkv_forward(q, k, v, shift, fp32_precision)
        return out, lse_rows, lse_cols

    @qkv_fwd.register_fake
    def _(q, k, v, shift, fp32_precision):
        stats = q.new_empty(q.shape[:3], dtype=accumulation_dtype(q.dtype))
        return v.new_empty(v.shape), stats, stats.new_empty(stats.shape)

    @define(f"{name}_qkv_bwd", mutates_args=())
    def qkv_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, shift: Tensor, lse_rows: Tensor,
                lse_cols: Tensor, fp32_precision: Optional[str]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        dq, dk, dv, d_shift = qkv_backward(grad_out, q, k, v, shift, lse_rows, lse_cols, fp32_precision)
        return dq, dk, dv, d_shift

    @qkv_bwd.register_fake
    def _(grad_out, q, k, v, shift, lse_rows, lse_cols, fp32_precision):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), shift.new_empty(shift.shape)

    def qkv_setup(ctx, inputs, output):
        _, lse_rows, lse_cols = output
        ctx.mark_non_differentiable(lse_rows, lse_cols)
        ctx.save_for_backward(*inputs[:4], lse_rows, lse_cols)
        ctx.fp32_precision = inputs[4]

    def qkv_differentiate(ctx, grad_out, _grad_lse_rows, _grad_lse_cols):
        return (*qkv_bwd(grad_out, *ctx.saved_tensors, ctx.fp32_precision), None)

    qkv_fwd.register_autograd(qkv_differentiate, setup_context=qkv_setup)

    @define(f"{name}_scores_fwd", mutates_args=())
    def scores_fwd(atten_x: Tensor, atten_y: Tensor, v: Tensor, shift: Tensor, fp32_precision: Optional[str]) -> Tensor:
        return scores_forward(atten_x, atten_y, v, shift, fp32_precision)

    @scores_fwd.register_fake
    def _(atten_x, atten_y, v, shift, fp32_precision):
        return v.new_empty(v.shape)

    @define(f"{name}_scores_bwd", mutates_args=())
    def scores_bwd(grad_out: Tensor, atten_x: Tensor, atten_y: Tensor, v: Tensor, shift: Tensor,
                   fp32_precision: Optional[str]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        d_atten_x, d_atten_y, dv, d_shift = scores_backward(grad_out, atten_x, atten_y, v, shift, fp32_precision)
        return d_atten_x, d_atten_y, dv, d_shift

    @scores_bwd.register_fake
    def _(grad_out, atten_x, atten_y, v, shift, fp32_precision):
        return (atten_x.new_empty(atten_x.shape), atten_y.new_empty(atten_y.shape), v.new_empty(v.shape),
                shift.new_empty(shift.shape))

    def scores_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:4])
        ctx.fp32_precision = inputs[4]

    def scores_differentiate(ctx, grad_out):
        return (*scores_bwd(grad_out, *ctx.saved_tensors, ctx.fp32_precision), None)

    scores_fwd.register_autograd(scores_differentiate, setup_context=scores_setup)
    return AxialKernels(qkv_fwd, qkv_bwd, scores_fwd, scores_bwd)
