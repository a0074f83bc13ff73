"""Position, channel and dual attention modules, and the attention blocks of CrossAttentionUNet, built on
:func:`medattn_fast.functional.position_attention` / :func:`~medattn_fast.functional.channel_attention`.

Every module here takes 2D (B, C, H, W) and 3D (B, C, D, H, W) feature maps alike (the 1×1
projections are stored as (out, in) matrices and applied over the flattened positions), except
:class:`DualAttention`, whose 3×3 convs need ``spatial_dims`` at construction.

Constructors take, keyword-only and in this order, ``spatial_dims`` (where the module needs it),
the module's own options, then ``backend`` (forces a backend for every call of the module; default:
the one in force), ``device`` and ``dtype`` (where the parameters are created, as torch.nn's
factory keywords).

For the originals' class names and state_dict keys use :mod:`medattn_fast.compat`.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from .. import functional as MF

__all__ = [
    "Pointwise",
    "PositionAttention",
    "ChannelAttention",
    "DualAttention",
    "SEChannelAttention",
    "SelfAttentionLayer",
    "SkipCrossAttentionLayer",
]


def _check_feature_map(name: str, x: torch.Tensor, channels: Optional[int] = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (4, 5):
        raise ValueError(f"{name}: input must be (B, C, H, W) or (B, C, D, H, W), got shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name}: input must have {channels} channels (dim 1), got shape {tuple(x.shape)}")


class Pointwise(nn.Module):
    """A 1×1 convolution for any number of spatial dims: (B, Cin, *S) -> (B, Cout, N) channel-first,
    N = prod(S) (flattened, ready for ``layout="channels"``). ``weight`` (Cout, Cin), ``bias`` (Cout,)."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True, *, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype)) if bias else None
        # The default initialisation of a 1×1 nn.Conv2d with the same fan-in.
        bound = 1.0 / math.sqrt(in_channels) if in_channels > 0 else 0.0
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.matmul(self.weight, x.flatten(2))
        return out if self.bias is None else out + self.bias[:, None]


