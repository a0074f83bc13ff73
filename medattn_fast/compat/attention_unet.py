"""Drop-in Attention U-Net gates, running :func:`medattn_fast.functional.attention_gate` inside::

    from medattn_fast.compat.attention_unet import AttentionBlock, AttentionUpBlock, Attention_block

Each class is a subclass of its namesake in :mod:`medattn_fast.reference.attention_gate` (the
math, shapes, keys and quirks of each original are documented there): the widely copied
``AttentionBlock``/``AttentionUpBlock``/``ConvBatchNorm``, LeeJunHyun's ``Attention_block``,
MONAI's ``AttentionBlock`` (:class:`MonaiAttentionBlock`: same class name as the seeds',
:func:`medattn_fast.convert` tells them apart) and Oktay's ``GridAttentionBlock2D/3D``. Only
``forward`` is replaced: the whole gate is one op (BN folded into the convs in eval), with the
same outputs, gradients and BN running statistics in ``train()`` and ``eval()``.
``from_original(module)`` builds the twin of an existing instance after checking that its layers
are the ones reproduced (ValueError otherwise).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as MF
from ..reference import attention_gate as R
from ._adopt import FromOriginal

__all__ = ["AttentionBlock", "AttentionUpBlock", "Attention_block", "ConvBatchNorm", "GridAttentionBlock2D",
           "GridAttentionBlock3D", "MonaiAttentionBlock", "COMPAT_CLASSES"]


def _bn(module: nn.Module) -> MF.BatchNormParams:
    return MF.BatchNormParams.from_module(module)


def _additive_gate(x, g, proj_x: nn.Sequential, proj_g: nn.Sequential, psi: nn.Sequential, training: bool,
                   double_sigmoid: bool = False) -> torch.Tensor:
    """The additive gate from its three (conv, BN, ...) projections; a conv may sit in MONAI's
    conv-only ``Convolution`` (a Sequential with one child ``conv``)."""
    cx, cg, cp = (s[0].conv if isinstance(s[0], nn.Sequential) else s[0] for s in (proj_x, proj_g, psi))
    return MF.attention_gate(x, g, cx.weight, cx.bias, cg.weight, cg.bias, cp.weight, cp.bias, bn_x=_bn(proj_x[1]),
                             bn_g=_bn(proj_g[1]), bn_psi=_bn(psi[1]), training=training, double_sigmoid=double_sigmoid)


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


def _expect_gate_layers(module: nn.Module, x_name: str, g_name: str, monai: bool = False):
    """The additive gate's layers: (1×1 conv, BN) projections and ψ = (1×1 conv to 1 channel, BN(1),
    Sigmoid); ``monai``: each conv wrapped in MONAI's ``Convolution``. Returns the x and g convs."""
    convs = {}
    for name in (x_name, g_name, "psi"):
        seq = getattr(module, name)
        _expect_type(seq, name, nn.Sequential)
        if len(seq) != (3 if name == "psi" else 2):
            raise ValueError(f"{name} must hold {3 if name == 'psi' else 2} layers, got {len(seq)}")
        convs[name] = _expect_conv(_monai_conv(seq[0], f"{name}.0") if monai else seq[0], f"{name}.0")
        _expect_type(seq[1], f"{name}.1", nn.modules.batchnorm._BatchNorm)
    _expect_type(module.psi[2], "psi.2", nn.Sigmoid)
    return convs[x_name], convs[g_name]


class AttentionBlock(FromOriginal, R.AttentionBlock):
    """:class:`medattn_fast.reference.attention_gate.AttentionBlock` as one
    :func:`medattn_fast.functional.attention_gate` call.

    ``from_original(module, double_sigmoid=None)``: the extra sigmoid of the widely copied variant
    is not visible in the parameters; it is taken from the module's ``double_sigmoid`` attribute
    when it has one (the reference module does), else from the argument (default False).
    """

    ORIGINAL_CODE = frozenset()   # the seeds' own code: only its restatement is known (MONAI's has its twin)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return _additive_gate(x, g, self.Wx, self.Wg, self.psi, self.training, self.double_sigmoid)

    @classmethod
    def _init_args(cls, module, *, double_sigmoid: Optional[bool] = None):
        conv_x, conv_g = _expect_gate_layers(module, "Wx", "Wg")
        if double_sigmoid is None:
            double_sigmoid = bool(getattr(module, "double_sigmoid", False))
        return ((conv_x.in_channels, conv_g.in_channels, conv_x.out_channels),
                dict(spatial_dims=conv_x.weight.dim() - 2, double_sigmoid=double_sigmoid))


class ConvBatchNorm(R.ConvBatchNorm):
    """:class:`medattn_fast.reference.attention_gate.ConvBatchNorm` whose eval mode folds the BN
    into the convolution (one pass instead of three); training mode is the original's."""

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


