"""Drop-in Attention U-Net gates: the originals' class names, constructor signatures and
``state_dict`` keys, running :func:`medattn_fast.functional.attention_gate` inside.

    from medattn_fast.compat.attention_unet import AttentionBlock, AttentionUpBlock, Attention_block

* ``AttentionBlock(in_channels_x, in_channels_g, int_channels)`` — the widely copied blocks; keys
  ``Wx.{0,1}``, ``Wg.{0,1}``, ``psi.{0,1}``; ``forward(x, g)``; g interpolated to x's size.
* ``AttentionUpBlock(in_channels, out_channels)`` — the widely copied blocks; keys ``upsample`` (built, never
  used, as in the original), ``attention``, ``conv_bn1``, ``conv_bn2``; ``forward(x, x_skip)``.
* ``Attention_block(F_g, F_l, F_int)`` — LeeJunHyun; keys ``W_g``, ``W_x``, ``psi``;
  ``forward(g, x)``.
* ``MonaiAttentionBlock(spatial_dims, f_int, f_g, f_l)`` — MONAI's ``AttentionBlock`` (same
  name as the seeds' class: :func:`medattn_fast.convert` tells them apart); keys ``W_g.0.conv``,
  ``W_g.1``, ``W_x.*``, ``psi.*``; ``forward(g, x)``.
* ``GridAttentionBlock2D`` / ``GridAttentionBlock3D(in_channels, gating_channels,
  inter_channels=None, mode="concatenation", sub_sample_factor)`` — Oktay's grid gate
  (Attention-Gated-Networks); keys ``W.{0,1}``, ``theta``, ``phi``, ``psi``; ``forward(x, g)``
  returns ``(W_y, α)`` with α upsampled to x, as the original.

Each loads the original's (or :mod:`medattn_fast.reference.attention_gate`'s) ``state_dict`` with
``strict=True`` and gives the same outputs, gradients and BN running statistics in ``train()``
and ``eval()``. ``from_original(module)`` builds the twin of an existing instance (used by
:func:`medattn_fast.convert`).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as MF
from ..reference import attention_gate as R
from ..reference.attention_gate import GridAttentionBlock as _ReferenceGridBlock
from ._adopt import adopt

__all__ = ["AttentionBlock", "AttentionUpBlock", "Attention_block", "ConvBatchNorm", "GridAttentionBlock2D",
           "GridAttentionBlock3D", "MonaiAttentionBlock", "COMPAT_CLASSES"]


def _layers(spatial_dims: int):
    if spatial_dims == 2:
        return nn.Conv2d, nn.BatchNorm2d
    if spatial_dims == 3:
        return nn.Conv3d, nn.BatchNorm3d
    raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")


def _bn(module: nn.Module) -> MF.BatchNormParams:
    return MF.BatchNormParams.from_module(module)


def _expect_conv(conv, what: str, *, kernel_is_stride: bool = False, bias: Optional[bool] = None) -> nn.Module:
    """Refuse (ValueError) a projection we do not reproduce: ``conv`` must be a plain Conv2d/3d,
    1×1 with stride 1 (or, ``kernel_is_stride``, Oktay's θ: kernel = stride), no padding, no
    dilation, one group; ``bias`` True/False requires/forbids a bias."""
    if type(conv) not in (nn.Conv2d, nn.Conv3d):   # a subclass may compute otherwise (weight standardisation ...)
        raise ValueError(f"{what} must be an nn.Conv2d/nn.Conv3d, got {type(conv).__name__}")
    nd = conv.weight.dim() - 2
    kernel = tuple(conv.kernel_size)
    ok = (tuple(conv.stride) == kernel if kernel_is_stride else kernel == (1,) * nd and tuple(conv.stride) == (1,) * nd)
    ok = ok and all(p == 0 for p in conv.padding) and tuple(conv.dilation) == (1,) * nd and conv.groups == 1
    ok = ok and conv.padding_mode == "zeros"
    if not ok:
        expected = "kernel = stride" if kernel_is_stride else "a 1×1 kernel, stride 1"
        raise ValueError(f"{what} must be a convolution with {expected}, no padding, dilation 1 and one group, "
                         f"got {conv!r}")
    if bias is not None and (conv.bias is not None) != bias:
        raise ValueError(f"{what} must be built with bias={bias}, got bias={conv.bias is not None}")
    return conv


def _expect_type(module, what: str, kinds) -> None:
    if not isinstance(module, kinds):
        names = " or ".join(k.__name__ for k in (kinds if isinstance(kinds, tuple) else (kinds,)))
        raise ValueError(f"{what} must be {names}, got {type(module).__name__}")


def _monai_conv(layer: nn.Module, what: str) -> nn.Module:
    """The conv inside MONAI's ``Convolution(..., conv_only=True)``: a Sequential whose only child
    is ``conv`` (conv_only drops the norm/dropout/activation block)."""
    children = dict(layer.named_children())
    if set(children) != {"conv"}:
        raise ValueError(f"{what} must be MONAI's Convolution(conv_only=True) (one child 'conv'), got children "
                         f"{sorted(children)}")
    return children["conv"]


def _expect_gate_layers(module: nn.Module, x_name: str, g_name: str, monai: bool = False) -> None:
    """The additive gate's layers: (1×1 conv, BN) projections and ψ = (1×1 conv to 1 channel, BN(1),
    Sigmoid); ``monai``: each conv wrapped in MONAI's ``Convolution``."""
    for name in (x_name, g_name, "psi"):
        seq = getattr(module, name)
        _expect_type(seq, name, nn.Sequential)
        if len(seq) != (3 if name == "psi" else 2):
            raise ValueError(f"{name} must hold {3 if name == 'psi' else 2} layers, got {len(seq)}")
        _expect_conv(_monai_conv(seq[0], f"{name}.0") if monai else seq[0], f"{name}.0")
        _expect_type(seq[1], f"{name}.1", nn.modules.batchnorm._BatchNorm)
    _expect_type(module.psi[2], "psi.2", nn.Sigmoid)


