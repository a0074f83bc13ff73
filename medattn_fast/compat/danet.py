"""DANet's ``PAM_Module``, ``CAM_Module`` and ``DANetHead`` with the original names, constructor
signatures and state_dict keys, fast inside. Change one import line::

    from medattn_fast.compat.danet import PAM_Module, CAM_Module, DANetHead

* ``PAM_Module`` never stores the (B, N, N) attention: the conv outputs go channel-first, through
  strides, into :func:`medattn_fast.functional.position_attention` with DANet's ``γ·o + x`` epilogue
  (the ``torch`` backend chunks the queries and recomputes probabilities in backward).
* ``CAM_Module`` computes ``softmax(−E)`` (identical to the original's ``softmax(rowmax(E) − E)``)
  with E accumulated in float32, so float16 inputs give finite results where the original gives NaN.
* ``DANetHead`` is the original head wired to these two.

Each class has ``from_original(module)``; :data:`COMPAT_CLASSES` maps the original class names
to these classes for :func:`medattn_fast.convert`.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .. import functional as MF
from ._adopt import adopt

__all__ = ["PAM_Module", "CAM_Module", "DANetHead", "COMPAT_CLASSES"]


def _check_input(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name}: input must be (B, C, H, W), got shape {tuple(x.shape)}")


class PAM_Module(nn.Module):  # noqa: N801 (the original's name)
    """Position attention ``γ · V softmax(Qᵀ K)ᵀ + x`` without the N×N matrix.

    Keys: ``gamma`` (1,), ``query_conv``/``key_conv`` (in_dim/8, in_dim, 1, 1) + bias,
    ``value_conv`` (in_dim, in_dim, 1, 1) + bias.
    """

    def __init__(self, in_dim: int):
        super().__init__()
        self.chanel_in = in_dim
        self.query_conv = nn.Conv2d(in_dim, in_dim // 8, kernel_size=1)
        self.key_conv = nn.Conv2d(in_dim, in_dim // 8, kernel_size=1)
        self.value_conv = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))
        # chunk_size=None: the backend's default block (16 MiB of scores on the torch backend).
        self.chunk_size = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(type(self).__name__, x)
        out = MF.position_attention(
            self.query_conv(x).flatten(2), self.key_conv(x).flatten(2), self.value_conv(x).flatten(2),
            layout="channels", gamma=self.gamma, residual=x.flatten(2), chunk_size=self.chunk_size,
        )
        return out.reshape(x.shape)

    @classmethod
    def from_original(cls, module: nn.Module) -> "PAM_Module":
        return adopt(cls(module.value_conv.weight.shape[1]), module)


class CAM_Module(nn.Module):  # noqa: N801
    """Channel attention ``γ · softmax(−X Xᵀ) X + x`` (float32 energy). Keys: ``gamma`` (1,)."""

    def __init__(self, in_dim: int):
        super().__init__()
        self.chanel_in = in_dim
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(type(self).__name__, x)
        return MF.channel_attention(x, negate=True, gamma=self.gamma, residual=x)

    @classmethod
    def from_original(cls, module: nn.Module) -> "CAM_Module":
        # in_dim only feeds the (unused) ``chanel_in`` attribute: no parameter shape depends on it.
        return adopt(cls(getattr(module, "chanel_in", 0)), module)


def _conv_bn_relu(cin: int, cout: int, norm_layer) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), norm_layer(cout), nn.ReLU())


def _classifier(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Dropout2d(0.1, False), nn.Conv2d(cin, cout, 1))


class DANetHead(nn.Module):
    """DANet's head with the fast PAM/CAM; returns ``(fused, position_only, channel_only)``.

    Keys (inter = in_channels // 4): ``conv5a``/``conv5c`` (3×3 conv in->inter, norm, ReLU), ``sa``
    (PAM), ``sc`` (CAM), ``conv51``/``conv52`` (3×3 conv inter->inter, norm, ReLU),
    ``conv6``/``conv7``/``conv8`` (Dropout2d(0.1) at index 0, 1×1 conv inter->out at index 1).
    """

    def __init__(self, in_channels: int, out_channels: int, norm_layer=nn.BatchNorm2d):
        super().__init__()
        inter_channels = in_channels // 4
        self.conv5a = _conv_bn_relu(in_channels, inter_channels, norm_layer)
        self.conv5c = _conv_bn_relu(in_channels, inter_channels, norm_layer)
        self.sa = PAM_Module(inter_channels)
        self.sc = CAM_Module(inter_channels)
        self.conv51 = _conv_bn_relu(inter_channels, inter_channels, norm_layer)
        self.conv52 = _conv_bn_relu(inter_channels, inter_channels, norm_layer)
        self.conv6 = _classifier(inter_channels, out_channels)
        self.conv7 = _classifier(inter_channels, out_channels)
        self.conv8 = _classifier(inter_channels, out_channels)

    def forward(self, x: torch.Tensor):
        _check_input(type(self).__name__, x)
        # The original's order of evaluation, so that the three Dropout2d draws match it under
        # one random seed: position branch and its classifier, channel branch and its, then fused.
        sa_conv = self.conv51(self.sa(self.conv5a(x)))
        sa_output = self.conv6(sa_conv)
        sc_conv = self.conv52(self.sc(self.conv5c(x)))
        sc_output = self.conv7(sc_conv)
        return self.conv8(sa_conv + sc_conv), sa_output, sc_output

    @classmethod
    def from_original(cls, module: nn.Module) -> "DANetHead":
        in_channels = module.conv5a[0].weight.shape[1]
        out_channels = module.conv6[1].weight.shape[0]
        new = cls(in_channels, out_channels)
        # Keep the original's normalisation layers as they are (BatchNorm2d, SyncBatchNorm, ...):
        # copies of its own modules, so class, eps and momentum match whatever norm_layer it used.
        for name in ("conv5a", "conv5c", "conv51", "conv52"):
            getattr(new, name)[1] = copy.deepcopy(getattr(module, name)[1])
        return adopt(new, module)


COMPAT_CLASSES = {"PAM_Module": PAM_Module, "CAM_Module": CAM_Module, "DANetHead": DANetHead}