class PositionAttention(nn.Module):
    r"""DANet's position attention, memory-lean: ``out = γ · V softmax(Qᵀ K)ᵀ + x``.

    q, k = 1×1 projections to ``max(1, channels // reduction)`` channels, v to ``channels``; γ
    starts at 0 (identity at init). The N×N attention is never stored (``torch`` backend: chunks
    of ``chunk_size`` query rows, recomputed in backward). x: (B, C, H, W) or (B, C, D, H, W).
    """

    def __init__(self, channels: int, reduction: int = 8, *, chunk_size: Optional[int] = None,
                 backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        inner = max(1, channels // reduction)
        self.channels = channels
        self.chunk_size, self.backend = chunk_size, backend
        self.query = Pointwise(channels, inner, device=device, dtype=dtype)
        self.key = Pointwise(channels, inner, device=device, dtype=dtype)
        self.value = Pointwise(channels, channels, device=device, dtype=dtype)
        self.gamma = nn.Parameter(torch.zeros(1, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_feature_map(type(self).__name__, x, self.channels)
        out = MF.position_attention(
            self.query(x), self.key(x), self.value(x), layout="channels",
            gamma=self.gamma, residual=x.flatten(2), chunk_size=self.chunk_size, backend=self.backend,
        )
        return out.reshape(x.shape)


class ChannelAttention(nn.Module):
    r"""DANet's channel attention: ``out = γ · softmax(−X Xᵀ) X + x`` (``negate=False``:
    ``softmax(X Xᵀ)``). E accumulates in float32, so float16 does not overflow. γ starts at 0."""

    def __init__(self, *, negate: bool = True, backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        self.negate, self.backend = negate, backend
        self.gamma = nn.Parameter(torch.zeros(1, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_feature_map(type(self).__name__, x)
        return MF.channel_attention(x, negate=self.negate, gamma=self.gamma, residual=x, backend=self.backend)


def _conv_norm_relu(cin, cout, spatial_dims, norm_layer, factory):
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    norm = norm_layer(cout) if norm_layer else (nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d)(cout, **factory)
    return nn.Sequential(conv(cin, cout, 3, padding=1, bias=False, **factory), norm, nn.ReLU())


def _classifier(cin, cout, spatial_dims, dropout, factory):
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    drop = nn.Dropout2d(dropout) if spatial_dims == 2 else nn.Dropout3d(dropout)
    return nn.Sequential(drop, conv(cin, cout, 1, **factory))


class DualAttention(nn.Module):
    """The DANet head (dual attention), 2D or 3D, with the memory-lean position attention.

    ``position_stem``/``channel_stem``: 3×3 conv-norm-ReLU, ``in_channels`` -> ``in_channels // 4``;
    ``position`` (:class:`PositionAttention`) and ``channel`` (:class:`ChannelAttention`);
    ``position_conv``/``channel_conv``: 3×3 conv-norm-ReLU; three classifiers (dropout + 1×1 conv)
    on the position branch, the channel branch and their sum.

    Returns ``(fused, position_only, channel_only)`` logits, each (B, out_channels, *S).
    """

    def __init__(self, in_channels: int, out_channels: int, *, spatial_dims: int = 2, norm_layer=None,
                 dropout: float = 0.1, chunk_size: Optional[int] = None, backend: Optional[str] = None,
                 device=None, dtype=None):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"DualAttention: spatial_dims must be 2 or 3, got {spatial_dims!r}")
        inter = in_channels // 4
        factory = dict(device=device, dtype=dtype)
        self.spatial_dims = spatial_dims
        self.position_stem = _conv_norm_relu(in_channels, inter, spatial_dims, norm_layer, factory)
        self.channel_stem = _conv_norm_relu(in_channels, inter, spatial_dims, norm_layer, factory)
        self.position = PositionAttention(inter, chunk_size=chunk_size, backend=backend, **factory)
        self.channel = ChannelAttention(backend=backend, **factory)
        self.position_conv = _conv_norm_relu(inter, inter, spatial_dims, norm_layer, factory)
        self.channel_conv = _conv_norm_relu(inter, inter, spatial_dims, norm_layer, factory)
        self.classify_position = _classifier(inter, out_channels, spatial_dims, dropout, factory)
        self.classify_channel = _classifier(inter, out_channels, spatial_dims, dropout, factory)
        self.classify_fused = _classifier(inter, out_channels, spatial_dims, dropout, factory)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(f"DualAttention: expected a {self.spatial_dims + 2}-dim input "
                             f"(spatial_dims={self.spatial_dims}), got shape {tuple(x.shape)}")
        # DANet's order of evaluation (same dropout draws under one seed).
        position = self.position_conv(self.position(self.position_stem(x)))
        position_logits = self.classify_position(position)
        channel = self.channel_conv(self.channel(self.channel_stem(x)))
        channel_logits = self.classify_channel(channel)
        return self.classify_fused(position + channel), position_logits, channel_logits


# ---------------------------------------------------------------------------------------------
# CrossAttentionUNet's blocks (parameter names shared with medattn_fast.reference.cross_attention)
# ---------------------------------------------------------------------------------------------
class SEChannelAttention(nn.Module):
    """Squeeze-excitation: ``x · σ(fc2(relu(fc1(mean over space of x))))``,
    fc1: C -> max(1, C // reduction). Any number of spatial dims."""

    def __init__(self, channels: int, reduction: int = 16, *, device=None, dtype=None):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, channels, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.flatten(2).mean(-1)))))
        return x * gate.reshape(*gate.shape, *([1] * (x.dim() - 2)))


def _add_attention_projections(layer: nn.Module, channels: int, channels_kv: int, heads: int,
                               chunk_size: Optional[int], backend: Optional[str], factory: dict) -> None:
    """``to_q`` (channels -> channels), ``to_k``/``to_v`` (channels_kv -> channels), ``proj``."""
    if heads < 1 or channels % heads:
        raise ValueError(f"heads must be a positive divisor of the channels ({channels}), got {heads}")
    layer.heads, layer.chunk_size, layer.backend = heads, chunk_size, backend
    layer.to_q = nn.Linear(channels, channels, **factory)
    layer.to_k = nn.Linear(channels_kv, channels, **factory)
    layer.to_v = nn.Linear(channels_kv, channels, **factory)
    layer.proj = nn.Linear(channels, channels, **factory)


def _attend_residual(layer: nn.Module, x: torch.Tensor, tokens: torch.Tensor, hq: torch.Tensor,
                     hkv: torch.Tensor) -> torch.Tensor:
    """``tokens + proj(MHA(hq, hkv))`` back in x's (B, C, *S) shape. The heads go to the batch dim
    of one :func:`medattn_fast.functional.position_attention` call (softmax(QKᵀ/√d)V, never stored)."""
    heads, batch = layer.heads, x.shape[0]
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2).flatten(0, 1)    # (B·heads, N, d)
               for t in (layer.to_q(hq), layer.to_k(hkv), layer.to_v(hkv)))
    out = MF.position_attention(q, k, v, scale=1.0 / math.sqrt(q.shape[-1]), chunk_size=layer.chunk_size,
                                backend=layer.backend)
    out = out.unflatten(0, (batch, heads)).transpose(1, 2).flatten(2)         # (B, N, C)
    return (tokens + layer.proj(out)).transpose(1, 2).reshape(x.shape)


