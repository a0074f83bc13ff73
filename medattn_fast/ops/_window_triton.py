r"""The ``triton`` backend of window attention: custom ops around ``triton_kernels.window``.

The backend is three steps; only the middle one is a custom op, the GEMMs stay ATen (cuBLAS) and
their gradients are ordinary autograd::

    qkv = x [W_q; W_k; W_v]ᵀ + [b_q; b_k; b_v]      one GEMM on the unpadded grid (B, H, W, 3A)
    o   = medattn::window_triton_fwd(qkv, qkv_bias, ...)     windows, heads, padding
    out = o W_oᵀ + b_o                               one GEMM, in the requested layout

* ``medattn::window_triton_fwd(qkv, qkv_bias?, window_size, num_heads, pad_mode, layout,
  fp32_precision?) -> o`` (``fp32_precision``: the :class:`medattn_fast.KernelConfig`'s in force); the bias is an input because zero-padded tokens' q/k/v *are* the biases.
* ``medattn::window_triton_bwd(grad_o, qkv, qkv_bias?, ...) -> [dqkv, dqkv_bias]``
  (``dqkv_bias`` empty without a bias): probabilities recomputed, nothing saved but the inputs.

MT-UNet's DlightConv aggregation is not fused into the kernel's epilogue: it reads the windows
after the output projection (all heads of a token), and the local branch needs the windows anyway;
see ``triton_kernels/window.py`` for the accounting.

Reasons the backend cannot run a call: the generic Triton ones (device, dtype), a head dim above
``MAX_HEAD_DIM`` = 128 or a window above ``MAX_WINDOW`` = 8 (the tiles live in registers), and a
batch above 65535 (the grid's third axis).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backend as B
from ..kernel_config import kernel_config
from ._custom_op import kernel_op, or_empty, triton_module

_kernels = triton_module("window")


def _layout_shape(batch, H, W, channels, ws, layout):
    hp, wp = H + (-H) % ws, W + (-W) % ws
    if layout == "grid":
        return (batch, H, W, channels)
    if layout == "padded":
        return (batch, hp, wp, channels)
    return (batch, hp // ws, wp // ws, ws * ws, channels)


@kernel_op("medattn::window_triton_fwd", mutates_args=())
def window_triton_fwd(qkv: Tensor, qkv_bias: Optional[Tensor], window_size: int, num_heads: int, pad_mode: str,
                      layout: str, fp32_precision: Optional[str]) -> Tensor:
    """o (heads concatenated) in ``layout`` from the (B, H, W, 3A) projection."""
    return _kernels().window_forward(qkv, qkv_bias, window_size=window_size, num_heads=num_heads,
                                     pad_mode=pad_mode, layout=layout, fp32_precision=fp32_precision)


@window_triton_fwd.register_fake
def _(qkv, qkv_bias, window_size, num_heads, pad_mode, layout, fp32_precision):
    batch, H, W, three_a = qkv.shape
    return qkv.new_empty(_layout_shape(batch, H, W, three_a // 3, window_size, layout))


@kernel_op("medattn::window_triton_bwd", mutates_args=())
def window_triton_bwd(grad_o: Tensor, qkv: Tensor, qkv_bias: Optional[Tensor], window_size: int, num_heads: int,
                      pad_mode: str, layout: str, fp32_precision: Optional[str]) -> List[Tensor]:
    """[dqkv (B, H, W, 3A), dqkv_bias (3A,) — the zero-padded tokens' share; empty without a bias]."""
    dqkv, d_bias = _kernels().window_backward(grad_o, qkv, qkv_bias, window_size=window_size, num_heads=num_heads,
                                              pad_mode=pad_mode, layout=layout, fp32_precision=fp32_precision)
    return [dqkv, or_empty(d_bias, qkv)]


@window_triton_bwd.register_fake
def _(grad_o, qkv, qkv_bias, window_size, num_heads, pad_mode, layout, fp32_precision):
    return [qkv.new_empty(qkv.shape),
            qkv_bias.new_empty(qkv_bias.shape) if qkv_bias is not None else qkv.new_empty((0,))]


def _setup_context(ctx, inputs, output):
    qkv, qkv_bias, *launch = inputs
    ctx.save_for_backward(qkv, qkv_bias)
    ctx.launch = launch   # window_size, num_heads, pad_mode, layout, fp32_precision


def _backward(ctx, grad_o):
    qkv, qkv_bias = ctx.saved_tensors
    dqkv, d_bias = window_triton_bwd(grad_o, qkv, qkv_bias, *ctx.launch)
    return dqkv, (d_bias if qkv_bias is not None else None), None, None, None, None, None


window_triton_fwd.register_autograd(_backward, setup_context=_setup_context)


def _triton(x, query_weight, query_bias, key_weight, key_bias, value_weight, value_bias, proj_weight, proj_bias,
            *, window_size, num_heads, pad_mode, layout):
    """Projection GEMM, fused window attention core, output GEMM (see the module docstring)."""
    qkv_weight = torch.cat((query_weight, key_weight, value_weight), dim=0)
    biases = (query_bias, key_bias, value_bias)
    qkv_bias = None
    if any(b is not None for b in biases):
        A = query_weight.shape[0]
        qkv_bias = torch.cat([b if b is not None else query_weight.new_zeros(A) for b in biases])
    qkv = F.linear(x, qkv_weight, qkv_bias)   # (B, H, W, 3A): the unpadded grid only
    o = window_triton_fwd(qkv, qkv_bias, int(window_size), int(num_heads), pad_mode, layout,
                          kernel_config().fp32_precision)
    return F.linear(o, proj_weight, proj_bias)


def register(op: B.Op) -> None:
    """Adds the ``triton`` backend to ``op``, the family's dispatcher (called by ``medattn_fast.ops``)."""
    op.register("triton")(_triton)
