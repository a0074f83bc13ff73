"""Faithful attention gates of Attention U-Net: the oracle.

Four originals, reimplemented module for module so that their ``state_dict`` keys and their
numbers are the originals' own:

* :class:`AttentionBlock` / :class:`AttentionUpBlock` — the widely copied
  "Attention U-Net from scratch" blocks; constructor ``(in_channels_x, in_channels_g,
  int_channels)``, gating signal resampled to the skip connection's size.
* :class:`Attention_block` — LeeJunHyun/Image_Segmentation ``network.py``: same gate, argument
  order ``forward(g, x)``, no resampling.
* :class:`MonaiAttentionBlock` — MONAI's ``AttentionBlock``: LeeJunHyun's gate with MONAI's
  constructor and keys.
* :class:`GridAttentionBlock` — Oktay's ``GridAttentionBlock2D/3D`` (Attention-Gated-Networks,
  mode ``'concatenation'``): strided θ on x, attention computed on the coarse grid, then
  upsampled, then an output transform ``W`` (conv + BN).

Everything here is slow and obvious on purpose (each step is its own tensor, exactly as the
originals compute it) and device-agnostic. Nothing of ``medattn_fast`` is imported.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AttentionBlock", "AttentionUpBlock", "ConvBatchNorm", "Attention_block", "MonaiAttentionBlock",
           "GridAttentionBlock"]


def _layers(spatial_dims: int):
    """(ConvNd, BatchNormNd, interpolation mode) for 2-D or 3-D feature maps."""
    if spatial_dims == 2:
        return nn.Conv2d, nn.BatchNorm2d, "bilinear"
    if spatial_dims == 3:
        return nn.Conv3d, nn.BatchNorm3d, "trilinear"
    raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")


class AttentionBlock(nn.Module):
    r"""Additive attention gate of the widely copied Attention U-Net blocks.

    ``x1 = BN(Conv1x1(x))``, ``g1 = up(BN(Conv1x1(g)))``, ``α = σ(BN(Conv1x1(relu(x1 + g1))))``,
    returns ``α ⊙ x``.

    Shapes: x (B, in_channels_x, *S) skip connection; g (B, in_channels_g, *Sg) gating signal;
    output (B, in_channels_x, *S). ``spatial_dims`` = 2 (the seeds) or 3.

    Submodules (state_dict keys): ``Wx`` = (0 Conv 1×1 with bias, 1 BatchNorm), ``Wg`` = (same),
    ``psi`` = (0 Conv int_channels→1 with bias, 1 BatchNorm(1), 2 Sigmoid).

    Quirks reproduced:

    * ``g`` is projected by ``Wg`` (conv + BN) at its own resolution *and then* interpolated to
      x's size, ``mode='bilinear'`` (``'trilinear'`` for ``spatial_dims=3``),
      ``align_corners=False``. The interpolation is called even when the sizes already agree (it
      is the identity then). Nothing stops ``Sg > S`` (it would downsample); the gate op's
      contract restricts itself to ``Sg <= S``.
    * ``double_sigmoid=True`` reproduces the widely copied variant which applies ``nn.Sigmoid()`` once more to
      ``psi``'s output (already a sigmoid), so α lies in (0.5, 0.731) instead of (0, 1).
    * The ReLU is a fresh ``nn.ReLU()`` built inside ``forward`` (no ``relu`` submodule, no key).
    """

    def __init__(self, in_channels_x: int, in_channels_g: int, int_channels: int, *, spatial_dims: int = 2,
                 double_sigmoid: bool = False):
        super().__init__()
        conv, norm, self.upsample_mode = _layers(spatial_dims)
        self.spatial_dims = spatial_dims
        self.double_sigmoid = bool(double_sigmoid)
        self.Wx = nn.Sequential(conv(in_channels_x, int_channels, kernel_size=1), norm(int_channels))
        self.Wg = nn.Sequential(conv(in_channels_g, int_channels, kernel_size=1), norm(int_channels))
        self.psi = nn.Sequential(conv(int_channels, 1, kernel_size=1), norm(1), nn.Sigmoid())

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        x1 = self.Wx(x)
        g1 = F.interpolate(self.Wg(g), x1.shape[2:], mode=self.upsample_mode, align_corners=False)
        out = self.psi(nn.ReLU()(x1 + g1))
        if self.double_sigmoid:
            out = nn.Sigmoid()(out)
        return out * x


class ConvBatchNorm(nn.Module):
    """``relu(BN(Conv3x3(x)))`` with padding 1: the conv block the widely copied ``AttentionUpBlock`` uses
    (keys ``conv.{weight,bias}``, ``batchnorm.*``; the ReLU has no parameters)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.batchnorm = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.batchnorm(self.conv(x)))


