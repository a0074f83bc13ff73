"""Pieces shared by the models of :mod:`medattn_fast.models`: the layer factory, the two-conv U-Net
block and pass, argument, input-size and state_dict checks (messages name the model, the argument,
the expected and the received).
"""
from __future__ import annotations

import math
from typing import List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

NORMS = ("batch", "instance")

IntOrSeq = Union[int, Sequence[int]]


def check_positive_int(model: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{model}: argument '{name}' must be a positive int, got {value!r}")


def check_unet(model: str, spatial_dims: int, channels: Sequence[int], strides: Sequence[IntOrSeq],
               dropout: float) -> Tuple[Tuple[int, ...], Tuple[Tuple[int, ...], ...]]:
    """``spatial_dims`` 2 or 3; ``channels`` (c_0, …, c_L), L ≥ 1, and exactly L strides, each an int
    or one int per dim; ``dropout`` in [0, 1). Returns the channels and the per-dim strides."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"{model}: argument 'spatial_dims' must be 2 or 3, got {spatial_dims!r}")
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
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{model}: argument 'dropout' must be in [0, 1), got {dropout!r}")
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


def layer(kind: str, spatial_dims: int) -> type:
    """torch.nn's ``{kind}{spatial_dims}d`` class: ``layer("ConvTranspose", 3)`` is ``nn.ConvTranspose3d``."""
    return getattr(nn, f"{kind}{spatial_dims}d")


def norm_layer(model: str, norm: str, spatial_dims: int, channels: int) -> nn.Module:
    """``"batch"``: BatchNorm; ``"instance"``: InstanceNorm with affine parameters (no running stats)."""
    if norm == "batch":
        return layer("BatchNorm", spatial_dims)(channels)
    if norm == "instance":
        return layer("InstanceNorm", spatial_dims)(channels, affine=True)
    raise ValueError(f"{model}: argument 'norm' must be one of {NORMS}, got {norm!r}")


def conv_norm_relu(model: str, spatial_dims: int, cin: int, cout: int, norm: str, stride=1) -> List[nn.Module]:
    """``conv3 → norm → ReLU``; the conv has no bias (the norm follows)."""
    return [layer("Conv", spatial_dims)(cin, cout, 3, stride=stride, padding=1, bias=False),
            norm_layer(model, norm, spatial_dims, cout), nn.ReLU(inplace=True)]


class ConvBlock(nn.Sequential):
    """Two ``conv3 → norm → ReLU → dropout`` units: ``in_channels -> out_channels``; the first conv
    carries ``stride`` (a strided conv downsamples by exactly the stride when it divides the size).
    Dropout (elementwise) is only built when ``dropout > 0``."""

    def __init__(self, model: str, spatial_dims: int, in_channels: int, out_channels: int,
                 stride: Tuple[int, ...] = 1, *, norm: str = "batch", dropout: float = 0.0):
        layers = []
        for cin, s in ((in_channels, stride), (out_channels, 1)):
            layers += conv_norm_relu(model, spatial_dims, cin, out_channels, norm, s)
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        super().__init__(*layers)


def encode_decode(x: torch.Tensor, stem: nn.Module, encoder: Sequence[nn.Module], decoder: Sequence[nn.Module],
                  bottleneck: Optional[nn.Module] = None) -> torch.Tensor:
    """The U-Net pass: ``f_0 = stem(x)``, ``f_{l+1} = encoder[l](f_l)``, ``h = bottleneck(f_L)`` (or
    f_L), then deepest first ``h = decoder[l](h, f_l)``; returns the top level's h."""
    features = [stem(x)]
    for stage in encoder:
        features.append(stage(features[-1]))
    h = features.pop()
    if bottleneck is not None:
        h = bottleneck(h)
    for level in reversed(range(len(decoder))):
        h = decoder[level](h, features[level])
    return h


def state_dict_misfit(expected: Mapping[str, object], given: Mapping[str, object], *, shapes: bool = True) -> str:
    """Why ``given`` does not load strictly where ``expected`` (a state_dict) is:
    ``"missing [...], unexpected [...], shape mismatches [...]"`` (the first 5 keys of each, "…" when
    there are more; shapes compared only with ``shapes``), or "" when it fits."""
    found = {"missing": sorted(set(expected) - set(given)), "unexpected": sorted(set(given) - set(expected))}
    if shapes:
        found["shape mismatches"] = [f"{k}: expected {tuple(expected[k].shape)}, got {tuple(given[k].shape)}"
                                     for k in sorted(set(expected) & set(given)) if expected[k].shape != given[k].shape]
    if not any(found.values()):
        return ""
    return ", ".join(f"{what} {keys[:5]}{'…' if len(keys) > 5 else ''}" for what, keys in found.items())