class AttentionUpBlock(FromOriginal, R.AttentionUpBlock):
    """:class:`medattn_fast.reference.attention_gate.AttentionUpBlock` on the fast gate and conv
    blocks (x is interpolated only when its size differs from the skip's: the identity otherwise).
    ``from_original(module, double_sigmoid=None)`` as :class:`AttentionBlock`'s."""

    gate_module = AttentionBlock
    conv_module = ConvBatchNorm

    def forward(self, x: torch.Tensor, x_skip: torch.Tensor) -> torch.Tensor:
        gated = self.attention(x_skip, x)
        if x.shape[2:] != x_skip.shape[2:]:
            x = F.interpolate(x, x_skip.shape[2:], mode="bilinear", align_corners=False)
        return self.conv_bn2(self.conv_bn1(torch.cat((gated, x), dim=1)))

    @classmethod
    def _init_args(cls, module, *, double_sigmoid: Optional[bool] = None):
        _expect_gate_layers(module.attention, "Wx", "Wg")
        if double_sigmoid is None:
            double_sigmoid = bool(getattr(module.attention, "double_sigmoid", False))
        return (module.upsample.in_channels, module.upsample.out_channels), dict(double_sigmoid=double_sigmoid)


class Attention_block(FromOriginal, R.Attention_block):  # noqa: N801 - the original's name
    """:class:`medattn_fast.reference.attention_gate.Attention_block` as one
    :func:`medattn_fast.functional.attention_gate` call; unlike the original, a g smaller than x
    is also accepted (interpolated to x's size)."""

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return _additive_gate(x, g, self.W_x, self.W_g, self.psi, self.training)

    @classmethod
    def _init_args(cls, module):
        conv_x, conv_g = _expect_gate_layers(module, "W_x", "W_g")
        _expect_type(module.relu, "relu", nn.ReLU)
        return (conv_g.in_channels, conv_x.in_channels, conv_x.out_channels), dict(spatial_dims=conv_x.weight.dim() - 2)


class MonaiAttentionBlock(FromOriginal, R.MonaiAttentionBlock):
    """:class:`medattn_fast.reference.attention_gate.MonaiAttentionBlock` (MONAI's
    ``AttentionBlock``) as one :func:`medattn_fast.functional.attention_gate` call; a g smaller
    than x is also accepted (interpolated to x's size)."""

    ORIGINAL_CODE = frozenset({"ee94b85d34483440"})   # MONAI 1.6.1's AttentionBlock (convert's fingerprint)
    REFERENCE_NAMES = ()

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return _additive_gate(x, g, self.W_x, self.W_g, self.psi, self.training)

    @classmethod
    def _init_args(cls, module):
        conv_x, conv_g = _expect_gate_layers(module, "W_x", "W_g", monai=True)
        _expect_type(module.relu, "relu", nn.ReLU)
        return (conv_x.weight.dim() - 2, conv_x.out_channels, conv_g.in_channels, conv_x.in_channels), {}


class _GridAttentionBlock(FromOriginal, R.GridAttentionBlock):
    """Oktay's ``GridAttentionBlock2D/3D``: :class:`medattn_fast.reference.attention_gate.
    GridAttentionBlock` (which documents the math and quirks) with the original's constructor
    signature, as one :func:`medattn_fast.functional.attention_gate` call in ``mode="grid"``,
    returning ``(W_y, α)``. Only the original's mode ``"concatenation"`` is reproduced: the
    constructor and ``from_original`` refuse the others (``concatenation_debug``: softplus;
    ``concatenation_residual``: a softmax over positions)."""

    SPATIAL_DIMS = 2
    REFERENCE_NAMES = ("GridAttentionBlock",)   # the restatement in medattn_fast.reference

    def __init__(self, in_channels: int, gating_channels: int, inter_channels: Optional[int] = None,
                 mode: str = "concatenation", sub_sample_factor=2):
        if mode != "concatenation":
            raise ValueError(f"{type(self).__name__}: only mode 'concatenation' (Oktay's Attention U-Net gate) "
                             f"is implemented, got {mode!r}")
        super().__init__(in_channels, gating_channels, inter_channels, spatial_dims=self.SPATIAL_DIMS,
                         sub_sample_factor=sub_sample_factor)

    def forward(self, x: torch.Tensor, g: torch.Tensor):
        return MF.attention_gate(
            x, g, self.theta.weight, self.theta.bias, self.phi.weight, self.phi.bias, self.psi.weight,
            self.psi.bias, out_weight=self.W[0].weight, out_bias=self.W[0].bias, bn_out=_bn(self.W[1]),
            training=self.training, mode="grid", return_alpha=True)

    @classmethod
    def _init_args(cls, module):
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
        return (theta.in_channels, phi.in_channels, theta.out_channels), dict(sub_sample_factor=tuple(theta.kernel_size))


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
