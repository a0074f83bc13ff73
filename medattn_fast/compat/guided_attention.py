"""Multi-Scale Guided Attention's (Sinha & Dolz 2020) ``PositionAttentionModule``,
``ChannelAttentionModule`` and ``GuidedAttentionModule`` with the original names, constructor
signatures and state_dict keys — subclasses of :mod:`medattn_fast.reference.guided_attention`'s
classes, so the keys hold by construction — fast inside::

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
from ..reference import guided_attention as R
from ._adopt import adopt

__all__ = ["PositionAttentionModule", "ChannelAttentionModule", "GuidedAttentionModule", "COMPAT_CLASSES"]


def _check_input(module: nn.Module, x, arg: str = "F") -> None:
    name, spatial_dims = type(module).__name__, module.spatial_dims
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: argument '{arg}' must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != spatial_dims + 2:
        want = "(B, C, H, W)" if spatial_dims == 2 else "(B, C, D, H, W)"
        raise ValueError(f"{name}: argument '{arg}' must be {want} (spatial_dims={spatial_dims}), "
                         f"got shape {tuple(x.shape)}")


class _SpatialDims:
    @property
    def spatial_dims(self) -> int:
        """2 or 3, from the convolutions (the original's constructor does not keep it)."""
        return next(m for m in self.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))).weight.dim() - 2

    @classmethod
    def _adopt(cls, module: nn.Module, conv: nn.Module, *channels: int):
        return adopt(cls(*channels, spatial_dims=conv.weight.dim() - 2), module)


class PositionAttentionModule(_SpatialDims, R.PositionAttentionModule):
    """``output_conv(F3 * F)``, ``F3 = V @ softmax(Qᵀ K)`` (column-weighted, no N×N matrix)."""

    chunk_size = None   # query rows per block; None: the backend's default

    def forward(self, F: torch.Tensor) -> torch.Tensor:  # noqa: N803
        _check_input(self, F)
        attended = MF.position_attention(
            self.first_branch_conv(F).flatten(2), self.second_branch_conv(F).flatten(2),
            self.third_branch_conv(F).flatten(2), transpose=True, layout="channels",
            multiply=F.flatten(2), chunk_size=self.chunk_size,
        )
        return self.output_conv(attended.reshape(F.shape))

    @classmethod
    def from_original(cls, module: nn.Module) -> "PositionAttentionModule":
        return cls._adopt(module, module.third_branch_conv, module.third_branch_conv.weight.shape[1])


class ChannelAttentionModule(_SpatialDims, R.ChannelAttentionModule):
    """``output_conv(F3 * F)``, ``F3 = softmax(X Xᵀ) X`` (E accumulated in float32)."""

    def forward(self, F: torch.Tensor) -> torch.Tensor:  # noqa: N803
        _check_input(self, F)
        return self.output_conv(MF.channel_attention(F, negate=False, multiply=F))

    @classmethod
    def from_original(cls, module: nn.Module) -> "ChannelAttentionModule":
        return cls._adopt(module, module.output_conv, module.output_conv.weight.shape[1])


class GuidedAttentionModule(_SpatialDims, R.GuidedAttentionModule):
    """``attention_map_conv(_F * cam(_F)) * F`` with ``_F = cat(F, F_ms)``; ``pam`` built, unused.
    Needs in_channels_Fms == in_channels_F (or one of them 1) for the final product, like the original."""

    position_module = PositionAttentionModule
    channel_module = ChannelAttentionModule

    def forward(self, F: torch.Tensor, F_ms: torch.Tensor) -> torch.Tensor:  # noqa: N803
        _check_input(self, F, "F")
        _check_input(self, F_ms, "F_ms")
        return super().forward(F, F_ms)

    @classmethod
    def from_original(cls, module: nn.Module) -> "GuidedAttentionModule":
        w = module.attention_map_conv[0].weight           # (Fms, F + Fms, 1, 1[, 1])
        return cls._adopt(module, module.attention_map_conv[0], w.shape[1] - w.shape[0], w.shape[0])


COMPAT_CLASSES = {
    "PositionAttentionModule": PositionAttentionModule,
    "ChannelAttentionModule": ChannelAttentionModule,
    "GuidedAttentionModule": GuidedAttentionModule,
}
