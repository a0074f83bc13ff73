"""The guided attention blocks of Multi-Scale Guided Attention (Sinha & Dolz 2020), faithful to the
original: ``PositionAttentionModule``, ``ChannelAttentionModule`` and ``GuidedAttentionModule``.

The oracle for :mod:`medattn_fast.compat.guided_attention`. The N×N and C×C matrices are
materialised in the input dtype exactly as the original does. Device-agnostic, never optimised.

The public original is 3D (``nn.Conv3d``/``nn.BatchNorm3d``); here ``spatial_dims`` (kept as an
attribute) picks 2 (``nn.Conv2d``, the default) or 3 (``nn.Conv3d``), keeping the constructor
``PositionAttentionModule(in_channels)`` compatible. The state_dict keys do not depend on it, the
weight shapes do ((C', C, 1, 1) vs (C', C, 1, 1, 1)).

Quirks of the original, reproduced on purpose:

* ``PositionAttentionModule`` computes ``V @ A`` **without** transposing A, where
  ``A = softmax_j(q_i·k_j)`` is row-normalised: ``o_j = Σ_i A_ij v_i``. Each output pixel is a
  sum of values weighted by a *column* of A, which does not sum to 1 (DANet's PAM uses ``V Aᵀ``).
  This is ``position_attention(..., transpose=True)``. No 1/√d scale.
* Both modules end with a *multiplicative* epilogue and an extra 1×1 conv:
  ``output_conv(F3 * F)`` instead of DANet's ``γ·F3 + F``; there is no gamma.
* ``ChannelAttentionModule`` soft-maxes ``E = X Xᵀ`` itself (most *similar* channels weigh most),
  unlike DANet's ``rowmax(E) − E``. E is formed in the input dtype (float16 overflows).
* The reduced width is ``int(in_channels / 8)``: 0 channels for in_channels < 8, where the conv
  is built with an empty weight and its forward fails (GuidedAttentionModule still builds such a
  ``pam`` for in_channels_F + in_channels_Fms < 8, harmlessly, since pam never runs).
* ``GuidedAttentionModule`` builds ``pam`` and ``cam`` but its forward only uses ``cam``; ``pam``'s
  parameters are in the state_dict and get no gradient. Its output is
  ``attention_map_conv(_F * cam(_F)) * F`` with ``_F = cat(F, F_ms)``: attention_map_conv
  produces ``in_channels_Fms`` channels which multiply F's ``in_channels_F`` channels, so it only
  runs when the two are equal (or one of them is 1 and broadcasts).
"""
from __future__ import annotations

import torch
from torch import nn

from .attention_gate import _layers

__all__ = ["PositionAttentionModule", "ChannelAttentionModule", "GuidedAttentionModule"]


class PositionAttentionModule(nn.Module):
    """``output_conv(F3 * F)`` with ``F3 = V @ softmax(Qᵀ K, dim=-1)`` (see the module doc)."""

    def __init__(self, in_channels: int, spatial_dims: int = 2):
        super().__init__()
        conv, _, _ = _layers(spatial_dims)
        self.spatial_dims = spatial_dims
        self.first_branch_conv = conv(in_channels, int(in_channels / 8), kernel_size=1)
        self.second_branch_conv = conv(in_channels, int(in_channels / 8), kernel_size=1)
        self.third_branch_conv = conv(in_channels, in_channels, kernel_size=1)
        self.output_conv = conv(in_channels, in_channels, kernel_size=1)

    def forward(self, F: torch.Tensor) -> torch.Tensor:  # noqa: N803 (the original's name)
        queries = self.first_branch_conv(F)
        queries = queries.reshape(queries.size(0), queries.size(1), -1).transpose(-2, -1)  # (B, N, C/8)
        keys = self.second_branch_conv(F)
        keys = keys.reshape(keys.size(0), keys.size(1), -1)                                # (B, C/8, N)
        attention = torch.softmax(torch.matmul(queries, keys), dim=-1)                     # (B, N, N)
        values = self.third_branch_conv(F)
        values = values.reshape(values.size(0), values.size(1), -1)                        # (B, C, N)
        out = torch.matmul(values, attention).reshape(F.shape)   # V @ A, A not transposed (quirk)
        return self.output_conv(out * F)


class ChannelAttentionModule(nn.Module):
    """``output_conv(F3 * F)`` with ``F3 = softmax(X Xᵀ, dim=-1) @ X`` (see the module doc)."""

    def __init__(self, in_channels: int, spatial_dims: int = 2):
        super().__init__()
        self.spatial_dims = spatial_dims
        self.output_conv = _layers(spatial_dims)[0](in_channels, in_channels, kernel_size=1)

    def forward(self, F: torch.Tensor) -> torch.Tensor:  # noqa: N803
        feats = F.reshape(F.size(0), F.size(1), -1)                                         # (B, C, N)
        attention = torch.softmax(torch.matmul(feats, feats.transpose(-2, -1)), dim=-1)     # (B, C, C)
        out = torch.matmul(attention, feats).reshape(F.shape)
        return self.output_conv(out * F)


class GuidedAttentionModule(nn.Module):
    """``attention_map_conv(_F * cam(_F)) * F`` with ``_F = cat(F, F_ms)``; ``pam`` is built but
    unused (see the module doc). attention_map_conv = 1×1 conv (-> in_channels_Fms) -> BN -> ReLU.
    ``position_module``/``channel_module``: the classes built for ``pam``/``cam``."""

    position_module = PositionAttentionModule
    channel_module = ChannelAttentionModule

    def __init__(self, in_channels_F: int, in_channels_Fms: int, spatial_dims: int = 2):  # noqa: N803
        super().__init__()
        conv, norm, _ = _layers(spatial_dims)
        in_channels = in_channels_F + in_channels_Fms
        self.spatial_dims = spatial_dims
        self.pam = self.position_module(in_channels, spatial_dims)
        self.cam = self.channel_module(in_channels, spatial_dims)
        self.attention_map_conv = nn.Sequential(conv(in_channels, in_channels_Fms, kernel_size=1),
                                                norm(in_channels_Fms), nn.ReLU())

    def forward(self, F: torch.Tensor, F_ms: torch.Tensor) -> torch.Tensor:  # noqa: N803
        joint = torch.cat((F, F_ms), dim=1)
        attended = self.cam(joint)               # only the channel branch is used (quirk)
        return self.attention_map_conv(joint * attended) * F
