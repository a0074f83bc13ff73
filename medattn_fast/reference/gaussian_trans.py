"""Faithful MT-UNet ``GaussianTrans``: Gaussian-weighted axial attention as a per-pixel loop.

This is the oracle of the ``gaussian_axial`` op family (the math: :func:`gaussian_trans_loop`). It
reproduces the original's math and evaluation order pixel by pixel and is slow on purpose: never optimise it.

Quirks of the original (Dootmaan/MT-UNet, ``MTUNet.py``, class ``GaussianTrans``), kept or named:

* **bias cancels.** β is added to every logit of a softmax, so it cancels in both softmaxes; its
  gradient is mathematically 0 (autograd through this loop returns rounding-level values). It stays
  a parameter because MT-UNet checkpoints contain it.
* **square-only summation.** The original adds the two weighted value sets elementwise *before*
  reducing, ``sum(px[:, None] * v[r, :] + py[:, None] * v[:, c], dim=-2)``: a (W, D) plus an
  (H, D) tensor, which only broadcasts when H == W. Everything else in the loop indexes correctly
  for H ≠ W (rows from ``x.shape[1]``, columns from ``x.shape[2]``; ``dis_x`` over range(W) even
  though its loop variable is named ``h``). Here, when H == W the original's order (add, then
  sum) is reproduced bit for bit; when H ≠ W the two sums are reduced separately, which is the
  same mathematics.
* **.cuda() everywhere.** The original builds the distance tensors with ``torch.tensor(...)`` on
  the host and moves them with ``.cuda()`` in every iteration (a host-to-device copy per pixel).
  Here they are built on the inputs' device, so the oracle runs anywhere.
* **the distance weights take the parameter's dtype.** ``shift * dis + bias`` is computed in the
  dtype of the parameters (float32 in MT-UNet) and then type-promoted with the scores, as in the
  original.
* **no channel axis on the scores.** The original's comments say ``atten_x_full (b, h, w, w, c)``;
  the tensors MT-UNet passes are (B, H, W, W) and (B, W, H, H) (single-head axial attention).
* **x is only used for its shape.** The first tuple element (the DlightConv output, (B, H, W, C))
  sets the loop bounds; in MT-UNet ``x.shape[1:3] == value.shape[1:3]``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

__all__ = ["gaussian_trans_loop", "GaussianTrans", "axial_scores_reference", "gaussian_axial_from_qkv_reference"]


def _loop(rows: int, cols: int, atten_x: torch.Tensor, atten_y: torch.Tensor, value: torch.Tensor,
          shift: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The original's double loop, bounds given explicitly (the module takes them from ``x``)."""
    out = torch.zeros_like(value)
    for r in range(rows):
        for c in range(cols):
            scores_x = atten_x[:, r, c, :]  # (B, W)
            scores_y = atten_y[:, c, r, :]  # (B, H)
            # Squared distances to the current column / row, built on the inputs' device
            # (the original: torch.tensor([...]).cuda() in every iteration).
            dist_x = torch.tensor([(j - c) ** 2 for j in range(cols)], device=value.device)
            dist_y = torch.tensor([(i - r) ** 2 for i in range(rows)], device=value.device)
            weight_x = -(shift * dist_x + bias)
            weight_y = -(shift * dist_y + bias)
            prob_x = torch.softmax(weight_x + scores_x, dim=-1)  # (B, W)
            prob_y = torch.softmax(weight_y + scores_y, dim=-1)  # (B, H)
            along_row = prob_x.unsqueeze(-1) * value[:, r, :, :]  # (B, W, D)
            along_col = prob_y.unsqueeze(-1) * value[:, :, c, :]  # (B, H, D)
            if rows == cols:  # the original's order: add elementwise, then reduce
                out[:, r, c, :] = torch.sum(along_row + along_col, dim=-2)
            else:  # the original fails to broadcast here; same math, reduced separately
                out[:, r, c, :] = torch.sum(along_row, dim=-2) + torch.sum(along_col, dim=-2)
    return out


