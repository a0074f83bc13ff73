"""Multi-Scale Guided Attention's (Sinha & Dolz 2020) ``PositionAttentionModule``,
``ChannelAttentionModule`` and ``GuidedAttentionModule`` with the original names, constructor signatures and state_dict keys, fast inside::

    from medattn_fast.compat.guided_attention import GuidedAttentionModule

``spatial_dims`` (keyword, default 2) picks Conv2d/BatchNorm2d or Conv3d/BatchNorm3d, as in
:mod:`medattn_fast.reference.guided_attention`; ``from_original`` reads it off the weights.

* ``PositionAttentionModule``: the original's ``V @ A`` (A row-softmaxed, *not* transposed) is
  ``position_attention(..., transpose=True)``; the N×N matrix is never stored and the ``F3 * F``
  product is the op's ``multiply`` epilogue.
* ``ChannelAttentionModule``: ``channel_attention(F, negate=False, multiply=F)`` (softmax of E
  itself, E in float32).
* ``GuidedAttentionModule``: like the original, only ``cam`` is used; ``pam`` is built (its
  parameters load and save) and never called.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import functional as MF
from ._adopt import adopt

__all__ = ["PositionAttentionModule", "ChannelAttentionModule", "GuidedAttentionModule", "COMPAT_CLASSES"]


def _conv(spatial_dims: int):
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    return nn.Conv2d if spatial_dims == 2 else nn.Conv3d


def _check_input(name: str, x, spatial_dims: int, arg: str = "F") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: argument '{arg}' must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != spatial_dims + 2:
        want = "(B, C, H, W)" if spatial_dims == 2 else "(B, C, D, H, W)"
        raise ValueError(f"{name}: argument '{arg}' must be {want} (spatial_dims={spatial_dims}), "
                         f"got shape {tuple(x.shape)}")


class PositionAttentionModule(nn.Module):
    """``output_conv(F3 * F)``, ``F3 = V @ softmax(Qᵀ K)`` (column-weighted, no N×N matrix)."""

    def __init__(self, in_channels: int, spatial_dims: int = 2):
        super().__init__()
        conv = _conv(spatial_dims)
        self.spatial_dims = spatial_dims
        self.first_branch_conv = conv(in_channels, int(in_channels / 8), kernel_size=1)
        self.second_branch_conv = conv(in_channels, int(in_channels / 8), kernel_size=1)
        self.third_branch_conv = conv(in_channels, in_channels, kernel_size=1)
        self.output_conv = conv(in_channels, in_channels, kernel_size=1)
        self.chunk_size = None

    def forward(self, F: torch.Tensor) -> torch.Tensor:  # noqa: N803
        _check_input(type(self).__name__, F, self.spatial_dims)
        attended = MF.position_attention(
            self.first_branch_conv(F).flatten(2), self.second_branch_conv(F).flatten(2),
            self.third_branch_conv(F).flatten(2), transpose=True, layout="channels",
            multiply=F.flatten(2), chunk_size=self.chunk_size,
        )
        return self.output_conv(attended.reshape(F.shape))

    @classmethod
    def from_original(cls, module: nn.Module) -> "PositionAttentionModule":
        w = module.third_branch_conv.weight
        return adopt(cls(w.shape[1], spatial_dims=w.dim() - 2), module)


class ChannelAttentionModule(nn.Module):
    """``output_conv(F3 * F)``, ``F3 = softmax(X Xᵀ) X`` (E accumulated in float32)."""

    def __init__(self, in_channels: int, spatial_dims: int = 2):
        super().__init__()
        self.spatial_dims = spatial_dims
        self.output_conv = _conv(spatial_dims)(in_channels, in_channels, kernel_size=1)

    def forward(self, F: torch.Tensor) -> torch.Tensor:  # noqa: N803
        _check_input(type(self).__name__, F, self.spatial_dims)
        return self.output_conv(MF.channel_attention(F, negate=False, multiply=F))

    @classmethod
    def from_original(cls, module: nn.Module) -> "ChannelAttentionModule":
        w = module.output_conv.weight
        return adopt(cls(w.shape[1], spatial_dims=w.dim() - 2), module)


class GuidedAttentionModule(nn.Module):
    """``attention_map_conv(_F * cam(_F)) * F`` with ``_F = cat(F, F_ms)``; ``pam`` built, unused.
    Needs in_channels_Fms == in_channels_F (or one of them 1) for the final product, like the original."""

    def __init__(self, in_channels_F: int, in_channels_Fms: int, spatial_dims: int = 2):  # noqa: N803
        super().__init__()
        in_channels = in_channels_F + in_channels_Fms
        self.spatial_dims = spatial_dims
        self.pam = PositionAttentionModule(in_channels, spatial_dims)
        self.cam = ChannelAttentionModule(in_channels, spatial_dims)
        self.attention_map_conv = nn.Sequential(
            _conv(spatial_dims)(in_channels, in_channels_Fms, kernel_size=1),
            (nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d)(in_channels_Fms),
            nn.ReLU(),
        )

    def forward(self, F: torch.Tensor, F_ms: torch.Tensor) -> torch.Tensor:  # noqa: N803
        name = type(self).__name__
        _check_input(name, F, self.spatial_dims, "F")
        _check_input(name, F_ms, self.spatial_dims, "F_ms")
        joint = torch.cat((F, F_ms), dim=1)
        return self.attention_map_conv(joint * self.cam(joint)) * F

    @classmethod
    def from_original(cls, module: nn.Module) -> "GuidedAttentionModule":
        w = module.attention_map_conv[0].weight           # (Fms, F + Fms, 1, 1[, 1])
        fms, total = w.shape[0], w.shape[1]
        return adopt(cls(total - fms, fms, spatial_dims=w.dim() - 2), module)


COMPAT_CLASSES = {
    "PositionAttentionModule": PositionAttentionModule,
    "ChannelAttentionModule": ChannelAttentionModule,
    "GuidedAttentionModule": GuidedAttentionModule,
}
