r"""DAUNet: a U-Net with DANet dual attention (position + channel attention, Fu et al. 2019) at the
bottleneck and, optionally, on the deepest skip connections. 2-D or 3-D, logits out.

Architecture for ``channels = (c_0, …, c_L)`` and ``strides = (s_0, …, s_{L-1})``::

    x (B, in_channels, *S)                 each S_d divisible by Π_l s_l[d]
    stem        ConvBlock(in_channels -> c_0)                              -> f_0 (B, c_0, *S)
    encoder[l]  ConvBlock(c_l -> c_{l+1}, first conv strided by s_l)      -> f_{l+1}
    bottleneck  h = DualAttentionBlock(c_L)(f_L)          if "bottleneck" in attention_at
    decoder[l], deepest first (l = L-1, …, 0):
        u    = ConvTranspose(c_{l+1} -> c_l, kernel = stride = s_l)(h)
        skip = DualAttentionBlock(c_l)(f_l)                if "skip-{L-l}" in attention_at
        h    = ConvBlock(2·c_l -> c_l)(cat([skip, u]))
    head        1×1 conv (c_0 -> out_channels)                             -> logits (B, out_channels, *S)

``ConvBlock`` is two ``conv3×3 → norm → ReLU (→ dropout)`` units. ``"skip-1"`` is the deepest skip
(f_{L-1}, the one just above the bottleneck), ``"skip-L"`` the full-resolution one (f_0).

**Dual attention block** (the DANet head turned into a feature block; inter = C / attention_reduction)::

    p   = position_conv(PAM(position_stem(x)))      stems: 3×3 conv-norm-ReLU, C -> inter
    c   = channel_conv(CAM(channel_stem(x)))         convs: 3×3 conv-norm-ReLU, inter -> inter
    out = x + project(p + c)                         project: 1×1 conv inter -> C

with DANet's ``PAM: γ·V softmax(QᵀK)ᵀ + x`` (Q, K with inter/8 channels) and
``CAM: γ·softmax(rowmax(E) − E) X + x``, E = X Xᵀ. DANet sums the two branches and classifies
the sum; here the sum is projected back to C channels and added to the block's input, so a block
with γ = 0 (the initial state) is a plain residual conv block and the U-Net trains from the start.
PAM needs inter ≥ 8 (its query/key have inter // 8 channels): a ValueError says so at
construction. In 3-D the (B, C, D, H, W) map enters PAM/CAM as the (B, C, D·H, W) view: both
modules only use 1×1 convs and global attention over all N = D·H·W positions, so folding two
spatial axes into one changes nothing in the math.

**Reference vs fast** (``blocks=``): ``"fast"`` (default) uses
:class:`medattn_fast.compat.danet.PAM_Module`/``CAM_Module`` (the N×N attention is never stored, E
is accumulated in float32); ``"reference"`` the faithful
:class:`medattn_fast.reference.danet.PAM_Module`/``CAM_Module``. Same parameter names and shapes,
so :meth:`DAUNet.with_blocks` (``reference_version()`` / ``fast_version()``) moves a trained model
between them; ``medattn_fast.convert(DAUNet(blocks="reference"))`` also turns the reference
network into the fast one (it swaps every ``PAM_Module``/``CAM_Module``).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from ..compat import danet as _fast_danet
from ..reference import danet as _reference_danet
from ._unet_parts import (BlocksSwitchMixin, ConvBlock, IntOrSeq, check_blocks, check_channels_strides,
                          check_input, check_spatial_dims, conv_layer, conv_transpose_layer, norm_layer,
                          total_stride)

__all__ = ["DAUNet", "DualAttentionBlock"]

_NAME = "DAUNet"


def _danet_modules(blocks: str):
    module = _fast_danet if blocks == "fast" else _reference_danet
    return module.PAM_Module, module.CAM_Module


def _conv_norm_relu(spatial_dims: int, cin: int, cout: int, norm: str) -> nn.Sequential:
    return nn.Sequential(conv_layer(spatial_dims)(cin, cout, 3, padding=1, bias=False),
                         norm_layer(_NAME, norm, spatial_dims, cout), nn.ReLU(inplace=True))


class DualAttentionBlock(nn.Module):
    """DANet's position and channel attention as a residual feature block: ``x + project(p + c)``
    (see the module docstring). x: (B, channels, *S) -> same shape.

    Keys: ``position_stem``/``channel_stem`` (3×3 conv ``.0``, norm ``.1``), ``position`` (PAM:
    ``gamma``, ``query_conv``, ``key_conv``, ``value_conv``), ``channel`` (CAM: ``gamma``),
    ``position_conv``/``channel_conv``, ``project`` (1×1 conv with bias).
    """

    def __init__(self, channels: int, spatial_dims: int = 2, *, reduction: int = 4, norm: str = "batch",
                 blocks: str = "fast"):
        super().__init__()
        check_blocks(_NAME, blocks)
        inter = channels // reduction
        if inter < 8:
            raise ValueError(f"{_NAME}: dual attention on {channels} channels with attention_reduction={reduction} "
                             f"gives {inter} inner channels; position attention needs at least 8 "
                             f"(its query/key have inner // 8 channels)")
        pam, cam = _danet_modules(blocks)
        self.position_stem = _conv_norm_relu(spatial_dims, channels, inter, norm)
        self.channel_stem = _conv_norm_relu(spatial_dims, channels, inter, norm)
        self.position = pam(inter)
        self.channel = cam(inter)
        self.position_conv = _conv_norm_relu(spatial_dims, inter, inter, norm)
        self.channel_conv = _conv_norm_relu(spatial_dims, inter, inter, norm)
        self.project = conv_layer(spatial_dims)(inter, channels, 1)

    @staticmethod
    def _planar(attention: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Run a 2-D PAM/CAM on a 2-D or 3-D map; 3-D goes through the (B, C, D·H, W) view."""
        if x.dim() == 4:
            return attention(x)
        b, c, d, h, w = x.shape
        return attention(x.reshape(b, c, d * h, w)).reshape(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        position = self.position_conv(self._planar(self.position, self.position_stem(x)))
        channel = self.channel_conv(self._planar(self.channel, self.channel_stem(x)))
        return x + self.project(position + channel)


class _DecoderLevel(nn.Module):
    """``block(cat([attention(skip), upconv(lower)]))``; ``attention`` is None without skip attention."""

    def __init__(self, spatial_dims: int, channels: int, lower_channels: int, stride: Tuple[int, ...],
                 attention: Optional[nn.Module], norm: str, dropout: float):
        super().__init__()
        self.upconv = conv_transpose_layer(spatial_dims)(lower_channels, channels, stride, stride=stride)
        self.attention = attention
        self.block = ConvBlock(_NAME, spatial_dims, 2 * channels, channels, norm=norm, dropout=dropout)

    def forward(self, lower: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if self.attention is not None:
            skip = self.attention(skip)
        return self.block(torch.cat([skip, self.upconv(lower)], dim=1))


class DAUNet(BlocksSwitchMixin, nn.Module):
    """U-Net with DANet dual attention at the bottleneck and optionally at the deepest skips.

    Args:
        spatial_dims: 2 or 3.
        in_channels, out_channels: image channels in, classes out (logits, no softmax).
        channels: (c_0, …, c_L) feature widths, full resolution first.
        strides: L downsampling factors, each an int or one int per spatial dim.
        attention_at: where dual attention goes: ``"bottleneck"`` and/or ``"skip-k"``,
            1 ≤ k ≤ L, k = 1 the deepest skip.
        norm: ``"batch"`` or ``"instance"`` (affine) in every conv block and attention stem.
        dropout: elementwise dropout after each conv unit of the U-Net blocks (0: none built).
        attention_reduction: the dual attention's inner width is ``C // attention_reduction``.
        blocks: ``"fast"`` (compat PAM/CAM, memory-lean) or ``"reference"`` (faithful to the original).

    forward: x (B, in_channels, *S), every S_d divisible by the product of the strides along d
    (else ValueError) -> logits (B, out_channels, *S).
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 2,
                 channels: Sequence[int] = (32, 64, 128, 256), strides: Sequence[IntOrSeq] = (2, 2, 2), *,
                 attention_at: Sequence[str] = ("bottleneck",), norm: str = "batch", dropout: float = 0.0,
                 attention_reduction: int = 4, blocks: str = "fast"):
        super().__init__()
        check_spatial_dims(_NAME, spatial_dims)
        check_blocks(_NAME, blocks)
        channels, strides = check_channels_strides(_NAME, channels, strides, spatial_dims)
        depth = len(strides)
        if isinstance(attention_at, str):
            attention_at = (attention_at,)
        allowed = ("bottleneck",) + tuple(f"skip-{k}" for k in range(1, depth + 1))
        bad = [a for a in attention_at if a not in allowed]
        if bad:
            raise ValueError(f"{_NAME}: argument 'attention_at' entries must be among {allowed}, got {bad!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{_NAME}: argument 'dropout' must be in [0, 1), got {dropout!r}")
        self._config = dict(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                            channels=channels, strides=strides, attention_at=tuple(attention_at), norm=norm,
                            dropout=dropout, attention_reduction=attention_reduction)
        self.spatial_dims, self.in_channels, self.blocks = spatial_dims, in_channels, blocks
        self.divisor = total_stride(strides, spatial_dims)

        def attention(c: int) -> nn.Module:
            return DualAttentionBlock(c, spatial_dims, reduction=attention_reduction, norm=norm, blocks=blocks)

        self.stem = ConvBlock(_NAME, spatial_dims, in_channels, channels[0], norm=norm, dropout=dropout)
        self.encoder = nn.ModuleList(
            ConvBlock(_NAME, spatial_dims, channels[l], channels[l + 1], strides[l], norm=norm, dropout=dropout)
            for l in range(depth))
        self.bottleneck_attention = attention(channels[-1]) if "bottleneck" in attention_at else None
        # decoder[l] works at level l (skip f_l); "skip-k" is level L - k.
        self.decoder = nn.ModuleList(
            _DecoderLevel(spatial_dims, channels[l], channels[l + 1], strides[l],
                          attention(channels[l]) if f"skip-{depth - l}" in attention_at else None, norm, dropout)
            for l in range(depth))
        self.head = conv_layer(spatial_dims)(channels[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(_NAME, x, self.in_channels, self.spatial_dims, self.divisor)
        features = [self.stem(x)]
        for stage in self.encoder:
            features.append(stage(features[-1]))
        h = features.pop()
        if self.bottleneck_attention is not None:
            h = self.bottleneck_attention(h)
        for level in reversed(range(len(self.decoder))):
            h = self.decoder[level](h, features[level])
        return self.head(h)

    def extra_repr(self) -> str:
        return f"blocks={self.blocks!r}, attention_at={self._config['attention_at']!r}"
