r"""Attention U-Net (Oktay et al., 2018) as MONAI builds it, 2-D or 3-D, with the fast attention
gate (:class:`medattn_fast.nn.AttentionGate`) at every decoder level; loads MONAI checkpoints.

Architecture for ``channels = (c_0, …, c_L)`` and ``strides = (s_0, …, s_{L-1})``::

    x (B, in_channels, *S)                    each S_d divisible by Π_l s_l[d]
    stem        ConvBlock(in_channels -> c_0, stride 1)                     -> f_0 (B, c_0, *S)
    encoder[l]  ConvBlock(c_l -> c_{l+1}, stride s_l)                       -> f_{l+1}
    decoder[l], deepest first, h = f_L:
        g        = upconv(h)          ConvTranspose(c_{l+1} -> c_l, stride s_l) + BN + ReLU
        gated, α = gate(x=f_l, g=g)   AttentionGate(c_l, c_l, c_l // 2), g already at f_l's size
        h        = merge(cat([gated, g]))   Conv(2c_l -> c_l) + InstanceNorm + PReLU
    out_conv    1×1 conv (c_0 -> out_channels)                              -> logits (B, out_channels, *S)

``ConvBlock`` is two ``conv → BN → dropout → ReLU`` units (the first one strided); convolutions use
"same" padding (kernel sizes must be odd), so a stride-s conv maps n to n / s exactly when s
divides n, and the transposed conv (output padding s − 1) maps it back.

Behaviours kept from MONAI's ``AttentionUnet`` (so its checkpoints give the same outputs):

* the gate sees g and x at the same resolution (g is the up-convolved lower level), both with
  c_l channels, and ``C_int = c_l // 2``;
* ``merge`` normalises with ``InstanceNorm`` (no affine, no running statistics) and a PReLU with
  one shared slope, while every other unit uses BatchNorm + ReLU;
* dropout (``nn.Dropout``, elementwise) sits in the ConvBlocks and in ``merge``, never in the
  up-convolutions or the gates;
* strides beyond ``len(channels) - 1`` entries are ignored.

(MONAI releases before 1.3.1 (PR #7734) built the ConvBlocks with 3×3 kernels
whatever ``kernel_size`` said; their checkpoints load with ``kernel_size=3``.)

Eval mode folds each BatchNorm into the convolution before it (one pass instead of three); the
gates fold theirs inside :func:`medattn_fast.functional.attention_gate`.

**MONAI checkpoints.** :meth:`AttentionUNet.from_monai_state_dict` maps the keys of
``monai.networks.nets.AttentionUnet`` (recursive ``model`` Sequential) to this module's flat
levels; :meth:`AttentionUNet.to_monai_state_dict` is the inverse. With ``P_0 = model.1.`` and
``P_{l+1} = P_l + "submodule.1."``:

====================================================  =========================================
MONAI                                                 here
====================================================  =========================================
``model.0.conv.{u}.conv.*`` / ``.adn.N.*``            ``stem.{u}.conv.*`` / ``stem.{u}.norm.*``
``P_l submodule.0.conv.{u}.*`` (last level:           ``encoder.{l}.{u}.*`` (same unit map)
``P_l submodule.conv.{u}.*``)
``P_l upconv.up.conv.*`` / ``upconv.up.adn.N.*``      ``decoder.{l}.upconv.conv.*`` / ``.norm.*``
``P_l attention.W_x.0.conv.*`` / ``W_x.1.*``          ``decoder.{l}.gate.x_conv.*`` / ``x_norm.*``
``P_l attention.W_g.0.conv.*`` / ``W_g.1.*``          ``decoder.{l}.gate.g_conv.*`` / ``g_norm.*``
``P_l attention.psi.0.conv.*`` / ``psi.1.*``          ``decoder.{l}.gate.psi_conv.*`` / ``psi_norm.*``
``P_l merge.conv.*`` / ``merge.adn.A.weight``         ``decoder.{l}.merge.conv.*`` / ``merge.act.weight``
``model.2.conv.*``                                    ``out_conv.*``
====================================================  =========================================
"""
from __future__ import annotations

import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as MF
from ..nn.attention_gate import AttentionGate
from ._parts import IntOrSeq, check_input, check_positive_int, check_unet, layer, state_dict_misfit, total_stride

__all__ = ["AttentionUNet"]

_NAME = "AttentionUNet"


