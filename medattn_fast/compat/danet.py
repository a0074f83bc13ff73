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
from ..reference import danet as R
from ._adopt import adopt

__all__ = ["PAM_Module", "CAM_Module", "DANetHead", "COMPAT_CLASSES"]


def _check_input(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name}: input must be (B, C, H, W), got shape {tuple(x.shape)}")


class PAM_Module(R.PAM_Module):  # noqa: N801 (the original's name)
    """Position attention ``γ · V softmax(Qᵀ K)ᵀ + x`` without the N×N matrix; the original's
    modules and keys (:class:`medattn_fast.reference.danet.PAM_Module`)."""

    # query rows per block; None: the backend's default (16 MiB of scores on the torch backend)
    chunk_size = None

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


class CAM_Module(R.CAM_Module):  # noqa: N801
    """Channel attention ``γ · softmax(−X Xᵀ) X + x`` (float32 energy); the original's keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(type(self).__name__, x)
        return MF.channel_attention(x, negate=True, gamma=self.gamma, residual=x)

    @classmethod
    def from_original(cls, module: nn.Module) -> "CAM_Module":
        # in_dim only feeds the (unused) ``chanel_in`` attribute: no parameter shape depends on it.
        return adopt(cls(getattr(module, "chanel_in", 0)), module)


class DANetHead(R.DANetHead):
    """DANet's head on the fast PAM/CAM; returns ``(fused, position_only, channel_only)``, the
    original's modules and keys (:class:`medattn_fast.reference.danet.DANetHead`) and its order of
    evaluation (the three Dropout2d draws match it under one random seed)."""

    position_module = PAM_Module
    channel_module = CAM_Module

    def forward(self, x: torch.Tensor):
        _check_input(type(self).__name__, x)
        return super().forward(x)

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
