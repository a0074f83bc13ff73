r"""CrossAttentionUNet (this package's design, no public original): a U-Net with squeeze-excitation
channel attention in every conv block, multi-head self-attention after the deepest encoder stages
and multi-head cross-attention on the skip connections (decoder queries attend to the skip
features). 2-D or 3-D, logits out.

Architecture for ``channels = (c_0, …, c_L)`` and ``strides = (s_0, …, s_{L-1})``::

    x (B, in_channels, *S)                 each S_d divisible by Π_l s_l[d]
    stem        SEBlock(in_channels -> c_0)                                -> f_0
    encoder[l]  SEBlock(c_l -> c_{l+1}, first conv strided by s_l)        -> f_{l+1}
                then SelfAttentionLayer(c_{l+1}, heads)  for the ``self_attention_levels`` deepest l
    decoder[l], deepest first, h = f_L:
        u = ConvTranspose(c_{l+1} -> c_l, kernel = stride = s_l)(h)
        a = SkipCrossAttentionLayer(c_l, c_l, heads)(u, f_l)   for the ``cross_attention_levels``
            deepest skips (else a = u): queries from u, keys/values from f_l, residual on u
        h = SEBlock(2·c_l -> c_l)(cat([f_l, a]))
    head        1×1 conv (c_0 -> out_channels)                             -> logits (B, out_channels, *S)

``SEBlock`` = two ``conv3×3 → norm → ReLU (→ dropout)`` units followed by squeeze-excitation
``x · σ(W₂ relu(W₁ mean_S(x)))`` (reduction ``se_reduction``). The attention layers are
pre-norm layers over the N = prod(S) pixels as tokens: ``t + proj(MHA(LN(t)))`` (self) and
``t + proj(MHA(LN_x(t), LN_s(s)))`` (cross), softmax(QKᵀ/√d)V per head.

The blocks are :mod:`medattn_fast.nn.attention`'s (attention through
:func:`medattn_fast.functional.position_attention`: the N×N matrix is never stored); the tests and
benchmarks compare the model with a twin holding the same weights in
:mod:`medattn_fast.reference.cross_attention`'s blocks (the (B, heads, Nq, Nk) matrix
materialised), built by swapping them (``medattn_fast.testing.twins``).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from ..nn.attention import SEChannelAttention, SelfAttentionLayer, SkipCrossAttentionLayer
from ._parts import (ConvBlock, IntOrSeq, check_input, check_positive_int, check_unet, encode_decode, layer,
                     total_stride)

__all__ = ["CrossAttentionUNet"]

_NAME = "CrossAttentionUNet"


def _check_level_count(name: str, value: Optional[int], depth: int) -> int:
    if value is None:
        return depth
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= depth:
        raise ValueError(f"{_NAME}: argument '{name}' must be an int in [0, {depth}] or None, got {value!r}")
    return value


class _SEBlock(nn.Module):
    """ConvBlock then squeeze-excitation. Keys: ``conv.*``, ``se.fc1``, ``se.fc2``."""

    def __init__(self, spatial_dims: int, cin: int, cout: int, stride, *, norm: str, dropout: float,
                 se_reduction: int):
        super().__init__()
        self.conv = ConvBlock(_NAME, spatial_dims, cin, cout, stride, norm=norm, dropout=dropout)
        self.se = SEChannelAttention(cout, se_reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.se(self.conv(x))


class _EncoderLevel(nn.Module):
    def __init__(self, block: nn.Module, self_attention: Optional[nn.Module]):
        super().__init__()
        self.block = block
        self.self_attention = self_attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(x)
        return x if self.self_attention is None else self.self_attention(x)


class _DecoderLevel(nn.Module):
    def __init__(self, spatial_dims: int, channels: int, lower_channels: int, stride: Tuple[int, ...],
                 cross_attention: Optional[nn.Module], block: nn.Module):
        super().__init__()
        self.upconv = layer("ConvTranspose", spatial_dims)(lower_channels, channels, stride, stride=stride)
        self.cross_attention = cross_attention
        self.block = block

    def forward(self, lower: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.upconv(lower)
        if self.cross_attention is not None:
            up = self.cross_attention(up, skip)   # decoder queries attend to the skip features
        return self.block(torch.cat([skip, up], dim=1))


class CrossAttentionUNet(nn.Module):
    """U-Net with SE channel attention, deep self-attention and skip cross-attention.

    Args:
        spatial_dims: 2 or 3.
        in_channels, out_channels: image channels in, classes out (logits).
        channels: (c_0, …, c_L) feature widths, full resolution first.
        strides: L downsampling factors, each an int or one int per spatial dim.
        heads: attention heads; must divide every c_l that carries an attention layer.
        self_attention_levels: how many of the deepest encoder stages (the bottleneck first) end
            with a self-attention layer (default 2; 0 none).
        cross_attention_levels: how many of the deepest skips carry cross-attention (default
            None: all of them; 0 none).
        se_reduction: squeeze-excitation reduction (hidden width ``max(1, C // se_reduction)``).
        norm: ``"batch"`` or ``"instance"``. dropout: elementwise, after each conv unit.

    forward: x (B, in_channels, *S), every S_d divisible by the product of the strides along d
    (else ValueError) -> logits (B, out_channels, *S).
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 2,
                 channels: Sequence[int] = (32, 64, 128, 256), strides: Sequence[IntOrSeq] = (2, 2, 2), *,
                 heads: int = 4, self_attention_levels: int = 2, cross_attention_levels: Optional[int] = None,
                 se_reduction: int = 16, norm: str = "batch", dropout: float = 0.0):
        super().__init__()
        channels, strides = check_unet(_NAME, spatial_dims, channels, strides, dropout)
        depth = len(strides)
        n_self = _check_level_count("self_attention_levels", self_attention_levels, depth)
        n_cross = _check_level_count("cross_attention_levels", cross_attention_levels, depth)
        check_positive_int(_NAME, "heads", heads)
        attended = [channels[l + 1] for l in range(depth - n_self, depth)] + \
                   [channels[l] for l in range(depth - n_cross, depth)]
        bad = sorted({c for c in attended if c % heads})
        if bad:
            raise ValueError(f"{_NAME}: argument 'heads' ({heads}) must divide the channels of every attention "
                             f"level, got channels {bad} that it does not divide")
        self.spatial_dims, self.in_channels, self.heads = spatial_dims, in_channels, heads
        self.self_attention_levels, self.cross_attention_levels = n_self, n_cross
        self.divisor = total_stride(strides, spatial_dims)

        def se_block(cin: int, cout: int, stride=1) -> nn.Module:
            return _SEBlock(spatial_dims, cin, cout, stride, norm=norm, dropout=dropout,
                            se_reduction=se_reduction)

        self.stem = se_block(in_channels, channels[0])
        self.encoder = nn.ModuleList(
            _EncoderLevel(se_block(channels[l], channels[l + 1], strides[l]),
                          SelfAttentionLayer(channels[l + 1], heads) if l >= depth - n_self else None)
            for l in range(depth))
        self.decoder = nn.ModuleList(
            _DecoderLevel(spatial_dims, channels[l], channels[l + 1], strides[l],
                          SkipCrossAttentionLayer(channels[l], channels[l], heads) if l >= depth - n_cross
                          else None,
                          se_block(2 * channels[l], channels[l]))
            for l in range(depth))
        self.head = layer("Conv", spatial_dims)(channels[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(_NAME, x, self.in_channels, self.spatial_dims, self.divisor)
        return self.head(encode_decode(x, self.stem, self.encoder, self.decoder))

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, self_attention_levels={self.self_attention_levels}, "
                f"cross_attention_levels={self.cross_attention_levels}")
