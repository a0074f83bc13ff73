r"""Gaussian-weighted axial attention (MT-UNet ``GaussianTrans``).

For batch b and pixel (r, c) of an H×W grid, with θ = ``shift``::

    px[j] = softmax_j(Sx[b, r, c, j] − θ (j − c)²)     j < W      (along the pixel's row)
    py[i] = softmax_i(Sy[b, c, r, i] − θ (i − r)²)     i < H      (along the pixel's column)
    out[b, r, c] = Σ_j px[j] v[b, r, j] + Σ_i py[i] v[b, i, c]

Two entry points:

* :func:`gaussian_axial_from_scores` takes the scores as GaussianTrans receives them,
  Sx = ``atten_x`` (B, H, W, W) and Sy = ``atten_y`` (B, W, H, H) (drop-in for the original);
* :func:`gaussian_axial_attention` takes q, k, v (B, H, W, D) and uses
  Sx[b,r,c,j] = q[b,r,c]·k[b,r,j], Sy[b,c,r,i] = q[b,r,c]·k[b,i,c] (MT-UNet's single-head axial
  scores, no 1/√D); the fused kernel never stores the score maps.

The original's ``bias`` parameter is added to every logit of both softmaxes and so cancels: it may
be passed as ``bias=`` (checkpoints have it) and then receives a gradient of exactly zero.

Backends: ``reference`` (the per-pixel loop of :mod:`medattn_fast.reference.gaussian_trans`),
``torch`` (vectorised: both softmaxes and two batched matmuls, no loop over pixels) and ``cpp``
(fused kernels of ``csrc/cpu/gaussian_axial.cpp``, registered below as ``medattn::`` custom ops
with fake kernels and autograd, so they work under ``torch.compile(fullgraph=True)``) and
``triton`` (fused kernels of ``triton_kernels/gaussian_axial.py``, custom ops in ``_gaussian_axial_triton``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backend as B
from . import _validate as V
from ._custom_op import with_inert
from ._families import dispatcher

__all__ = ["gaussian_axial_attention", "gaussian_axial_from_scores"]

_QKV = "gaussian_axial_attention"
_SCORES = "gaussian_axial_from_scores"

# their row in ops/_families.py: auto orders, export backend, limits
_op_qkv = dispatcher("gaussian_axial")
_op_scores = dispatcher("gaussian_axial_from_scores")


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------

def _check_scalars(op: str, like: Tensor, shift, bias) -> None:
    V.scalar_param(op, "shift", shift, dtype_like=like)
    if bias is not None:
        V.scalar_param(op, "bias", bias, dtype_like=like)


def _check_qkv(q, k, v, shift, bias) -> None:
    V.tensor(_QKV, "q", q, 4)
    V.tensor(_QKV, "k", k, 4)
    V.tensor(_QKV, "v", v, 4)
    V.shape(_QKV, "k", k, tuple(q.shape), names="q.shape (B, H, W, D)")
    V.shape(_QKV, "v", v, tuple(q.shape), names="q.shape (B, H, W, D)")
    V.same_device_dtype(_QKV, q=q, k=k, v=v)
    _check_scalars(_QKV, q, shift, bias)


def _check_scores(atten_x, atten_y, v, shift, bias) -> None:
    V.tensor(_SCORES, "v", v, 4)
    V.tensor(_SCORES, "atten_x", atten_x, 4)
    V.tensor(_SCORES, "atten_y", atten_y, 4)
    b, h, w, _ = v.shape
    V.shape(_SCORES, "atten_x", atten_x, (b, h, w, w), names="(B, H, W, W) from v")
    V.shape(_SCORES, "atten_y", atten_y, (b, w, h, h), names="(B, W, H, H) from v")
    V.same_device_dtype(_SCORES, v=v, atten_x=atten_x, atten_y=atten_y)
    _check_scalars(_SCORES, v, shift, bias)


# ---------------------------------------------------------------------------------------------
# reference backend: the original's per-pixel loop
# ---------------------------------------------------------------------------------------------

def _detached(bias: Optional[Tensor]) -> Optional[Tensor]:
    return None if bias is None else bias.detach()


@_op_scores.register("reference")
def _reference_scores(atten_x, atten_y, v, shift, *, bias=None):
    from ..reference.gaussian_trans import gaussian_trans_loop

    return gaussian_trans_loop(atten_x, atten_y, v, with_inert(shift, bias), _detached(bias))


@_op_qkv.register("reference")
def _reference_qkv(q, k, v, shift, *, bias=None):
    from ..reference.gaussian_trans import gaussian_axial_from_qkv_reference

    return gaussian_axial_from_qkv_reference(q, k, v, with_inert(shift, bias), _detached(bias))


# ---------------------------------------------------------------------------------------------
# torch backend: vectorised, no loop over pixels
# ---------------------------------------------------------------------------------------------

def _squared_distances(n: int, device, dtype) -> Tensor:
    """(n, n) matrix of (key − query)²."""
    idx = torch.arange(n, device=device, dtype=dtype)
    return (idx[None, :] - idx[:, None]).square()


def _torch_from_scores(atten_x: Tensor, atten_y: Tensor, v: Tensor, shift: Tensor) -> Tensor:
    """Both softmaxes over whole score maps, then two batched matmuls (fp32 softmax for fp16/bf16)."""
    _, h, w, _ = v.shape
    compute = torch.promote_types(v.dtype, torch.float32)
    theta = shift.reshape(()).to(compute)
    prob_x = torch.softmax(atten_x.to(compute) - theta * _squared_distances(w, v.device, compute), dim=-1)
    prob_y = torch.softmax(atten_y.to(compute) - theta * _squared_distances(h, v.device, compute), dim=-1)
    along_rows = torch.matmul(prob_x.to(v.dtype), v)                   # (B, H, W, D)
    along_cols = torch.matmul(prob_y.to(v.dtype), v.transpose(1, 2))  # (B, W, H, D)
    return along_rows + along_cols.transpose(1, 2)


def _torch_axial_scores(q: Tensor, k: Tensor) -> Tuple[Tensor, Tensor]:
    """Row scores (B, H, W, W) and column scores (B, W, H, H) as batched matmuls."""
    atten_x = torch.matmul(q, k.transpose(-1, -2))
    atten_y = torch.matmul(q.transpose(1, 2), k.transpose(1, 2).transpose(-1, -2))
    return atten_x, atten_y


@_op_scores.register("torch")
def _torch_scores(atten_x, atten_y, v, shift, *, bias=None):
    return _torch_from_scores(atten_x, atten_y, v, with_inert(shift, bias))


@_op_qkv.register("torch")
def _torch_qkv(q, k, v, shift, *, bias=None):
    atten_x, atten_y = _torch_axial_scores(q, k)
    return _torch_from_scores(atten_x, atten_y, v, with_inert(shift, bias))


# ---------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------

@B.autocast_entry()
def gaussian_axial_attention(q: Tensor, k: Tensor, v: Tensor, shift: Tensor, *, bias: Optional[Tensor] = None,
                             backend: Optional[str] = None) -> Tensor:
    r"""Gaussian-weighted axial attention from q, k, v: MT-UNet's ``GaussianTrans`` (Wang et al.,
    "Mixed Transformer U-Net for Medical Image Segmentation", ICASSP 2022), fused.

    Each pixel attends to its own row and its own column, with a Gaussian distance penalty
    θ·(distance)² on the logits; MT-UNet's single-head scores q·k (no 1/√D).

    ``out[b,r,c] = Σ_j softmax_j(q[b,r,c]·k[b,r,j] − θ(j−c)²) v[b,r,j]
    + Σ_i softmax_i(q[b,r,c]·k[b,i,c] − θ(i−r)²) v[b,i,c]``, θ = ``shift``.

    Args:
        q, k, v: (B, H, W, D), one dtype (float32/float16/bfloat16/float64), one device, any strides.
            H ≠ W is allowed.
        shift: θ, a 0-dim or (1,) floating tensor on the same device (any float dtype).
        bias: optional 0-dim or (1,) tensor: GaussianTrans's ``bias``, which cancels in both
            softmaxes; it does not change the result and its gradient is exactly zero.
        backend: force a backend for this call (``reference``, ``torch``, ``cpp``, ``triton``);
            default: the one in force (see :mod:`medattn_fast.backend`).

    Returns:
        (B, H, W, D) in the dtype of v. The ``cpp`` backend accumulates in float32 (float64 for
        float64 inputs) and keeps only per-pixel softmax statistics for the backward pass.
    """
    _check_qkv(q, k, v, shift, bias)
    return _op_qkv(q, k, v, shift, bias=bias, backend=backend)


@B.autocast_entry()
def gaussian_axial_from_scores(atten_x: Tensor, atten_y: Tensor, v: Tensor, shift: Tensor, *,
                               bias: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    r"""Gaussian-weighted axial attention from precomputed scores: the interface of MT-UNet's
    ``GaussianTrans`` (Wang et al., ICASSP 2022), which receives the row and column scores.

    ``out[b,r,c] = Σ_j softmax_j(atten_x[b,r,c,j] − θ(j−c)²) v[b,r,j]
    + Σ_i softmax_i(atten_y[b,c,r,i] − θ(i−r)²) v[b,i,c]``, θ = ``shift``.

    Args:
        atten_x: (B, H, W, W) row scores: pixel (r, c) against (r, j).
        atten_y: (B, W, H, H) column scores: pixel (r, c) against (i, c).
        v: (B, H, W, D) values; atten_x, atten_y and v share dtype and device, any strides.
        shift: θ, a 0-dim or (1,) floating tensor on the same device.
        bias: optional GaussianTrans ``bias`` (cancels; gradient exactly zero).
        backend: force a backend for this call.

    Returns:
        (B, H, W, D) in the dtype of v. Works for H ≠ W (the original only for H == W).
    """
    _check_scores(atten_x, atten_y, v, shift, bias)
    return _op_scores(atten_x, atten_y, v, shift, bias=bias, backend=backend)
