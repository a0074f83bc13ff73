"""DANet's dual attention, faithful to the original (Fu et al., "Dual Attention Network for Scene
Segmentation", CVPR 2019; the public code's ``PAM_Module``, ``CAM_Module`` and ``DANetHead``).

These modules are the oracle the fast paths are checked against: they materialise the N×N
(position) and C×C (channel) matrices exactly as the original does, in the input's dtype, and are
never optimised. Device-agnostic (no ``.cuda()``). 2D inputs (B, C, H, W) only, like the original.

Quirks of the original, reproduced on purpose:

* ``PAM_Module`` has no 1/√d scale: ``energy = Qᵀ K`` is soft-maxed as is.
* ``PAM_Module`` computes ``V · Aᵀ``, i.e. ``o_i = Σ_j A_ij v_j`` (standard attention).
* ``CAM_Module`` soft-maxes ``rowmax(E) − E`` (not ``E``): the most *dissimilar* channels get the
  largest weight. Because softmax is shift invariant this equals ``softmax(−E)`` exactly, but the
  original forms E in the input dtype, so in float16 E overflows (|E| > 65504, e.g. C=512 at 128²)
  and ``inf − inf`` makes the output NaN.
* ``in_dim // 8`` query/key channels: for in_dim < 8 the convs have 0 output channels and the
  forward fails (PyTorch rejects a 0-channel conv weight); the fast modules share that limit.
* ``gamma`` starts at 0, so a fresh module is the identity (the attention branch only matters once
  gamma is trained).
* ``DANetHead`` builds three classifiers behind ``Dropout2d(0.1)`` and returns all three logits
  ``(fused, position-only, channel-only)``; the fused one classifies the *sum* of the two branches.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["PAM_Module", "CAM_Module", "DANetHead"]


class PAM_Module(nn.Module):
    """Position attention: ``out = γ · V softmax(Qᵀ K)ᵀ + x`` over the N = H·W pixels.

    q = query_conv(x), k = key_conv(x) have C/8 channels, v = value_conv(x) has C; all 1×1 convs
    with bias. The (B, N, N) energy and attention are materialised.
    """

    def __init__(self, in_dim: int):
        super().__init__()
        self.chanel_in = in_dim  # (sic) the original's attribute name
        self.query_conv = nn.Conv2d(in_dim, in_dim // 8, kernel_size=1)
        self.key_conv = nn.Conv2d(in_dim, in_dim // 8, kernel_size=1)
        self.value_conv = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.size()
        n = height * width
        queries = self.query_conv(x).view(batch, -1, n).permute(0, 2, 1)   # (B, N, C/8)
        keys = self.key_conv(x).view(batch, -1, n)                          # (B, C/8, N)
        energy = torch.bmm(queries, keys)                                   # (B, N, N), no scale
        attention = self.softmax(energy)                                    # rows sum to 1
        values = self.value_conv(x).view(batch, -1, n)                      # (B, C, N)
        out = torch.bmm(values, attention.permute(0, 2, 1))                 # o_i = Σ_j A_ij v_j
        out = out.view(batch, channels, height, width)
        return self.gamma * out + x


class CAM_Module(nn.Module):
    """Channel attention: ``out = γ · softmax(rowmax(E) − E) X + x`` with ``E = X Xᵀ`` (C×C)."""

    def __init__(self, in_dim: int):
        super().__init__()
        self.chanel_in = in_dim
        self.gamma = nn.Parameter(torch.zeros(1))
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.size()
        feats = x.view(batch, channels, -1)                                 # (B, C, N)
        energy = torch.bmm(feats, feats.permute(0, 2, 1))                   # (B, C, C), input dtype
        row_max = torch.max(energy, -1, keepdim=True)[0].expand_as(energy)
        attention = self.softmax(row_max - energy)                          # the "negated" energy
        out = torch.bmm(attention, feats).view(batch, channels, height, width)
        return self.gamma * out + x


def _conv_bn_relu(cin: int, cout: int, norm_layer) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), norm_layer(cout), nn.ReLU())


def _classifier(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Dropout2d(0.1, False), nn.Conv2d(cin, cout, 1))


class DANetHead(nn.Module):
    """The DANet head: two conv-BN-ReLU stems (C -> C/4), PAM on one and CAM on the other, a
    conv-BN-ReLU after each, and three 1×1 classifiers (behind Dropout2d(0.1)) on the position
    branch, the channel branch and their sum. Returns ``(fused, position_only, channel_only)``.

    ``position_module``/``channel_module``: the classes built for ``sa``/``sc`` (a subclass with a
    fast forward swaps them, keeping the keys)."""

    position_module = PAM_Module
    channel_module = CAM_Module

    def __init__(self, in_channels: int, out_channels: int, norm_layer=nn.BatchNorm2d):
        super().__init__()
        inter_channels = in_channels // 4
        self.conv5a = _conv_bn_relu(in_channels, inter_channels, norm_layer)
        self.conv5c = _conv_bn_relu(in_channels, inter_channels, norm_layer)
        self.sa = self.position_module(inter_channels)
        self.sc = self.channel_module(inter_channels)
        self.conv51 = _conv_bn_relu(inter_channels, inter_channels, norm_layer)
        self.conv52 = _conv_bn_relu(inter_channels, inter_channels, norm_layer)
        self.conv6 = _classifier(inter_channels, out_channels)
        self.conv7 = _classifier(inter_channels, out_channels)
        self.conv8 = _classifier(inter_channels, out_channels)

    def forward(self, x: torch.Tensor):
        sa_conv = self.conv51(self.sa(self.conv5a(x)))
        sa_output = self.conv6(sa_conv)
        sc_conv = self.conv52(self.sc(self.conv5c(x)))
        sc_output = self.conv7(sc_conv)
        sasc_output = self.conv8(sa_conv + sc_conv)
        return sasc_output, sa_output, sc_output
