"""CrossAttentionUNet's attention blocks, reference versions: ``SEChannelAttention``,
``SelfAttentionLayer`` and ``SkipCrossAttentionLayer``.

CrossAttentionUNet has no public original, so these are a clean design (documented here) and the
oracle for the fast versions in :mod:`medattn_fast.nn.attention`, which share the parameter names
(a state_dict moves between the two with ``strict=True``). Attention is plain
``softmax(Q Kᵀ / √d) V`` with the (B, heads, Nq, Nk) matrix materialised. Device-agnostic, any
number of spatial dims (2D (B, C, H, W) and 3D (B, C, D, H, W) inputs alike).

* ``SEChannelAttention(channels, reduction=16)``: squeeze-excitation,
  ``x · σ(W₂ relu(W₁ mean_S(x) + b₁) + b₂)`` with ``W₁: C -> max(1, C // reduction)``.
* ``SelfAttentionLayer(channels, heads=8)``: a pre-norm transformer encoder attention layer over
  the N = prod(S) pixels of a feature map: ``t + proj(MHA(LN(t)))`` with ``t`` the (B, N, C)
  tokens, back to (B, C, *S).
* ``SkipCrossAttentionLayer(channels_x, channels_skip, heads=8)``: decoder tokens (queries, from
  x) attend to skip-connection tokens (keys/values, from skip, which may have another size: Nq ≠ Nk),
  pre-norm on both, residual on x: ``t + proj(MHA(LN_x(t), LN_s(s)))``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["SEChannelAttention", "SelfAttentionLayer", "SkipCrossAttentionLayer"]


def _check_heads(channels: int, heads: int) -> int:
    if heads < 1 or channels % heads:
        raise ValueError(f"heads must be a positive divisor of the channels ({channels}), got {heads}")
    return channels // heads


def _to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, *S) -> (B, N, C)."""
    return x.flatten(2).transpose(1, 2)


def _from_tokens(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, N, C) -> (B, C, *S) shaped like ``like``."""
    return t.transpose(1, 2).reshape(like.shape)


def _multi_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """q (B, Nq, C), k/v (B, Nk, C) -> (B, Nq, C); the (B, h, Nq, Nk) attention is materialised."""
    batch, nq, channels = q.shape
    nk = k.shape[1]
    d = channels // heads
    qh = q.reshape(batch, nq, heads, d).transpose(1, 2)
    kh = k.reshape(batch, nk, heads, d).transpose(1, 2)
    vh = v.reshape(batch, nk, heads, d).transpose(1, 2)
    attention = torch.softmax(qh @ kh.transpose(-2, -1) / math.sqrt(d), dim=-1)
    return (attention @ vh).transpose(1, 2).reshape(batch, nq, channels)


class SEChannelAttention(nn.Module):
    """Squeeze-excitation channel gate: ``x · σ(fc2(relu(fc1(mean over space of x))))``."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeezed = x.flatten(2).mean(-1)                                   # (B, C)
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(squeezed))))
        return x * gate.reshape(*gate.shape, *([1] * (x.dim() - 2)))


class SelfAttentionLayer(nn.Module):
    """Pre-norm multi-head self-attention over the pixels of a feature map, with a residual."""

    def __init__(self, channels: int, heads: int = 8):
        super().__init__()
        _check_heads(channels, heads)
        self.heads = heads
        self.norm = nn.LayerNorm(channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = _to_tokens(x)
        h = self.norm(tokens)
        attended = _multi_head_attention(self.to_q(h), self.to_k(h), self.to_v(h), self.heads)
        return _from_tokens(tokens + self.proj(attended), x)


class SkipCrossAttentionLayer(nn.Module):
    """Decoder tokens (queries) attend to skip-connection tokens (keys/values); pre-norm, residual."""

    def __init__(self, channels_x: int, channels_skip: int, heads: int = 8):
        super().__init__()
        _check_heads(channels_x, heads)
        self.heads = heads
        self.norm_x = nn.LayerNorm(channels_x)
        self.norm_skip = nn.LayerNorm(channels_skip)
        self.to_q = nn.Linear(channels_x, channels_x)
        self.to_k = nn.Linear(channels_skip, channels_x)
        self.to_v = nn.Linear(channels_skip, channels_x)
        self.proj = nn.Linear(channels_x, channels_x)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        tokens = _to_tokens(x)
        hx = self.norm_x(tokens)
        hs = self.norm_skip(_to_tokens(skip))
        attended = _multi_head_attention(self.to_q(hx), self.to_k(hs), self.to_v(hs), self.heads)
        return _from_tokens(tokens + self.proj(attended), x)
