"""Two originals' whole networks, restated for the benchmarks (their repositories are not
dependencies): the module trees and forward passes of

* LeeJunHyun/Image_Segmentation ``network.py`` :class:`AttU_Net` — a 2-D U-Net (64 … 1024
  channels, four max-pool levels) with LeeJunHyun's ``Attention_block`` on every skip connection;
  trained there on 224×224 RGB images.
* ozan-oktay/Attention-Gated-Networks ``unet_CT_single_att_dsv_3D`` — the 3-D CT network with
  Oktay's grid attention gate (``GridAttentionBlock3D``, mode ``'concatenation'``, sub-sampling
  (2, 2, 2)) on the three deepest skips and deep supervision; ``feature_scale=4`` gives the
  filters (16, 32, 64, 128, 256); trained there on 160×160×96 CT patches, 1 input channel.

The attention gates are :mod:`medattn_fast.reference.attention_gate`'s restatements of the
originals' gates, under the originals' class names, so :func:`medattn_fast.convert` swaps them
for the fast ones exactly as it would in the original code. Weight initialisation (the originals'
kaiming / normal init) is not reproduced: torch's defaults, which do not change what is timed.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medattn_fast.reference.attention_gate import Attention_block, GridAttentionBlock

__all__ = ["AttU_Net", "GridAttentionBlock3D", "unet_CT_single_att_dsv_3D"]


# ------------------------------------------------------------------------------------------------
# LeeJunHyun's AttU_Net
# ------------------------------------------------------------------------------------------------

def _conv_block(ch_in: int, ch_out: int) -> nn.Sequential:
    """``conv_block``: (3×3 conv with bias, BN, ReLU) twice."""
    return nn.Sequential(nn.Conv2d(ch_in, ch_out, 3, 1, 1, bias=True), nn.BatchNorm2d(ch_out), nn.ReLU(inplace=True),
                         nn.Conv2d(ch_out, ch_out, 3, 1, 1, bias=True), nn.BatchNorm2d(ch_out), nn.ReLU(inplace=True))


def _up_conv(ch_in: int, ch_out: int) -> nn.Sequential:
    """``up_conv``: nearest ×2 upsampling, 3×3 conv with bias, BN, ReLU."""
    return nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(ch_in, ch_out, 3, 1, 1, bias=True),
                         nn.BatchNorm2d(ch_out), nn.ReLU(inplace=True))


class AttU_Net(nn.Module):  # noqa: N801 - the original's name
    """``AttU_Net(img_ch, output_ch)``: input (B, img_ch, H, W), H and W multiples of 16; logits
    (B, output_ch, H, W). Decoder level l: ``d = Up(d)``, ``x_l = Att(g=d, x=x_l)``,
    ``d = Up_conv(cat(x_l, d))``; the gates' F_int is half their F_l."""

    def __init__(self, img_ch: int = 3, output_ch: int = 1):
        super().__init__()
        widths = (64, 128, 256, 512, 1024)
        self.Maxpool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.Conv1 = _conv_block(img_ch, widths[0])
        for i in range(1, 5):
            setattr(self, f"Conv{i + 1}", _conv_block(widths[i - 1], widths[i]))
        for i in range(4, 0, -1):  # Up5/Att5/Up_conv5 … Up2/Att2/Up_conv2
            c = widths[i - 1]
            setattr(self, f"Up{i + 1}", _up_conv(widths[i], c))
            setattr(self, f"Att{i + 1}", Attention_block(F_g=c, F_l=c, F_int=c // 2))
            setattr(self, f"Up_conv{i + 1}", _conv_block(2 * c, c))
        self.Conv_1x1 = nn.Conv2d(widths[0], output_ch, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.Conv1(x)]
        for i in range(2, 6):
            skips.append(getattr(self, f"Conv{i}")(self.Maxpool(skips[-1])))
        d = skips.pop()
        for i in range(5, 1, -1):
            d = getattr(self, f"Up{i}")(d)
            gated = getattr(self, f"Att{i}")(g=d, x=skips.pop())
            d = getattr(self, f"Up_conv{i}")(torch.cat((gated, d), dim=1))
        return self.Conv_1x1(d)


# ------------------------------------------------------------------------------------------------
# Oktay's unet_CT_single_att_dsv_3D
# ------------------------------------------------------------------------------------------------

class GridAttentionBlock3D(GridAttentionBlock):
    """Oktay's ``GridAttentionBlock3D(in_channels, gating_channels, inter_channels, mode,
    sub_sample_factor)``, mode ``'concatenation'`` only (the one these networks use)."""

    def __init__(self, in_channels: int, gating_channels: int, inter_channels: int = None,
                 mode: str = "concatenation", sub_sample_factor: Sequence[int] = (2, 2, 2)):
        if mode != "concatenation":
            raise ValueError(f"GridAttentionBlock3D: only mode 'concatenation' is restated here, got {mode!r}")
        super().__init__(in_channels, gating_channels, inter_channels, spatial_dims=3,
                         sub_sample_factor=sub_sample_factor)


class _UnetConv3(nn.Module):
    """``UnetConv3`` with 3×3×3 kernels: (conv, BN, ReLU) twice, as ``conv1`` / ``conv2``."""

    def __init__(self, in_size: int, out_size: int):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv3d(in_size, out_size, 3, 1, 1), nn.BatchNorm3d(out_size), nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(nn.Conv3d(out_size, out_size, 3, 1, 1), nn.BatchNorm3d(out_size), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class _UnetUp3CT(nn.Module):
    """``UnetUp3_CT``: trilinear ×2 upsampling of the lower level, concatenated after the skip."""

    def __init__(self, in_size: int, out_size: int):
        super().__init__()
        self.conv = _UnetConv3(in_size + out_size, out_size)
        self.up = nn.Upsample(scale_factor=(2, 2, 2), mode="trilinear")

    def forward(self, skip: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(lower)], 1))


class _MultiAttentionBlock(nn.Module):
    """``MultiAttentionBlock``: one grid gate, then a 1×1×1 conv + BN + ReLU (``combine_gates``)."""

    def __init__(self, in_size: int, gate_size: int, inter_size: int):
        super().__init__()
        self.gate_block_1 = GridAttentionBlock3D(in_size, gate_size, inter_size, "concatenation", (2, 2, 2))
        self.combine_gates = nn.Sequential(nn.Conv3d(in_size, in_size, 1), nn.BatchNorm3d(in_size), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor, g: torch.Tensor):
        gated, alpha = self.gate_block_1(x, g)
        return self.combine_gates(gated), alpha


class unet_CT_single_att_dsv_3D(nn.Module):  # noqa: N801 - the original's name
    """Input (B, in_channels, D, H, W), each a multiple of 16; logits (B, n_classes, D, H, W).
    Gates: level 4 gated by the centre's 1×1×1 gating signal, levels 3 and 2 by the decoder
    output one level below; level 1 is not gated. Deep supervision: 1×1×1 convs on the four
    decoder levels, trilinearly upsampled to full size, concatenated, 1×1×1 conv."""

    def __init__(self, feature_scale: int = 4, n_classes: int = 21, in_channels: int = 3):
        super().__init__()
        f = [int(x / feature_scale) for x in (64, 128, 256, 512, 1024)]
        self.conv1 = _UnetConv3(in_channels, f[0])
        self.conv2 = _UnetConv3(f[0], f[1])
        self.conv3 = _UnetConv3(f[1], f[2])
        self.conv4 = _UnetConv3(f[2], f[3])
        self.center = _UnetConv3(f[3], f[4])
        self.gating = nn.Sequential(nn.Conv3d(f[4], f[4], 1), nn.BatchNorm3d(f[4]), nn.ReLU(inplace=True))
        self.attentionblock2 = _MultiAttentionBlock(f[1], f[2], f[1])
        self.attentionblock3 = _MultiAttentionBlock(f[2], f[3], f[2])
        self.attentionblock4 = _MultiAttentionBlock(f[3], f[4], f[3])
        self.up_concat4 = _UnetUp3CT(f[4], f[3])
        self.up_concat3 = _UnetUp3CT(f[3], f[2])
        self.up_concat2 = _UnetUp3CT(f[2], f[1])
        self.up_concat1 = _UnetUp3CT(f[1], f[0])
        self.dsv4 = nn.Conv3d(f[3], n_classes, 1)
        self.dsv3 = nn.Conv3d(f[2], n_classes, 1)
        self.dsv2 = nn.Conv3d(f[1], n_classes, 1)
        self.dsv1 = nn.Conv3d(f[0], n_classes, 1)
        self.final = nn.Conv3d(n_classes * 4, n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv1 = self.conv1(x)
        conv2 = self.conv2(F.max_pool3d(conv1, 2))
        conv3 = self.conv3(F.max_pool3d(conv2, 2))
        conv4 = self.conv4(F.max_pool3d(conv3, 2))
        center = self.center(F.max_pool3d(conv4, 2))
        gating = self.gating(center)
        g_conv4, _ = self.attentionblock4(conv4, gating)
        up4 = self.up_concat4(g_conv4, center)
        g_conv3, _ = self.attentionblock3(conv3, up4)
        up3 = self.up_concat3(g_conv3, up4)
        g_conv2, _ = self.attentionblock2(conv2, up3)
        up2 = self.up_concat2(g_conv2, up3)
        up1 = self.up_concat1(conv1, up2)
        size = up1.shape[2:]
        dsv = [F.interpolate(conv(level), size=size, mode="trilinear") if level.shape[2:] != size else conv(level)
               for conv, level in ((self.dsv1, up1), (self.dsv2, up2), (self.dsv3, up3), (self.dsv4, up4))]
        return self.final(torch.cat(dsv, dim=1))
