"""Pieces shared by :class:`~medattn_fast.models.DAUNet`, :class:`~medattn_fast.models.CrossAttentionUNet`
and :class:`~medattn_fast.models.MSGANet`: conv/norm factories, the two-conv U-Net block, argument and
input-size validation, and the ``blocks="fast"|"reference"`` switch.

**Fast and reference twins.** Each of these models takes ``blocks="fast"`` (the default: the
memory-lean attention modules of :mod:`medattn_fast.compat` / :mod:`medattn_fast.nn`) or
``blocks="reference"`` (the faithful oracles of :mod:`medattn_fast.reference`, which
materialise the N×N / C×C matrices). The two are built so that their ``state_dict`` keys and
shapes are identical; :meth:`BlocksSwitchMixin.with_blocks` makes the twin of a model with the same
weights, buffers, training mode, device and dtype. This is how tests and benchmarks compare the
reference and fast networks end to end with one set of weights.
"""
from __future__ import annotations

import math
from typing import Dict, Sequence, Tuple, Union

import torch
from torch import nn

BLOCKS = ("fast", "reference")
NORMS = ("batch", "instance")

IntOrSeq = Union[int, Sequence[int]]


def check_blocks(model: str, blocks: str) -> str:
    if blocks not in BLOCKS:
        raise ValueError(f"{model}: argument 'blocks' must be one of {BLOCKS}, got {blocks!r}")
    return blocks


def check_spatial_dims(model: str, spatial_dims: int) -> int:
    if spatial_dims not in (2, 3):
        raise ValueError(f"{model}: argument 'spatial_dims' must be 2 or 3, got {spatial_dims!r}")
    return spatial_dims


def check_channels_strides(model: str, channels: Sequence[int], strides: Sequence[IntOrSeq],
                           spatial_dims: int) -> Tuple[Tuple[int, ...], Tuple[Tuple[int, ...], ...]]:
    """``channels`` (c_0, …, c_L), L ≥ 1, and exactly L strides, each an int or one int per dim."""
    channels = tuple(channels)
    if len(channels) < 2 or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in channels):
        raise ValueError(f"{model}: argument 'channels' must be at least 2 positive ints, got {channels!r}")
    strides = tuple(strides)
    if len(strides) != len(channels) - 1:
        raise ValueError(f"{model}: argument 'strides' must have len(channels) - 1 = {len(channels) - 1} "
                         f"entries, got {len(strides)} ({strides!r})")
    per_dim = []
    for s in strides:
        values = (s,) * spatial_dims if isinstance(s, int) else tuple(s)
        if len(values) != spatial_dims or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                                  for v in values):
            raise ValueError(f"{model}: argument 'strides' must hold positive ints or tuples of {spatial_dims} "
                             f"positive ints, got {s!r}")
        per_dim.append(values)
    return channels, tuple(per_dim)


def total_stride(strides: Sequence[Tuple[int, ...]], spatial_dims: int) -> Tuple[int, ...]:
    """The product of the strides along each spatial dim."""
    return tuple(math.prod(s[d] for s in strides) for d in range(spatial_dims))


def check_input(model: str, x, in_channels: int, spatial_dims: int, divisor: Tuple[int, ...]) -> None:
    """x must be a (B, in_channels, *S) tensor with every S_d divisible by ``divisor[d]``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{model}: argument 'x' must be a torch.Tensor, got {type(x).__name__}")
    want = "(B, C, H, W)" if spatial_dims == 2 else "(B, C, D, H, W)"
    if x.dim() != spatial_dims + 2:
        raise ValueError(f"{model}: argument 'x' must be {want} (spatial_dims={spatial_dims}), "
                         f"got shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"{model}: argument 'x' must have {in_channels} channels (dim 1), got shape {tuple(x.shape)}")
    size = tuple(x.shape[2:])
    if any(n == 0 or n % d for n, d in zip(size, divisor)):
        raise ValueError(f"{model}: argument 'x' must have spatial sizes divisible by {divisor} (the product of "
                         f"the strides per dim), got shape {tuple(x.shape)}")


def conv_layer(spatial_dims: int):
    return nn.Conv2d if spatial_dims == 2 else nn.Conv3d


def conv_transpose_layer(spatial_dims: int):
    return nn.ConvTranspose2d if spatial_dims == 2 else nn.ConvTranspose3d


def norm_layer(model: str, norm: str, spatial_dims: int, channels: int) -> nn.Module:
    """``"batch"``: BatchNorm; ``"instance"``: InstanceNorm with affine parameters (no running stats)."""
    if norm == "batch":
        return (nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d)(channels)
    if norm == "instance":
        return (nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d)(channels, affine=True)
    raise ValueError(f"{model}: argument 'norm' must be one of {NORMS}, got {norm!r}")


class ConvBlock(nn.Sequential):
    """Two ``conv3 → norm → ReLU → dropout`` units: ``in_channels -> out_channels``; the first conv
    carries ``stride`` (a strided conv downsamples by exactly the stride when it divides the size).
    The convs have no bias (a norm follows); dropout (elementwise) is only built when ``dropout > 0``."""

    def __init__(self, model: str, spatial_dims: int, in_channels: int, out_channels: int,
                 stride: Tuple[int, ...] = 1, *, norm: str = "batch", dropout: float = 0.0):
        conv = conv_layer(spatial_dims)
        layers = []
        for i, (cin, s) in enumerate(((in_channels, stride), (out_channels, 1))):
            layers += [conv(cin, out_channels, 3, stride=s, padding=1, bias=False),
                       norm_layer(model, norm, spatial_dims, out_channels), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        super().__init__(*layers)


class BlocksSwitchMixin:
    """``with_blocks(blocks)``: the same network built with the other attention blocks, carrying
    this one's weights and buffers (``load_state_dict(strict=True)``), training flags, device and
    dtype. The subclass stores its constructor arguments in ``self._config`` (without ``blocks``)."""

    _config: Dict[str, object]

    def with_blocks(self, blocks: str) -> nn.Module:
        twin = type(self)(**self._config, blocks=blocks)
        first = next(iter(self.parameters()))
        twin.to(device=first.device, dtype=first.dtype)
        twin.load_state_dict(self.state_dict(), strict=True)
        flags = {name: m.training for name, m in self.named_modules()}
        for name, m in twin.named_modules():
            m.training = flags.get(name, self.training)
        return twin

    def reference_version(self) -> nn.Module:
        """Shorthand for ``with_blocks("reference")``."""
        return self.with_blocks("reference")

    def fast_version(self) -> nn.Module:
        """Shorthand for ``with_blocks("fast")``."""
        return self.with_blocks("fast")
