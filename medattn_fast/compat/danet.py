"""DANet's ``PAM_Module``, ``CAM_Module`` and ``DANetHead`` (:mod:`medattn_fast.reference.danet`),
fast inside (see :mod:`medattn_fast.compat`)::

    from medattn_fast.compat.danet import PAM_Module, CAM_Module, DANetHead
"""
from __future__ import annotations

import torch

from .. import functional as MF
from ..reference import danet as R
from ._adopt import FromOriginal

__all__ = ["PAM_Module", "CAM_Module", "DANetHead", "COMPAT_CLASSES"]


def _autocast_active(x: torch.Tensor) -> bool:
    """AMP autocast is on for x's device and x is not float64 (autocast leaves float64 alone)."""
    return x.dtype != torch.float64 and x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type)


def _check_input(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name}: input must be (B, C, H, W), got shape {tuple(x.shape)}")


class PAM_Module(FromOriginal, R.PAM_Module):  # noqa: N801 (the original's name)
    """:class:`medattn_fast.reference.danet.PAM_Module` without the (B, N, N) attention: the conv
    outputs go channel-first, through strides, into
    :func:`medattn_fast.functional.position_attention` with the ``γ·o + x`` epilogue (the
    ``torch`` backend chunks the queries and recomputes the probabilities in backward)."""

    # query rows per block; None: the backend's default (16 MiB of scores on the torch backend)
    chunk_size = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(type(self).__name__, x)
        if _autocast_active(x):
            # the original's γ·o + x runs outside its autocast bmm: γ (float32) and x keep their
            # dtypes there, so its output is promote(γ, autocast dtype, x) (float32 for float32
            # parameters), with x added unrounded; the fused epilogue would round x to bfloat16
            o = MF.position_attention(self.query_conv(x).flatten(2), self.key_conv(x).flatten(2),
                                      self.value_conv(x).flatten(2), layout="channels", chunk_size=self.chunk_size)
            return self.gamma * o.reshape(x.shape) + x
        out = MF.position_attention(
            self.query_conv(x).flatten(2), self.key_conv(x).flatten(2), self.value_conv(x).flatten(2),
            layout="channels", gamma=self.gamma, residual=x.flatten(2), chunk_size=self.chunk_size,
        )
        return out.reshape(x.shape)

    @classmethod
    def _init_args(cls, module):
        return (module.value_conv.weight.shape[1],), {}


class CAM_Module(FromOriginal, R.CAM_Module):  # noqa: N801
    """:class:`medattn_fast.reference.danet.CAM_Module` as one
    :func:`medattn_fast.functional.channel_attention` call: ``softmax(−E)`` (equal to the
    original's ``softmax(rowmax(E) − E)``) with E accumulated in float32, so float16 inputs give
    finite results where the original gives NaN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(type(self).__name__, x)
        if _autocast_active(x):   # the epilogue in the original's dtypes (see PAM_Module.forward)
            return self.gamma * MF.channel_attention(x, negate=True) + x
        return MF.channel_attention(x, negate=True, gamma=self.gamma, residual=x)

    @classmethod
    def _init_args(cls, module):
        # in_dim only feeds the (unused) ``chanel_in`` attribute: no parameter shape depends on it.
        return (getattr(module, "chanel_in", 0),), {}


class DANetHead(FromOriginal, R.DANetHead):
    """:class:`medattn_fast.reference.danet.DANetHead` built on the fast PAM/CAM (same order of
    evaluation: the three Dropout2d draws match the original's under one seed); ``from_original``
    keeps the original's normalisation layers (``norm_layer``: BatchNorm2d, SyncBatchNorm, ...)."""

    position_module = PAM_Module
    channel_module = CAM_Module

    def forward(self, x: torch.Tensor):
        _check_input(type(self).__name__, x)
        return super().forward(x)

    @classmethod
    def _init_args(cls, module):
        return (module.conv5a[0].weight.shape[1], module.conv6[1].weight.shape[0]), {}


COMPAT_CLASSES = {"PAM_Module": PAM_Module, "CAM_Module": CAM_Module, "DANetHead": DANetHead}
