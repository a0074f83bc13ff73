"""Multi-Scale Guided Attention's (Sinha & Dolz 2020) ``PositionAttentionModule``,
``ChannelAttentionModule`` and ``GuidedAttentionModule`` (:mod:`medattn_fast.reference.guided_attention`),
fast inside (see :mod:`medattn_fast.compat`): the N×N and C×C matrices are never formed in the
input dtype; ``from_original`` reads ``spatial_dims`` off the weights::

    from medattn_fast.compat.guided_attention import GuidedAttentionModule
"""
from __future__ import annotations

import torch
from torch import nn

from .. import functional as MF
from ..reference import guided_attention as R
from ._adopt import FromOriginal

__all__ = ["PositionAttentionModule", "ChannelAttentionModule", "GuidedAttentionModule", "COMPAT_CLASSES"]


def _check_input(module: nn.Module, x, arg: str = "F") -> None:
    name, spatial_dims = type(module).__name__, module.spatial_dims
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: argument '{arg}' must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != spatial_dims + 2:
        want = "(B, C, H, W)" if spatial_dims == 2 else "(B, C, D, H, W)"
        raise ValueError(f"{name}: argument '{arg}' must be {want} (spatial_dims={spatial_dims}), "
                         f"got shape {tuple(x.shape)}")


def _args(conv: nn.Module, *channels: int):
    """Constructor arguments: the channel counts, and spatial_dims from ``conv``'s weight."""
    return channels, {"spatial_dims": conv.weight.dim() - 2}


class PositionAttentionModule(FromOriginal, R.PositionAttentionModule):
    """:class:`medattn_fast.reference.guided_attention.PositionAttentionModule` without the N×N
    matrix: the untransposed ``V @ A`` is ``position_attention(..., transpose=True)`` and the
    ``F3 * F`` product its ``multiply`` epilogue."""

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
    def _init_args(cls, module):
        return _args(module.third_branch_conv, module.third_branch_conv.weight.shape[1])


class ChannelAttentionModule(FromOriginal, R.ChannelAttentionModule):
    """:class:`medattn_fast.reference.guided_attention.ChannelAttentionModule` as one
    ``channel_attention(F, negate=False, multiply=F)`` call (E accumulated in float32)."""

    def forward(self, F: torch.Tensor) -> torch.Tensor:  # noqa: N803
        _check_input(self, F)
        return self.output_conv(MF.channel_attention(F, negate=False, multiply=F))

    @classmethod
    def _init_args(cls, module):
        return _args(module.output_conv, module.output_conv.weight.shape[1])


class GuidedAttentionModule(FromOriginal, R.GuidedAttentionModule):
    """:class:`medattn_fast.reference.guided_attention.GuidedAttentionModule` on the fast
    ``pam``/``cam`` (``pam`` built, never called, as in the original)."""

    position_module = PositionAttentionModule
    channel_module = ChannelAttentionModule

    def forward(self, F: torch.Tensor, F_ms: torch.Tensor) -> torch.Tensor:  # noqa: N803
        _check_input(self, F, "F")
        _check_input(self, F_ms, "F_ms")
        return super().forward(F, F_ms)

    @classmethod
    def _init_args(cls, module):
        w = module.attention_map_conv[0].weight           # (Fms, F + Fms, 1, 1[, 1])
        return _args(module.attention_map_conv[0], w.shape[1] - w.shape[0], w.shape[0])


COMPAT_CLASSES = {
    "PositionAttentionModule": PositionAttentionModule,
    "ChannelAttentionModule": ChannelAttentionModule,
    "GuidedAttentionModule": GuidedAttentionModule,
}
