"""Attention U-Net gates (:mod:`medattn_fast.reference.attention_gate`), fast inside (see
:mod:`medattn_fast.compat`): the widely copied ``AttentionBlock``/``AttentionUpBlock``/``ConvBatchNorm``,
LeeJunHyun's ``Attention_block``, MONAI's ``AttentionBlock`` (:class:`MonaiAttentionBlock`: same
class name as the widely copied one, :func:`medattn_fast.convert` tells them apart) and Oktay's
``GridAttentionBlock2D/3D``::

    from medattn_fast.compat.attention_unet import AttentionBlock, AttentionUpBlock, Attention_block

The whole gate is one :func:`medattn_fast.functional.attention_gate` call (BN folded into the
convs in eval), with the same outputs, gradients and BN running statistics in ``train()`` and
``eval()``, and with every mix of the two: each BN follows its own flag (a frozen BN in a
``train()`` model keeps its statistics), as in the originals. ``from_original`` refuses (ValueError) an original whose layers are not the ones reproduced.
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


def _as_original_under_autocast(result, x: torch.Tensor, *, grid: bool):
    """The dtype the original gate returns under AMP autocast (float64 x: unchanged, autocast
    leaves it alone): the additive gate ends with ``x * α``, α from an autocast conv, so
    promote(autocast dtype, x) (float32 x stays float32, float16 x under bfloat16 becomes float32);
    Oktay's grid gate ends with the output conv and BN, so the autocast dtype (α too)."""
    if x.dtype == torch.float64 or x.device.type not in ("cpu", "cuda") \
            or not torch.is_autocast_enabled(x.device.type):
        return result
    amp = torch.get_autocast_dtype(x.device.type)
    dtype = amp if grid else torch.promote_types(amp, x.dtype)
    return tuple(r.to(dtype) for r in result) if isinstance(result, tuple) else result.to(dtype)


def _additive_gate(x, g, proj_x: nn.Sequential, proj_g: nn.Sequential, psi: nn.Sequential, training: bool,
                   double_sigmoid: bool = False) -> torch.Tensor:
    """The additive gate from its three (conv, BN, ...) projections; a conv may sit in MONAI's
    conv-only ``Convolution`` (a Sequential with one child ``conv``)."""
    cx, cg, cp = (s[0].conv if isinstance(s[0], nn.Sequential) else s[0] for s in (proj_x, proj_g, psi))
    out = MF.attention_gate(x, g, cx.weight, cx.bias, cg.weight, cg.bias, cp.weight, cp.bias, bn_x=_bn(proj_x[1]),
                            bn_g=_bn(proj_g[1]), bn_psi=_bn(psi[1]), training=training, double_sigmoid=double_sigmoid)
    return _as_original_under_autocast(out, x, grid=False)


class _Gate(FromOriginal):
    """A gate's fused forward reads its BatchNorms' statistics without calling them: the
    original's norms must be BatchNorms."""

    MIRRORED_NORMS, NORM_NAMES = (nn.modules.batchnorm._BatchNorm,), "BatchNorm"


class AttentionBlock(_Gate, R.AttentionBlock):
    """:class:`medattn_fast.reference.attention_gate.AttentionBlock` as one
    :func:`medattn_fast.functional.attention_gate` call.

    ``from_original(module, double_sigmoid=None)``: the extra sigmoid of the widely copied variant
    is not visible in the parameters; it is taken from the module's ``double_sigmoid`` attribute
    when it has one (the reference module does), else from the argument (default False).
    """

    ORIGINAL_CODE = frozenset()   # the widely copied blocks: only their restatement is known (MONAI's has its twin)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return _additive_gate(x, g, self.Wx, self.Wg, self.psi, self.training, self.double_sigmoid)

    @classmethod
    def _init_args(cls, module, *, double_sigmoid: Optional[bool] = None):
        conv_x, conv_g = module.Wx[0], module.Wg[0]
        if double_sigmoid is None:
            double_sigmoid = bool(getattr(module, "double_sigmoid", False))
        return ((conv_x.in_channels, conv_g.in_channels, conv_x.out_channels),
                dict(spatial_dims=conv_x.weight.dim() - 2, double_sigmoid=double_sigmoid))