class SelfAttentionLayer(nn.Module):
    """Pre-norm multi-head self-attention over the pixels of a feature map, with a residual:
    ``t + proj(MHA(LN(t)))`` on the (B, N, C) tokens of x (B, C, *S); the N×N attention is never
    stored. Parameters: ``norm``, ``to_q``, ``to_k``, ``to_v``, ``proj``."""

    def __init__(self, channels: int, heads: int = 8, *, chunk_size: Optional[int] = None,
                 backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.norm = nn.LayerNorm(channels, **factory)
        _add_attention_projections(self, channels, channels, heads, chunk_size, backend, factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_feature_map(type(self).__name__, x, self.norm.normalized_shape[0])
        tokens = x.flatten(2).transpose(1, 2)
        h = self.norm(tokens)
        return _attend_residual(self, x, tokens, h, h)


class SkipCrossAttentionLayer(nn.Module):
    """Decoder tokens attend to skip-connection tokens: ``t + proj(MHA(LN_x(t), LN_s(s)))`` with
    queries from x (B, Cx, *Sx) and keys/values from skip (B, Cs, *Ss); Sx ≠ Ss allowed (Nq ≠ Nk).
    Parameters: ``norm_x``, ``norm_skip``, ``to_q``, ``to_k``, ``to_v``, ``proj``."""

    def __init__(self, channels_x: int, channels_skip: int, heads: int = 8, *, chunk_size: Optional[int] = None,
                 backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.norm_x = nn.LayerNorm(channels_x, **factory)
        self.norm_skip = nn.LayerNorm(channels_skip, **factory)
        _add_attention_projections(self, channels_x, channels_skip, heads, chunk_size, backend, factory)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        _check_feature_map(name, x, self.norm_x.normalized_shape[0])
        _check_feature_map(name, skip, self.norm_skip.normalized_shape[0])
        if skip.shape[0] != x.shape[0]:
            raise ValueError(f"{name}: skip must have batch {x.shape[0]} like x, got shape {tuple(skip.shape)}")
        tokens = x.flatten(2).transpose(1, 2)
        return _attend_residual(self, x, tokens, self.norm_x(tokens), self.norm_skip(skip.flatten(2).transpose(1, 2)))