class AttentionUpBlock(nn.Module):
    r"""Decoder block of the widely copied Attention U-Net blocks: gate the skip connection with
    the coarse decoder features, upsample those features, concatenate, two conv blocks.

    ``forward(x, x_skip)``: x (B, in_channels, *Sc) from the previous (coarser) decoder stage,
    x_skip (B, out_channels, *S) from the encoder. Returns (B, out_channels, *S)::

        x_att = attention(x_skip, x)                      # gate: x_skip is gated, x is the signal
        x_up  = interpolate(x, S, bilinear, align_corners=False)
        y     = conv_bn2(conv_bn1(cat([x_att, x_up], dim=1)))   # gated skip FIRST

    Modules as in the public implementation: ``attention = AttentionBlock(out_channels,
    in_channels, int(out_channels / 2))`` (the gate's x is the skip, its gating signal the coarse
    decoder input), ``conv_bn1 = ConvBatchNorm(in_channels + out_channels, out_channels)``,
    ``conv_bn2 = ConvBatchNorm(out_channels, out_channels)`` (the form most copies define).

    Quirks reproduced:

    * ``upsample`` (ConvTranspose2d(in_channels, out_channels, 2, stride 2)) is built — its
      parameters are in the state_dict — but never used: x is upsampled by bilinear
      interpolation instead; its gradient is always None.
    * ``int(out_channels / 2)`` is 0 for ``out_channels = 1`` (a gate with no channels): kept.
    * ``double_sigmoid`` passes through to the gate (the widely copied variant).
    """

    # the classes built for ``attention`` and ``conv_bn1/2`` (a subclass with fast forwards swaps
    # them, keeping the keys)
    gate_module = AttentionBlock
    conv_module = ConvBatchNorm

    def __init__(self, in_channels: int, out_channels: int, *, double_sigmoid: bool = False):
        super().__init__()
        self.upsample = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.attention = self.gate_module(out_channels, in_channels, int(out_channels / 2),
                                          double_sigmoid=double_sigmoid)
        self.conv_bn1 = self.conv_module(in_channels + out_channels, out_channels)
        self.conv_bn2 = self.conv_module(out_channels, out_channels)

    def forward(self, x: torch.Tensor, x_skip: torch.Tensor) -> torch.Tensor:
        x_attention = self.attention(x_skip, x)
        x = F.interpolate(x, x_skip.shape[2:], mode="bilinear", align_corners=False)
        x = torch.cat((x_attention, x), dim=1)
        x = self.conv_bn1(x)
        return self.conv_bn2(x)


class Attention_block(nn.Module):  # noqa: N801 - the original's name
    r"""LeeJunHyun's attention gate (Image_Segmentation ``network.py``, AttU_Net).

    ``forward(g, x)`` — note the order: gating signal first. ``g1 = BN(Conv1x1(g))``,
    ``x1 = BN(Conv1x1(x))``, ``ψ = σ(BN(Conv1x1(relu(g1 + x1))))``, returns ``x ⊙ ψ``.

    Shapes: g (B, F_g, *S), x (B, F_l, *S) -> (B, F_l, *S). The original is 2-D;
    ``spatial_dims=3`` (keyword) builds the 3-D variant several forks use.

    Keys: ``W_g`` = (0 Conv, 1 BN), ``W_x`` = (0 Conv, 1 BN), ``psi`` = (0 Conv F_int→1,
    1 BN(1), 2 Sigmoid); ``relu`` is ReLU(inplace=True) (no parameters).

    Quirks reproduced: no resampling — g and x must have the same spatial size (or broadcast, as
    a 1×1 g does); the in-place ReLU overwrites the sum ``g1 + x1`` (harmless: nothing else
    holds it).
    """

    def __init__(self, F_g: int, F_l: int, F_int: int, *, spatial_dims: int = 2):  # noqa: N803 - the original's names
        super().__init__()
        conv, norm, _ = _layers(spatial_dims)
        self.spatial_dims = spatial_dims
        self.W_g = nn.Sequential(conv(F_g, F_int, kernel_size=1, stride=1, padding=0, bias=True), norm(F_int))
        self.W_x = nn.Sequential(conv(F_l, F_int, kernel_size=1, stride=1, padding=0, bias=True), norm(F_int))
        self.psi = nn.Sequential(conv(F_int, 1, kernel_size=1, stride=1, padding=0, bias=True), norm(1), nn.Sigmoid())
        self.relu = nn.ReLU(inplace=True)

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        g1 = self.W_g(g)
        x1 = self.W_x(x)
        psi = self.relu(g1 + x1)
        psi = self.psi(psi)
        return x * psi


class MonaiAttentionBlock(Attention_block):
    r"""MONAI's attention gate (``monai.networks.nets.attentionunet.AttentionBlock``): the math and
    ``forward(g, x)`` of :class:`Attention_block`, MONAI's constructor ``(spatial_dims, f_int, f_g,
    f_l, dropout=0.0)``.

    Each 1×1 conv sits in MONAI's ``Convolution(..., conv_only=True)``, an ``nn.Sequential`` whose
    only child is ``conv`` (conv_only also drops the dropout: ``dropout`` has no effect), so the
    keys are ``W_g.0.conv.*``, ``W_g.1.*`` (BN), ``W_x.0.conv.*``, ``W_x.1.*``, ``psi.0.conv.*``,
    ``psi.1.*``; ``relu`` is not in place. MONAI needs g at x's size.
    """

    def __init__(self, spatial_dims: int, f_int: int, f_g: int, f_l: int, dropout=0.0):
        super().__init__(f_g, f_l, f_int, spatial_dims=spatial_dims)
        for projection in (self.W_g, self.W_x, self.psi):
            projection[0] = nn.Sequential(OrderedDict(conv=projection[0]))
        self.relu = nn.ReLU()