class ConvBatchNorm(R.ConvBatchNorm):
    """:class:`medattn_fast.reference.attention_gate.ConvBatchNorm` whose BN, in eval mode (its own
    flag), folds into the convolution (one pass instead of three); in training mode it is the original's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = _bn(self.batchnorm)
        if bn.uses_batch_stats:   # the BN's own mode, not this block's: a frozen BN folds in a train() model
            return self.relu(self.batchnorm(self.conv(x)))
        weight, bias = bn.fold(self.conv.weight, self.conv.bias)
        return F.conv2d(x, weight, bias, padding=self.conv.padding).relu_()


class AttentionUpBlock(_Gate, R.AttentionUpBlock):
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
        if double_sigmoid is None:
            double_sigmoid = bool(getattr(module.attention, "double_sigmoid", False))
        return (module.upsample.in_channels, module.upsample.out_channels), dict(double_sigmoid=double_sigmoid)


class Attention_block(_Gate, R.Attention_block):  # noqa: N801 - the original's name
    """:class:`medattn_fast.reference.attention_gate.Attention_block` as one
    :func:`medattn_fast.functional.attention_gate` call; unlike the original, a g smaller than x
    is also accepted (interpolated to x's size)."""

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return _additive_gate(x, g, self.W_x, self.W_g, self.psi, self.training)

    @classmethod
    def _init_args(cls, module):
        conv_x, conv_g = module.W_x[0], module.W_g[0]
        return (conv_g.in_channels, conv_x.in_channels, conv_x.out_channels), dict(spatial_dims=conv_x.weight.dim() - 2)


class MonaiAttentionBlock(_Gate, R.MonaiAttentionBlock):
    """:class:`medattn_fast.reference.attention_gate.MonaiAttentionBlock` (MONAI's
    ``AttentionBlock``) as one :func:`medattn_fast.functional.attention_gate` call; a g smaller
    than x is also accepted (interpolated to x's size)."""

    ORIGINAL_CODE = frozenset({"ee94b85d34483440"})   # MONAI 1.6.1's AttentionBlock (convert's fingerprint)
    REFERENCE_NAMES = ()

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return _additive_gate(x, g, self.W_x, self.W_g, self.psi, self.training)

    @classmethod
    def _init_args(cls, module):
        conv_x, conv_g = module.W_x[0].conv, module.W_g[0].conv
        return (conv_x.weight.dim() - 2, conv_x.out_channels, conv_g.in_channels, conv_x.in_channels), {}


class _GridAttentionBlock(_Gate, R.GridAttentionBlock):
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
        out = MF.attention_gate(
            x, g, self.theta.weight, self.theta.bias, self.phi.weight, self.phi.bias, self.psi.weight,
            self.psi.bias, out_weight=self.W[0].weight, out_bias=self.W[0].bias, bn_out=_bn(self.W[1]),
            training=self.training, mode="grid", return_alpha=True)
        return _as_original_under_autocast(out, x, grid=True)

    @classmethod
    def _init_args(cls, module):
        mode = getattr(module, "mode", "concatenation")
        if mode != "concatenation":
            raise ValueError(f"mode {mode!r} is not reproduced (only 'concatenation', the Attention U-Net gate)")
        theta, phi = module.theta, module.phi
        if theta.weight.dim() - 2 != cls.SPATIAL_DIMS:
            raise ValueError(f"theta must be a {cls.SPATIAL_DIMS}-D convolution, got {type(theta).__name__}")
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
    # MONAI's gate shares the widely copied one's class name: the code fingerprint and the layers pick the twin
    "GridAttentionBlock2D": GridAttentionBlock2D,
    "GridAttentionBlock3D": GridAttentionBlock3D,
}