def _mirror_layers(new_seq: nn.Sequential, old_seq: nn.Sequential) -> None:
    """Match a (conv, BN, ...) pair of the original exactly: a conv without bias stays without,
    and the BN is copied (momentum, eps, affine, track_running_stats) rather than assumed."""
    conv_new, conv_old = new_seq[0], old_seq[0]
    if conv_old.bias is None and conv_new.bias is not None:
        conv_new.register_parameter("bias", None)
    new_seq[1] = copy.deepcopy(old_seq[1])


class AttentionBlock(R.AttentionBlock):
    r"""The widely copied Attention U-Net gate, fast inside (the reference's modules and keys).

    ``α = σ(BN(psi·relu(BN(Wx·x) + up(BN(Wg·g)))))`` (σ applied twice with
    ``double_sigmoid=True``: the widely copied variant), returns ``α ⊙ x``.

    Shapes: x (B, in_channels_x, *S), g (B, in_channels_g, *Sg) with Sg <= S -> (B, in_channels_x, *S).
    ``spatial_dims=3`` for volumes (trilinear interpolation).

    Submodules and keys as the original: ``Wx`` (0 Conv, 1 BN), ``Wg`` (0 Conv, 1 BN), ``psi``
    (0 Conv, 1 BN, 2 Sigmoid). The modules hold the parameters; ``forward`` hands them to
    :func:`medattn_fast.functional.attention_gate` (BN folded into the convs in eval mode).
    """

    ORIGINAL_CODE = frozenset()   # the seeds' own code: only its restatement is known (MONAI's has its twin)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return MF.attention_gate(
            x, g, self.Wx[0].weight, self.Wx[0].bias, self.Wg[0].weight, self.Wg[0].bias,
            self.psi[0].weight, self.psi[0].bias, bn_x=_bn(self.Wx[1]), bn_g=_bn(self.Wg[1]),
            bn_psi=_bn(self.psi[1]), training=self.training, double_sigmoid=self.double_sigmoid,
        )

    @classmethod
    def from_original(cls, module: nn.Module, *, double_sigmoid: Optional[bool] = None) -> "AttentionBlock":
        """The twin of an original ``AttentionBlock``: channel counts and 2-D/3-D read from its
        convs, parameters and buffers loaded strictly, device, dtype and training mode copied.

        The extra sigmoid of one widely copied variant is not visible in the parameters: it is taken from the module's
        ``double_sigmoid`` attribute when it has one (the reference module does), else from the
        ``double_sigmoid`` argument (default False).
        """
        _expect_gate_layers(module, "Wx", "Wg")
        conv_x, conv_g = module.Wx[0], module.Wg[0]
        if double_sigmoid is None:
            double_sigmoid = bool(getattr(module, "double_sigmoid", False))
        new = cls(conv_x.in_channels, conv_g.in_channels, conv_x.out_channels,
                  spatial_dims=conv_x.weight.dim() - 2, double_sigmoid=double_sigmoid)
        for name in ("Wx", "Wg", "psi"):
            _mirror_layers(getattr(new, name), getattr(module, name))
        return adopt(new, module)


