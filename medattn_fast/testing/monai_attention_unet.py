"""A stand-in for ``monai.networks.nets.AttentionUnet``, for key-compatibility tests only.

MONAI is not installed here, so this module rebuilds MONAI's AttentionUnet module tree (written
from reading ``monai/networks/nets/attentionunet.py`` and ``monai/networks/blocks/convolutions.py``
/ ``acti_norm.py``, MONAI >= 1.3.1) with the same class and attribute names, so that its
``state_dict`` keys are exactly MONAI's, and the same forward math:

* ``Convolution`` is an ``nn.Sequential`` holding ``conv`` (a Conv, or a ConvTranspose with
  ``output_padding = stride - 1``; "same" padding ``(k - 1) // 2``) and, unless ``conv_only``,
  ``adn`` — an ``nn.Sequential`` with children ``N`` (norm), ``D`` (dropout, present whenever the
  dropout argument is not None, even 0.0) and ``A`` (activation), in that order. Its defaults are
  MONAI's: PReLU activation, instance norm (no affine, no running statistics).
* ``ConvBlock``: ``conv`` = two Convolutions (BN, ReLU), the first strided.
* ``UpConv``: ``up`` = transposed Convolution (BN, ReLU; its dropout is always 0.0 — MONAI's
  ``AttentionLayer`` does not forward its own).
* ``AttentionBlock(f_int, f_g, f_l)``: ``W_g``/``W_x`` = (conv-only Convolution, BN),
  ``psi`` = (conv-only Convolution to 1 channel, BN(1), Sigmoid); ``forward(g, x) = x · psi(relu(W_g g + W_x x))``.
* ``AttentionLayer``: ``attention``, ``upconv``, ``merge`` (default Convolution, 2c -> c), ``submodule``;
  ``forward(x) = merge(cat(attention(g=up, x=x), up))`` with ``up = upconv(submodule(x))``.
* ``AttentionUnet``: ``model = Sequential(head ConvBlock, recursive AttentionLayer, 1×1 conv)``; a
  level's ``submodule`` is ``Sequential(down ConvBlock, next AttentionLayer)``, the last one's just
  the down ConvBlock.

It exists so that ``AttentionUNet.from_monai_state_dict`` can be tested (``tests/``) and benchmarked
(``bench/cases_networks.py``) against a real MONAI-shaped checkpoint and forward pass; nothing in
the package imports it.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def _conv_types(spatial_dims: int):
    return {2: (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.InstanceNorm2d),
            3: (nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d, nn.InstanceNorm3d)}[spatial_dims]


class Convolution(nn.Sequential):
    """MONAI's Convolution: conv, then ``adn`` (N, D, A) unless conv_only. ``norm``: "batch" or "instance";
    ``act``: "relu" or "prelu"."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, strides=1, kernel_size=3,
                 act: str = "prelu", norm: str = "instance", dropout=None, conv_only: bool = False,
                 is_transposed: bool = False, padding=None):
        super().__init__()
        conv_t, conv_tt, batch_norm, instance_norm = _conv_types(spatial_dims)
        if padding is None:
            padding = (kernel_size - 1) // 2
        if is_transposed:
            self.add_module("conv", conv_tt(in_channels, out_channels, kernel_size, stride=strides, padding=padding,
                                            output_padding=strides - 1))
        else:
            self.add_module("conv", conv_t(in_channels, out_channels, kernel_size, stride=strides, padding=padding))
        if conv_only:
            return
        adn = nn.Sequential()
        adn.add_module("N", batch_norm(out_channels) if norm == "batch" else instance_norm(out_channels))
        if dropout is not None:
            adn.add_module("D", nn.Dropout(dropout))
        adn.add_module("A", nn.ReLU() if act == "relu" else nn.PReLU())
        self.add_module("adn", adn)


class ConvBlock(nn.Module):
    def __init__(self, spatial_dims, in_channels, out_channels, kernel_size=3, strides=1, dropout=0.0):
        super().__init__()
        self.conv = nn.Sequential(
            Convolution(spatial_dims, in_channels, out_channels, strides, kernel_size, "relu", "batch", dropout),
            Convolution(spatial_dims, out_channels, out_channels, 1, kernel_size, "relu", "batch", dropout),
        )

    def forward(self, x):
        return self.conv(x)


class UpConv(nn.Module):
    def __init__(self, spatial_dims, in_channels, out_channels, kernel_size=3, strides=2, dropout=0.0):
        super().__init__()
        self.up = Convolution(spatial_dims, in_channels, out_channels, strides, kernel_size, "relu", "batch",
                              dropout, is_transposed=True)

    def forward(self, x):
        return self.up(x)


class AttentionBlock(nn.Module):
    def __init__(self, spatial_dims, f_int, f_g, f_l, dropout=0.0):
        super().__init__()
        batch_norm = _conv_types(spatial_dims)[2]

        def projection(cin, cout):
            return Convolution(spatial_dims, cin, cout, 1, 1, dropout=dropout, conv_only=True, padding=0)

        self.W_g = nn.Sequential(projection(f_g, f_int), batch_norm(f_int))
        self.W_x = nn.Sequential(projection(f_l, f_int), batch_norm(f_int))
        self.psi = nn.Sequential(projection(f_int, 1), batch_norm(1), nn.Sigmoid())
        self.relu = nn.ReLU()

    def forward(self, g, x):
        return x * self.psi(self.relu(self.W_g(g) + self.W_x(x)))


class AttentionLayer(nn.Module):
    def __init__(self, spatial_dims, in_channels, out_channels, submodule, up_kernel_size=3, strides=2, dropout=0.0):
        super().__init__()
        self.attention = AttentionBlock(spatial_dims, f_int=in_channels // 2, f_g=in_channels, f_l=in_channels)
        self.upconv = UpConv(spatial_dims, out_channels, in_channels, kernel_size=up_kernel_size, strides=strides)
        self.merge = Convolution(spatial_dims, 2 * in_channels, in_channels, dropout=dropout)
        self.submodule = submodule

    def forward(self, x):
        from_lower = self.upconv(self.submodule(x))
        gated = self.attention(g=from_lower, x=x)
        return self.merge(torch.cat((gated, from_lower), dim=1))


class AttentionUnet(nn.Module):
    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, channels: Sequence[int],
                 strides: Sequence[int], kernel_size: int = 3, up_kernel_size: int = 3, dropout: float = 0.0):
        super().__init__()

        def level(chs, sts):
            down = ConvBlock(spatial_dims, chs[0], chs[1], kernel_size, sts[0], dropout)
            sub = down if len(chs) == 2 else nn.Sequential(down, level(chs[1:], sts[1:]))
            return AttentionLayer(spatial_dims, chs[0], chs[1], sub, up_kernel_size, sts[0], dropout)

        head = ConvBlock(spatial_dims, in_channels, channels[0], kernel_size, 1, dropout)
        reduce_channels = Convolution(spatial_dims, channels[0], out_channels, 1, 1, conv_only=True, padding=0)
        self.model = nn.Sequential(head, level(tuple(channels), tuple(strides)), reduce_channels)

    def forward(self, x):
        return self.model(x)