def _odd_kernel(name: str, value: IntOrSeq, spatial_dims: int) -> Tuple[int, ...]:
    """An odd positive int or one per spatial dimension -> a tuple of ``spatial_dims`` ints."""
    values = (value,) * spatial_dims if isinstance(value, int) else tuple(value)
    if len(values) != spatial_dims or not all(isinstance(v, int) and v >= 1 and v % 2 for v in values):
        raise ValueError(f"{_NAME}: argument '{name}' must be an odd positive int or {spatial_dims} odd positive "
                         f"ints, got {value!r}")
    return values


class ConvNormAct(nn.Module):
    """``act(dropout(BN(conv(x))))`` — MONAI's ``Convolution`` with ``adn_ordering="NDA"``, BN, ReLU.

    ``transposed=True`` makes the conv a ConvTranspose with output padding ``stride − 1``, so that it
    multiplies each spatial size by the stride exactly. A BN in eval mode (its own flag) is folded
    into the conv, unless a dropout in training mode sits between them.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, kernel_size: Tuple[int, ...],
                 stride: Tuple[int, ...] = 1, *, dropout: float = 0.0, transposed: bool = False):
        super().__init__()
        padding = tuple((k - 1) // 2 for k in kernel_size)
        if transposed:
            self.conv = layer("ConvTranspose", spatial_dims)(
                in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                output_padding=tuple(s - 1 for s in stride))
        else:
            self.conv = layer("Conv", spatial_dims)(in_channels, out_channels, kernel_size, stride=stride,
                                                    padding=padding)
        self.norm = layer("BatchNorm", spatial_dims)(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.transposed = transposed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = MF.BatchNormParams.from_module(self.norm)
        # Each submodule in its own mode (a fine-tuned model may hold an eval BN inside a train()
        # block): the BN folds into the conv only where it uses its running statistics and the
        # dropout between them is off.
        if norm.uses_batch_stats or (isinstance(self.dropout, nn.Dropout) and self.dropout.training):
            return F.relu(self.dropout(self.norm(self.conv(x))))
        c = self.conv
        weight, bias = norm.fold(c.weight, c.bias, out_dim=1 if self.transposed else 0)
        if self.transposed:
            fn = F.conv_transpose2d if weight.dim() == 4 else F.conv_transpose3d
            y = fn(x, weight, bias, stride=c.stride, padding=c.padding, output_padding=c.output_padding)
        else:
            fn = F.conv2d if weight.dim() == 4 else F.conv3d
            y = fn(x, weight, bias, stride=c.stride, padding=c.padding)
        return F.relu_(y)


class ConvBlock(nn.Sequential):
    """Two :class:`ConvNormAct` units, the first with stride ``stride`` (MONAI's ``ConvBlock``)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, kernel_size: Tuple[int, ...],
                 stride: Tuple[int, ...] = 1, *, dropout: float = 0.0):
        super().__init__(
            ConvNormAct(spatial_dims, in_channels, out_channels, kernel_size, stride, dropout=dropout),
            ConvNormAct(spatial_dims, out_channels, out_channels, kernel_size, 1, dropout=dropout),
        )