class GridAttentionBlock(nn.Module):
    r"""Oktay's grid attention gate (``_GridAttentionBlockND``, mode ``'concatenation'``).

    With s = ``sub_sample_factor`` and S' = floor(S / s) the coarse grid::

        θx = Conv_s(x)          kernel s, stride s, no bias     (B, inter, *S')
        φg = up(Conv1x1(g), S') with bias                        (B, inter, *S')
        α' = σ(Conv1x1(relu(θx + φg)))  with bias                (B, 1, *S')
        α  = up(α', S)                                           (B, 1, *S)
        out = BN(Conv1x1(α ⊙ x))   (``W``, with bias)            (B, in_channels, *S)

    returns ``(out, α)``. ``spatial_dims`` = 2 (GridAttentionBlock2D) or 3 (GridAttentionBlock3D).
    The original's two other modes: ``"concatenation_debug"`` takes softplus instead of the ReLU,
    ``"concatenation_residual"`` a softmax of ψ over the coarse positions instead of the sigmoid.
    g may have any spatial size: it is resampled to S' (Oktay's ``unet_grid_attention_3D`` pools
    by (2, 2, 1), so its g keeps x's depth while θ halves it: g is downsampled along that axis).

    Keys: ``W.0`` conv, ``W.1`` BN, ``theta.weight`` (no bias), ``phi.{weight,bias}``,
    ``psi.{weight,bias}``.

    Quirks reproduced / documented:

    * ``inter_channels=None`` means ``in_channels // 2`` (at least 1).
    * There is no BatchNorm on θ, φ or ψ; the only BN is in the output transform ``W``.
    * The original calls ``F.upsample(..., mode='bilinear'|'trilinear')`` without
      ``align_corners``; on every torch since 0.4 that means ``align_corners=False``, which is what
      is reproduced here (torch 0.3, which the repository targeted, aligned corners).
    * The original's ``GridAttentionBlock2D`` defaults ``sub_sample_factor=(2,2,2)`` — a 3-tuple for
      a 2-D conv, which fails at the first forward; its networks always pass it explicitly. Here an
      int is expanded to ``spatial_dims`` entries (default 2).
    * Weight initialisation (the original's kaiming init) is not part of the math and is left at
      torch's defaults.
    """

    MODES = ("concatenation", "concatenation_debug", "concatenation_residual")

    def __init__(self, in_channels: int, gating_channels: int, inter_channels: Union[int, None] = None, *,
                 spatial_dims: int = 2, sub_sample_factor: Union[int, Sequence[int]] = 2,
                 mode: str = "concatenation"):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        conv, norm, self.upsample_mode = _layers(spatial_dims)
        if isinstance(sub_sample_factor, int):
            sub_sample_factor = (sub_sample_factor,) * spatial_dims
        self.sub_sample_factor: Tuple[int, ...] = tuple(int(s) for s in sub_sample_factor)
        if len(self.sub_sample_factor) != spatial_dims:
            raise ValueError(f"sub_sample_factor must have {spatial_dims} entries, got {sub_sample_factor!r}")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.gating_channels = gating_channels
        self.inter_channels = inter_channels if inter_channels is not None else max(in_channels // 2, 1)
        self.W = nn.Sequential(conv(in_channels, in_channels, kernel_size=1), norm(in_channels))
        self.theta = conv(in_channels, self.inter_channels, kernel_size=self.sub_sample_factor,
                          stride=self.sub_sample_factor, padding=0, bias=False)
        self.phi = conv(gating_channels, self.inter_channels, kernel_size=1, bias=True)
        self.psi = conv(self.inter_channels, 1, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        theta_x = self.theta(x)
        phi_g = F.interpolate(self.phi(g), size=theta_x.shape[2:], mode=self.upsample_mode, align_corners=False)
        if self.mode == "concatenation_debug":
            f = F.softplus(theta_x + phi_g)
        else:
            f = F.relu(theta_x + phi_g, inplace=True)
        if self.mode == "concatenation_residual":   # a softmax over the positions, not a sigmoid
            psi_f = self.psi(f)
            sigm_psi_f = F.softmax(psi_f.view(psi_f.shape[0], 1, -1), dim=2).view(psi_f.shape)
        else:
            sigm_psi_f = torch.sigmoid(self.psi(f))
        sigm_psi_f = F.interpolate(sigm_psi_f, size=x.shape[2:], mode=self.upsample_mode, align_corners=False)
        y = sigm_psi_f.expand_as(x) * x
        return self.W(y), sigm_psi_f