def gaussian_trans_loop(atten_x: torch.Tensor, atten_y: torch.Tensor, value: torch.Tensor,
                        shift: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""Gaussian-weighted axial attention, one pixel at a time (the oracle).

    Args:
        atten_x: (B, H, W, W) row scores, ``atten_x[b, r, c, j]`` = score of pixel (r, c) for (r, j).
        atten_y: (B, W, H, H) column scores, ``atten_y[b, c, r, i]`` = score of (r, c) for (i, c).
        value: (B, H, W, D).
        shift: θ, a 0-dim or (1,) tensor (learnable in MT-UNet).
        bias: β, a 0-dim or (1,) tensor, or None for 0. Cancels inside both softmaxes.

    Returns:
        (B, H, W, D): ``out[b,r,c] = Σ_j softmax_j(atten_x[b,r,c,j] − θ(j−c)² − β) v[b,r,j]
        + Σ_i softmax_i(atten_y[b,c,r,i] − θ(i−r)² − β) v[b,i,c]``.

    Works for H ≠ W (see the module docstring for the original's square-only summation).
    """
    if bias is None:
        bias = torch.zeros((), dtype=shift.dtype, device=shift.device)
    _, rows, cols, _ = value.shape
    return _loop(rows, cols, atten_x, atten_y, value, shift, bias)


class GaussianTrans(nn.Module):
    """MT-UNet's ``GaussianTrans``, faithful to the original and device-agnostic.

    Parameters (names and initialisation as in the original, so checkpoints load):
        ``bias``: ``-|randn(1)|`` (cancels in the softmaxes; kept for the checkpoints),
        ``shift``: ``|randn(1)|`` (θ, the strength of the Gaussian distance penalty).

    ``forward((x, atten_x, atten_y, value))``: x (B, H, W, C) only gives the loop bounds,
    atten_x (B, H, W, W), atten_y (B, W, H, H), value (B, H, W, D) -> (B, H, W, D).
    """

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(-torch.abs(torch.randn(1)))
        self.shift = nn.Parameter(torch.abs(torch.randn(1)))
        self.softmax = nn.Softmax(dim=-1)  # unused by our loop; kept so the module mirrors the original

    def forward(self, x: Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, atten_x, atten_y, value = x
        return _loop(x.shape[1], x.shape[2], atten_x, atten_y, value, self.shift, self.bias)


def axial_scores_reference(q: torch.Tensor, k: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """MT-UNet's single-head axial scores (``Attention(axial=True)``), with plain matmuls.

    q, k: (B, H, W, D) -> atten_x (B, H, W, W) = q kᵀ along each row, atten_y (B, W, H, H) = q kᵀ
    along each column. No 1/√D scaling (the original has none for the axial scores).
    """
    b, h, w, _ = q.shape
    atten_x = torch.matmul(q.reshape(b * h, w, -1), k.reshape(b * h, w, -1).transpose(-1, -2)).view(b, h, w, w)
    q_cols = q.permute(0, 2, 1, 3).reshape(b * w, h, -1)
    k_cols = k.permute(0, 2, 1, 3).reshape(b * w, h, -1)
    atten_y = torch.matmul(q_cols, k_cols.transpose(-1, -2)).view(b, w, h, h)
    return atten_x, atten_y


def gaussian_axial_from_qkv_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shift: torch.Tensor,
                                      bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""The from-q,k,v form of the op: axial scores by plain matmuls, then the per-pixel loop.

    q, k, v: (B, H, W, D); shift (and optional bias) 0-dim or (1,) -> (B, H, W, D)::

        out[r,c] = Σ_j softmax_j(q[r,c]·k[r,j] − θ(j−c)²) v[r,j] + Σ_i softmax_i(q[r,c]·k[i,c] − θ(i−r)²) v[i,c]
    """
    atten_x, atten_y = axial_scores_reference(q, k)
    return gaussian_trans_loop(atten_x, atten_y, v, shift, bias)