class MergeConv(nn.Module):
    """``PReLU(dropout(InstanceNorm(conv3(x))))``: fuses the gated skip with the upsampled features
    (MONAI's ``merge``: its ``Convolution`` defaults, instance norm without affine, one PReLU slope)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, *, dropout: float = 0.0):
        super().__init__()
        self.conv = layer("Conv", spatial_dims)(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm = layer("InstanceNorm", spatial_dims)(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.act = nn.PReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dropout(self.norm(self.conv(x))))


class DecoderLevel(nn.Module):
    """One decoder level: up-convolve the lower level's output to this level, gate this level's skip
    with it, merge ``[gated skip, upsampled]`` back to ``channels`` channels."""

    def __init__(self, spatial_dims: int, channels: int, lower_channels: int, stride: Tuple[int, ...],
                 up_kernel_size: Tuple[int, ...], *, dropout: float, backend: Optional[str]):
        super().__init__()
        self.upconv = ConvNormAct(spatial_dims, lower_channels, channels, up_kernel_size, stride, transposed=True)
        self.gate = AttentionGate(channels, channels, channels // 2, spatial_dims=spatial_dims, backend=backend)
        self.merge = MergeConv(spatial_dims, 2 * channels, channels, dropout=dropout)

    def forward(self, lower: torch.Tensor, skip: torch.Tensor, return_attention: bool = False):
        g = self.upconv(lower)
        out = self.gate(skip, g, return_alpha=return_attention)
        gated, alpha = out if return_attention else (out, None)
        return self.merge(torch.cat((gated, g), dim=1)), alpha


class AttentionUNet(nn.Module):
    r"""Attention U-Net, 2-D or 3-D, with MONAI ``AttentionUnet``'s constructor and architecture
    (see the module docstring for the diagram and the checkpoint key map).

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the input image.
        out_channels: number of classes (channels of the logits).
        channels: feature channels per level, top level first, at least two entries; every level
            but the last needs ≥ 2 channels (its gate has ``channels // 2`` intermediate channels).
        strides: the downsampling stride of each level below the top: ``len(channels) - 1`` entries
            (more are ignored, as in MONAI), each an int or one int per spatial dim.
        kernel_size: kernel of the ConvBlocks (odd; int or one per dim).
        up_kernel_size: kernel of the transposed convolutions (odd; int or one per dim).
        dropout: dropout probability in the ConvBlocks and merge convolutions.
        backend: force a backend for the attention gates (default: the global choice).

    ``forward(x, return_attention=False)``: x (B, in_channels, *S), each spatial size divisible by the
    product of the strides along that dim; returns logits (B, out_channels, *S), or
    ``(logits, alphas)`` with ``return_attention=True`` where ``alphas[l]`` is level l's attention
    map (B, 1, *S_l), top (full-resolution) level first.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, channels: Sequence[int],
                 strides: Sequence[IntOrSeq], kernel_size: IntOrSeq = 3, up_kernel_size: IntOrSeq = 3,
                 dropout: float = 0.0, *, backend: Optional[str] = None):
        super().__init__()
        # strides beyond len(channels) - 1 entries are ignored, as in MONAI
        channels, strides = check_unet(_NAME, spatial_dims, channels, tuple(strides)[:len(tuple(channels)) - 1],
                                       dropout)
        check_positive_int(_NAME, "in_channels", in_channels)
        check_positive_int(_NAME, "out_channels", out_channels)
        if any(c < 2 for c in channels[:-1]):
            raise ValueError(f"{_NAME}: argument 'channels' must be >= 2 at every level but the last "
                             f"(each gate has channels // 2 intermediate channels), got {channels!r}")
        levels = len(strides)
        self.spatial_dims, self.in_channels, self.out_channels = spatial_dims, in_channels, out_channels
        self.channels, self.strides, self.dropout = channels, strides, float(dropout)
        self.kernel_size = _odd_kernel("kernel_size", kernel_size, spatial_dims)
        self.up_kernel_size = _odd_kernel("up_kernel_size", up_kernel_size, spatial_dims)
        self.size_divisor = total_stride(strides, spatial_dims)   # the spatial sizes must be multiples of this

        self.stem = ConvBlock(spatial_dims, in_channels, channels[0], self.kernel_size, dropout=self.dropout)
        self.encoder = nn.ModuleList(
            ConvBlock(spatial_dims, channels[l], channels[l + 1], self.kernel_size, self.strides[l],
                      dropout=self.dropout)
            for l in range(levels)
        )
        self.decoder = nn.ModuleList(
            DecoderLevel(spatial_dims, channels[l], channels[l + 1], self.strides[l], self.up_kernel_size,
                         dropout=self.dropout, backend=backend)
            for l in range(levels)
        )
        self.out_conv = layer("Conv", spatial_dims)(channels[0], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor, return_attention: bool = False
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, List[torch.Tensor]]]:
        check_input(_NAME, x, self.in_channels, self.spatial_dims, self.size_divisor)
        if x.shape[0] == 0:
            raise ValueError(f"{_NAME}: argument 'x' must not have an empty batch, got shape {tuple(x.shape)}")
        skips = [self.stem(x)]
        for block in self.encoder:
            skips.append(block(skips[-1]))
        h = skips.pop()  # the bottom level has no skip of its own
        alphas: List[Optional[torch.Tensor]] = [None] * len(self.decoder)
        for level in reversed(range(len(self.decoder))):
            h, alphas[level] = self.decoder[level](h, skips[level], return_attention)
        logits = self.out_conv(h)
        return (logits, alphas) if return_attention else logits

    # ------------------------------------------------------------------------------------------
    # MONAI checkpoints
    # ------------------------------------------------------------------------------------------
    _UNIT_KEY = re.compile(r"(?P<unit>\d+)\.(?P<layer>conv|norm)\.(?P<param>\w+)$")
    _GATE_LAYERS = {"x_conv": "W_x.0.conv", "x_norm": "W_x.1", "g_conv": "W_g.0.conv", "g_norm": "W_g.1",
                    "psi_conv": "psi.0.conv", "psi_norm": "psi.1"}

    def _monai_level_prefix(self, level: int) -> str:
        return "model.1." + "submodule.1." * level

    def monai_key(self, key: str) -> str:
        """The MONAI ``AttentionUnet`` state_dict key of this module's ``key`` (see the module docstring)."""

        def unit(rest: str, prefix: str) -> str:
            m = self._UNIT_KEY.fullmatch(rest)
            if m is None:
                raise KeyError(key)
            layer = "conv" if m["layer"] == "conv" else "adn.N"
            return f"{prefix}conv.{m['unit']}.{layer}.{m['param']}"

        head, _, rest = key.partition(".")
        if head == "stem":
            return unit(rest, "model.0.")
        if head == "out_conv":
            return f"model.2.conv.{rest}"
        index, _, rest = rest.partition(".")
        if head not in ("encoder", "decoder") or not index.isdigit():
            raise KeyError(key)
        level = int(index)
        prefix = self._monai_level_prefix(level)
        if head == "encoder":
            bottom = level == len(self.encoder) - 1
            return unit(rest, prefix + ("submodule." if bottom else "submodule.0."))
        part, _, rest = rest.partition(".")
        layer, _, param = rest.rpartition(".")
        if part == "upconv" and layer in ("conv", "norm"):
            return f"{prefix}upconv.up.{'conv' if layer == 'conv' else 'adn.N'}.{param}"
        if part == "gate" and layer in self._GATE_LAYERS:
            return f"{prefix}attention.{self._GATE_LAYERS[layer]}.{param}"
        if part == "merge" and layer in ("conv", "act"):
            return f"{prefix}merge.{'conv' if layer == 'conv' else 'adn.A'}.{param}"
        raise KeyError(key)

    def monai_key_map(self) -> Dict[str, str]:
        """MONAI key -> this module's key, for every entry of :meth:`state_dict`."""
        return {self.monai_key(k): k for k in self.state_dict()}

    def to_monai_state_dict(self) -> Dict[str, torch.Tensor]:
        """This module's state under MONAI ``AttentionUnet``'s keys (loads into it with strict=True)."""
        return {self.monai_key(k): v for k, v in self.state_dict().items()}

    @classmethod
    def from_monai_state_dict(cls, state_dict: Mapping[str, torch.Tensor], **constructor_kwargs) -> "AttentionUNet":
        """Build an ``AttentionUNet(**constructor_kwargs)`` (the arguments the MONAI model was built
        with) and load a MONAI ``AttentionUnet`` state_dict into it, strictly. The model takes the
        checkpoint's floating dtype and device.

        Raises:
            KeyError: listing the MONAI keys this architecture expects but ``state_dict`` lacks, and
                the ones it has but this architecture does not (wrong ``channels``/``strides``, or
                not an AttentionUnet checkpoint). Shape mismatches raise as in ``load_state_dict``.
        """
        model = cls(**constructor_kwargs)
        key_map = model.monai_key_map()
        misfit = state_dict_misfit(key_map, state_dict, shapes=False)
        if misfit:
            raise KeyError(f"AttentionUNet.from_monai_state_dict: the checkpoint does not match "
                           f"AttentionUNet({constructor_kwargs}): {misfit}")
        # Take the checkpoint's floating dtype and device, so that loading does not round its values.
        reference = next((v for v in state_dict.values() if v.is_floating_point()), None)
        if reference is not None:
            model.to(device=reference.device, dtype=reference.dtype)
        model.load_state_dict({key_map[k]: v for k, v in state_dict.items()}, strict=True)
        return model

    def extra_repr(self) -> str:
        return (f"spatial_dims={self.spatial_dims}, channels={self.channels}, strides={self.strides}, "
                f"kernel_size={self.kernel_size}, up_kernel_size={self.up_kernel_size}, dropout={self.dropout}")