class ConvBatchNorm(R.ConvBatchNorm):
    """``relu(BN(Conv3x3(x)))``, padding 1 — the seeds' conv block, keys ``conv.*``, ``batchnorm.*``.

    Eval mode folds the BN into the convolution (one pass instead of three); training mode runs
    conv → batch norm (batch statistics, running-stat update) → ReLU like the original.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.batchnorm
        if self.training or bn.running_mean is None:
            return self.relu(bn(self.conv(x)))
        acc = torch.promote_types(self.conv.weight.dtype, torch.float32)
        scale = torch.rsqrt(bn.running_var.to(acc) + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.to(acc)
        shift = -bn.running_mean.to(acc)
        if self.conv.bias is not None:
            shift = shift + self.conv.bias.to(acc)
        shift = shift * scale
        if bn.bias is not None:
            shift = shift + bn.bias.to(acc)
        weight = (self.conv.weight.to(acc) * scale.view(-1, 1, 1, 1)).to(x.dtype)
        return F.conv2d(x, weight, shift.to(x.dtype), padding=self.conv.padding).relu_()


class AttentionUpBlock(R.AttentionUpBlock):
    r"""The widely copied Attention U-Net decoder block, fast gate inside.

    ``forward(x, x_skip)``: x (B, in_channels, *Sc) coarse decoder features, x_skip
    (B, out_channels, *S) encoder features, Sc <= S -> (B, out_channels, *S)::

        y = conv_bn2(conv_bn1(cat([attention(x_skip, x), up(x, S)], dim=1)))

    with ``attention = AttentionBlock(out_channels, in_channels, int(out_channels / 2))`` and
    ``up`` bilinear, ``align_corners=False``. ``upsample`` (ConvTranspose2d k2 s2) is built so that
    checkpoints load, and — as in the original — never used.
    """

    gate_module = AttentionBlock
    conv_module = ConvBatchNorm

    def forward(self, x: torch.Tensor, x_skip: torch.Tensor) -> torch.Tensor:
        gated = self.attention(x_skip, x)
        if x.shape[2:] != x_skip.shape[2:]:
            x = F.interpolate(x, x_skip.shape[2:], mode="bilinear", align_corners=False)
        return self.conv_bn2(self.conv_bn1(torch.cat((gated, x), dim=1)))

    @classmethod
    def from_original(cls, module: nn.Module, *, double_sigmoid: Optional[bool] = None) -> "AttentionUpBlock":
        """The twin of an original ``AttentionUpBlock`` (channels read from ``upsample``; the
        gate's double sigmoid as in :meth:`AttentionBlock.from_original`)."""
        if double_sigmoid is None:
            double_sigmoid = bool(getattr(module.attention, "double_sigmoid", False))
        _expect_gate_layers(module.attention, "Wx", "Wg")
        new = cls(module.upsample.in_channels, module.upsample.out_channels, double_sigmoid=double_sigmoid)
        for name in ("Wx", "Wg", "psi"):
            _mirror_layers(getattr(new.attention, name), getattr(module.attention, name))
        for name in ("conv_bn1", "conv_bn2"):
            new_block, old_block = getattr(new, name), getattr(module, name)
            if old_block.conv.bias is None:
                new_block.conv.register_parameter("bias", None)
            new_block.batchnorm = copy.deepcopy(old_block.batchnorm)
        return adopt(new, module)


class Attention_block(nn.Module):  # noqa: N801 - the original's name
    r"""LeeJunHyun's attention gate, fast inside.

    ``forward(g, x)`` (gating signal first): ``ψ = σ(BN(psi·relu(BN(W_g·g) + BN(W_x·x))))``,
    returns ``x ⊙ ψ``. Shapes: g (B, F_g, *Sg), x (B, F_l, *S) -> (B, F_l, *S).

    Keys as the original: ``W_g`` (0 Conv, 1 BN), ``W_x`` (0 Conv, 1 BN), ``psi`` (0 Conv, 1 BN,
    2 Sigmoid), ``relu``. The original needs Sg == S (or a broadcastable 1×1 g, which equals an
    upsampled one); this one also accepts a smaller g and interpolates it bilinearly.
    ``spatial_dims=3`` builds the 3-D variant several forks use.
    """

    def __init__(self, F_g: int, F_l: int, F_int: int, *, spatial_dims: int = 2):  # noqa: N803
        super().__init__()
        conv, norm = _layers(spatial_dims)
        self.spatial_dims = spatial_dims
        self.W_g = nn.Sequential(conv(F_g, F_int, kernel_size=1, stride=1, padding=0, bias=True), norm(F_int))
        self.W_x = nn.Sequential(conv(F_l, F_int, kernel_size=1, stride=1, padding=0, bias=True), norm(F_int))
        self.psi = nn.Sequential(conv(F_int, 1, kernel_size=1, stride=1, padding=0, bias=True), norm(1), nn.Sigmoid())
        self.relu = nn.ReLU(inplace=True)

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return MF.attention_gate(
            x, g, self.W_x[0].weight, self.W_x[0].bias, self.W_g[0].weight, self.W_g[0].bias,
            self.psi[0].weight, self.psi[0].bias, bn_x=_bn(self.W_x[1]), bn_g=_bn(self.W_g[1]),
            bn_psi=_bn(self.psi[1]), training=self.training,
        )

    @classmethod
    def from_original(cls, module: nn.Module) -> "Attention_block":
        """The twin of an original ``Attention_block`` (F_g, F_l, F_int and 2-D/3-D from its convs)."""
        _expect_gate_layers(module, "W_x", "W_g")
        _expect_type(module.relu, "relu", nn.ReLU)
        conv_g, conv_x = module.W_g[0], module.W_x[0]
        new = cls(conv_g.in_channels, conv_x.in_channels, conv_x.out_channels, spatial_dims=conv_x.weight.dim() - 2)
        for name in ("W_g", "W_x", "psi"):
            _mirror_layers(getattr(new, name), getattr(module, name))
        return adopt(new, module)


class _ConvOnly(nn.Module):
    """MONAI's ``Convolution(..., conv_only=True)`` as far as its keys go: one child ``conv``."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv


class MonaiAttentionBlock(nn.Module):
    r"""MONAI's attention gate (``monai.networks.nets.attentionunet.AttentionBlock``), fast inside.

    ``forward(g, x)``: ``ψ = σ(BN(psi·relu(BN(W_g·g) + BN(W_x·x))))``, returns ``x ⊙ ψ`` — the
    additive gate. Shapes: g (B, f_g, *S), x (B, f_l, *S) -> (B, f_l, *S) (MONAI needs g at x's
    size; a smaller g is also accepted here and interpolated). Keys as MONAI's: ``W_g.0.conv``,
    ``W_g.1`` (BN), ``W_x.0.conv``, ``W_x.1``, ``psi.0.conv``, ``psi.1``, ``psi.2`` (Sigmoid); the
    constructor is MONAI's ``(spatial_dims, f_int, f_g, f_l, dropout=0.0)`` (MONAI builds its
    convs with ``conv_only=True``, which drops the dropout: so does this).
    """

    ORIGINAL_CODE = frozenset({"ee94b85d34483440"})   # MONAI 1.6.1's AttentionBlock (convert's fingerprint)
    REFERENCE_NAMES = ()

    def __init__(self, spatial_dims: int, f_int: int, f_g: int, f_l: int, dropout=0.0):
        super().__init__()
        conv, norm = _layers(spatial_dims)
        self.spatial_dims = spatial_dims
        self.W_g = nn.Sequential(_ConvOnly(conv(f_g, f_int, kernel_size=1)), norm(f_int))
        self.W_x = nn.Sequential(_ConvOnly(conv(f_l, f_int, kernel_size=1)), norm(f_int))
        self.psi = nn.Sequential(_ConvOnly(conv(f_int, 1, kernel_size=1)), norm(1), nn.Sigmoid())
        self.relu = nn.ReLU()

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return MF.attention_gate(
            x, g, self.W_x[0].conv.weight, self.W_x[0].conv.bias, self.W_g[0].conv.weight, self.W_g[0].conv.bias,
            self.psi[0].conv.weight, self.psi[0].conv.bias, bn_x=_bn(self.W_x[1]), bn_g=_bn(self.W_g[1]),
            bn_psi=_bn(self.psi[1]), training=self.training,
        )

    @classmethod
    def from_original(cls, module: nn.Module) -> "MonaiAttentionBlock":
        """The twin of a MONAI ``AttentionBlock`` (f_int, f_g, f_l and 2-D/3-D from its convs)."""
        _expect_gate_layers(module, "W_x", "W_g", monai=True)
        _expect_type(module.relu, "relu", nn.ReLU)
        conv_g, conv_x = module.W_g[0].conv, module.W_x[0].conv
        new = cls(conv_x.weight.dim() - 2, conv_x.out_channels, conv_g.in_channels, conv_x.in_channels)
        for name in ("W_g", "W_x", "psi"):
            new_seq, old_seq = getattr(new, name), getattr(module, name)
            if old_seq[0].conv.bias is None:
                new_seq[0].conv.register_parameter("bias", None)
            new_seq[1] = copy.deepcopy(old_seq[1])
        return adopt(new, module)


class _GridAttentionBlock(_ReferenceGridBlock):
    r"""Oktay's grid gate (``_GridAttentionBlockND``, mode ``"concatenation"``), fast inside.

    The module tree and keys are the reference's (:class:`medattn_fast.reference.attention_gate.
    GridAttentionBlock`, which documents the original's math and quirks); ``forward`` runs
    :func:`medattn_fast.functional.attention_gate` in ``mode="grid"``:
    x (B, Cx, *S), g (B, Cg, *Sg) of any spatial size (resampled to the strided grid
    S // sub_sample_factor, as the original does) -> ``(W_y (B, Cx, *S), α (B, 1, *S))``.

    Only the original's mode ``"concatenation"`` is reproduced; ``from_original`` refuses the
    others (``concatenation_debug``: softplus; ``concatenation_residual``: a softmax over positions).
    """

    SPATIAL_DIMS = 2
    REFERENCE_NAMES = ("GridAttentionBlock",)   # the restatement in medattn_fast.reference

    def __init__(self, in_channels: int, gating_channels: int, inter_channels: Optional[int] = None,
                 mode: str = "concatenation", sub_sample_factor=2):
        if mode != "concatenation":
            raise ValueError(f"{type(self).__name__}: only mode 'concatenation' (Oktay's Attention U-Net gate) "
                             f"is implemented, got {mode!r}")
        super().__init__(in_channels, gating_channels, inter_channels, spatial_dims=self.SPATIAL_DIMS,
                         sub_sample_factor=sub_sample_factor)
        self.mode = mode

    def forward(self, x: torch.Tensor, g: torch.Tensor):
        return MF.attention_gate(
            x, g, self.theta.weight, self.theta.bias, self.phi.weight, self.phi.bias, self.psi.weight,
            self.psi.bias, out_weight=self.W[0].weight, out_bias=self.W[0].bias, bn_out=_bn(self.W[1]),
            training=self.training, mode="grid", return_alpha=True)

    @classmethod
    def from_original(cls, module: nn.Module) -> "_GridAttentionBlock":
        """The twin of an original ``GridAttentionBlock{2,3}D`` (channels and the sub-sampling
        factor from its θ conv). Raises ValueError for another mode or other layers."""
        mode = getattr(module, "mode", "concatenation")
        if mode != "concatenation":
            raise ValueError(f"mode {mode!r} is not reproduced (only 'concatenation', the Attention U-Net gate)")
        theta, phi = module.theta, module.phi
        _expect_conv(theta, "theta", kernel_is_stride=True, bias=False)
        if theta.weight.dim() - 2 != cls.SPATIAL_DIMS:
            raise ValueError(f"theta must be a {cls.SPATIAL_DIMS}-D convolution, got {type(theta).__name__}")
        _expect_conv(phi, "phi", bias=True)
        _expect_conv(module.psi, "psi", bias=True)
        _expect_type(module.W, "W", nn.Sequential)
        if len(module.W) != 2:
            raise ValueError(f"W must hold 2 layers (conv, BN), got {len(module.W)}")
        _expect_conv(module.W[0], "W.0")
        _expect_type(module.W[1], "W.1", nn.modules.batchnorm._BatchNorm)
        upsample_mode = getattr(module, "upsample_mode", None)
        if upsample_mode not in (None, "bilinear" if cls.SPATIAL_DIMS == 2 else "trilinear"):
            raise ValueError(f"upsample_mode {upsample_mode!r} is not reproduced for a {cls.SPATIAL_DIMS}-D gate")
        new = cls(theta.in_channels, phi.in_channels, theta.out_channels, sub_sample_factor=tuple(theta.kernel_size))
        _mirror_layers(new.W, module.W)
        return adopt(new, module)


class GridAttentionBlock2D(_GridAttentionBlock):
    SPATIAL_DIMS = 2


class GridAttentionBlock3D(_GridAttentionBlock):
    SPATIAL_DIMS = 3


COMPAT_CLASSES = {
    "AttentionBlock": (AttentionBlock, MonaiAttentionBlock),
    "AttentionUpBlock": AttentionUpBlock,
    "Attention_block": Attention_block,
    # MONAI's gate shares the seeds' class name: the code fingerprint and the layers pick the twin
    "GridAttentionBlock2D": GridAttentionBlock2D,
    "GridAttentionBlock3D": GridAttentionBlock3D,
}
