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
construction. PAM and CAM are :class:`medattn_fast.nn.PositionAttention` and
:class:`~medattn_fast.nn.ChannelAttention`, which take 2-D and 3-D maps alike (attention over all
N = prod(S) positions; the N×N matrix is never stored, E is accumulated in float32). The tests and
benchmarks compare the model with a twin holding the same weights in DANet's original, materialising
modules, built outside the model by swapping these two (``medattn_fast.testing.twins``).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from ..nn.attention import ChannelAttention, PositionAttention
from ._parts import ConvBlock, IntOrSeq, check_input, check_unet, conv_norm_relu, encode_decode, layer, total_stride

__all__ = ["DAUNet", "DualAttentionBlock"]

_NAME = "DAUNet"


class DualAttentionBlock(nn.Module):
    """DANet's position and channel attention as a residual feature block: ``x + project(p + c)``
    (see the module docstring). x: (B, channels, *S), 2-D or 3-D -> same shape.

    Keys: ``position_stem``/``channel_stem`` (3×3 conv ``.0``, norm ``.1``), ``position``
    (PositionAttention: ``gamma``, ``query``, ``key``, ``value``), ``channel`` (ChannelAttention:
    ``gamma``), ``position_conv``/``channel_conv``, ``project`` (1×1 conv with bias).
    """

    def __init__(self, channels: int, spatial_dims: int = 2, *, reduction: int = 4, norm: str = "batch"):
        super().__init__()
        inter = channels // reduction
        if inter < 8:
            raise ValueError(f"{_NAME}: dual attention on {channels} channels with attention_reduction={reduction} "
                             f"gives {inter} inner channels; position attention needs at least 8 "
                             f"(its query/key have inner // 8 channels)")

        def conv(cin: int) -> nn.Sequential:
            return nn.Sequential(*conv_norm_relu(_NAME, spatial_dims, cin, inter, norm))

        self.position_stem = conv(channels)
        self.channel_stem = conv(channels)
        self.position = PositionAttention(inter)   # reduction 8: DANet's inter // 8 query/key channels
        self.channel = ChannelAttention()          # negate=True: DANet's softmax(rowmax(E) − E)
        self.position_conv = conv(inter)
        self.channel_conv = conv(inter)
        self.project = layer("Conv", spatial_dims)(inter, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        position = self.position_conv(self.position(self.position_stem(x)))
        channel = self.channel_conv(self.channel(self.channel_stem(x)))
        return x + self.project(position + channel)


class _DecoderLevel(nn.Module):
    """``block(cat([attention(skip), upconv(lower)]))``; ``attention`` is None without skip attention."""

    def __init__(self, spatial_dims: int, channels: int, lower_channels: int, stride: Tuple[int, ...],
                 attention: Optional[nn.Module], norm: str, dropout: float):
        super().__init__()
        self.upconv = layer("ConvTranspose", spatial_dims)(lower_channels, channels, stride, stride=stride)
        self.attention = attention
        self.block = ConvBlock(_NAME, spatial_dims, 2 * channels, channels, norm=norm, dropout=dropout)

    def forward(self, lower: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if self.attention is not None:
            skip = self.attention(skip)
        return self.block(torch.cat([skip, self.upconv(lower)], dim=1))


class DAUNet(nn.Module):
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

    forward: x (B, in_channels, *S), every S_d divisible by the product of the strides along d
    (else ValueError) -> logits (B, out_channels, *S).
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 2,
                 channels: Sequence[int] = (32, 64, 128, 256), strides: Sequence[IntOrSeq] = (2, 2, 2), *,
                 attention_at: Sequence[str] = ("bottleneck",), norm: str = "batch", dropout: float = 0.0,
                 attention_reduction: int = 4):
        super().__init__()
        channels, strides = check_unet(_NAME, spatial_dims, channels, strides, dropout)
        depth = len(strides)
        if isinstance(attention_at, str):
            attention_at = (attention_at,)
        allowed = ("bottleneck",) + tuple(f"skip-{k}" for k in range(1, depth + 1))
        bad = [a for a in attention_at if a not in allowed]
        if bad:
            raise ValueError(f"{_NAME}: argument 'attention_at' entries must be among {allowed}, got {bad!r}")
        self.spatial_dims, self.in_channels, self.attention_at = spatial_dims, in_channels, tuple(attention_at)
        self.divisor = total_stride(strides, spatial_dims)

        def attention(c: int) -> nn.Module:
            return DualAttentionBlock(c, spatial_dims, reduction=attention_reduction, norm=norm)

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
        self.head = layer("Conv", spatial_dims)(channels[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(_NAME, x, self.in_channels, self.spatial_dims, self.divisor)
        return self.head(encode_decode(x, self.stem, self.encoder, self.decoder, self.bottleneck_attention))

    def extra_repr(self) -> str:
        return f"attention_at={self.attention_at!r}"
