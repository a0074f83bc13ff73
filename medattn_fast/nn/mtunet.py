"""MT-UNet's blocks as clean modules: channel-last token grids (B, H, W, C), any H and W.

These are the mixed-transformer pieces of MT-UNet under descriptive names, built on
:mod:`medattn_fast.functional`. They compute the same functions as the originals but do not
create the original's parameters that cannot change the output (each class says which), so they
do not load MT-UNet checkpoints: :mod:`medattn_fast.compat.mtunet` does.

==========================  ===================================================================
``WindowAttention``         multi-head attention inside ws×ws windows (WinAttention + Attention)
``WindowAggregation``       softmax-weighted pooling of each window to one token (DlightConv)
``GaussianAxialAttention``  row + column attention with a Gaussian distance penalty, fused from
                            q, k, v (Attention(axial=True) + GaussianTrans)
``LocalGlobalAttention``    windows (local) + axial attention on the grid of windows (global),
                            fused by a 1×1 projection of [global, local] (CSAttention)
``ExternalAttention``       external attention with two shared memories (MEAttention)
``MixedTransformerBlock``   pre-norm residual LocalGlobalAttention then ExternalAttention (EAmodule)
==========================  ===================================================================
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as MF
from .._shapes import crop_grid, statically_true
from ..functional import WINDOW_LAYOUTS as LAYOUTS
from ..functional import WINDOW_PAD_MODES as PAD_MODES

__all__ = [
    "WindowAttention",
    "WindowAggregation",
    "GaussianAxialAttention",
    "LocalGlobalAttention",
    "ExternalAttention",
    "MixedTransformerBlock",
    "window_aggregation",
    "merge_windows",
    "fuse_local_global",
]


def _check_grid(module: str, x: torch.Tensor, dim: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[-1] != dim:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{module}: input must have shape (B, H, W, C) = (*, *, *, {dim}), got {got}")


def window_aggregation(windows: torch.Tensor, score_weight: torch.Tensor,
                       score_bias: Optional[torch.Tensor]) -> torch.Tensor:
    r"""Pool each window to one token with learned, input-dependent weights (MT-UNet DlightConv).

    ``p = softmax(mean_L(windows) W_sᵀ + b_s)`` (one weight per token of the window),
    ``out = Σ_L p_L · windows_L``. windows (..., L, C), score_weight (L, C) -> (..., C).
    The weighted sum is one batched matmul, not an (..., L, C) product followed by a reduction.
    """
    probs = torch.softmax(F.linear(windows.mean(dim=-2), score_weight, score_bias), dim=-1)  # (..., L)
    return torch.matmul(probs.unsqueeze(-2), windows).squeeze(-2)


def merge_windows(windows: torch.Tensor) -> torch.Tensor:
    """(B, nH, nW, ws·ws, C) -> (B, nH·ws, nW·ws, C): the windows put back on their grid."""
    Bn, nH, nW, L, C = windows.shape
    ws = math.isqrt(int(L))  # int(): under torch.jit.trace a size may be a 0-dim tensor
    return windows.view(Bn, nH, nW, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(Bn, nH * ws, nW * ws, C)


def fuse_local_global(windows: torch.Tensor, glob: torch.Tensor, size, weight: torch.Tensor,
                      bias: Optional[torch.Tensor], *, scale: int) -> torch.Tensor:
    r"""MT-UNet's fusion of the two branches: ``fuse(cat[up(glob), local])`` cropped to ``size``.

    windows (B, nH, nW, ws², C) (the local branch), glob (B, nH, nW, C) (the global branch on the
    grid of windows), weight (C_out, 2C), bias (C_out,) or None, size = (H, W) -> (B, H, W, C_out).
    ``up`` is bilinear ×``scale`` with align_corners=True. The concatenation is never built: two
    channel-last GEMMs on the halves of the weight, on the cropped grid.
    """
    H, W = size
    local = crop_grid(merge_windows(windows), H, W)  # (B, H, W, C)
    glob = F.interpolate(glob.permute(0, 3, 1, 2), scale_factor=scale, mode="bilinear", align_corners=True)
    glob = crop_grid(glob.permute(0, 2, 3, 1), H, W)
    w_global, w_local = weight.split(local.shape[-1], dim=1)
    return F.linear(glob, w_global) + F.linear(local, w_local, bias)


class WindowAttention(nn.Module):
    r"""Multi-head self-attention inside non-overlapping ws×ws windows, then a projection.

    x (B, H, W, dim) -> ``layout`` "grid" (B, H, W, dim), "padded" (B, Hp, Wp, dim) or "windows"
    (B, Hp/ws, Wp/ws, ws², dim); H, W are padded up to multiples of ws by ``pad_mode`` ("mtunet":
    the original's zeros + copied corner, unmasked; "mask": zeros, padded keys masked). See
    :func:`medattn_fast.functional.window_attention`. The key projection has no bias: a key bias
    adds q·b_k to every score of a row and cancels in the softmax.
    """

    def __init__(self, dim: int, num_heads: int = 8, window_size: int = 4, *, pad_mode: str = "mtunet",
                 layout: str = "grid", backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        if dim % num_heads != 0:
            raise ValueError(f"WindowAttention: dim={dim} must be divisible by num_heads={num_heads}")
        if pad_mode not in PAD_MODES:
            raise ValueError(f"WindowAttention: pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"WindowAttention: layout must be one of {LAYOUTS}, got {layout!r}")
        self.dim, self.num_heads, self.window_size = dim, num_heads, window_size
        self.pad_mode, self.layout, self.backend = pad_mode, layout, backend
        self.query = nn.Linear(dim, dim, **factory)
        self.key = nn.Linear(dim, dim, bias=False, **factory)
        self.value = nn.Linear(dim, dim, **factory)
        self.proj = nn.Linear(dim, dim, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return MF.window_attention(
            x, self.query.weight, self.query.bias, self.key.weight, None, self.value.weight, self.value.bias,
            self.proj.weight, self.proj.bias, window_size=self.window_size, num_heads=self.num_heads,
            pad_mode=self.pad_mode, layout=self.layout, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, "
                f"pad_mode={self.pad_mode!r}, layout={self.layout!r}")


class WindowAggregation(nn.Module):
    r"""Pool every window to one token: windows (B, nH, nW, ws², dim) -> (B, nH, nW, dim).

    ``p = softmax(score(mean of the window))`` over the ws² tokens, ``out = Σ p · token``
    (MT-UNet's DlightConv)."""

    def __init__(self, dim: int, window_size: int = 4, *, device=None, dtype=None):
        super().__init__()
        self.window_size = window_size
        self.score = nn.Linear(dim, window_size * window_size, device=device, dtype=dtype)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        L = self.window_size ** 2
        if windows.dim() < 2 or windows.shape[-2] != L or windows.shape[-1] != self.score.in_features:
            raise ValueError(
                f"WindowAggregation: input must have shape (..., ws², C) = (..., {L}, {self.score.in_features}), "
                f"got {tuple(windows.shape)}")
        return window_aggregation(windows, self.score.weight, self.score.bias)


class GaussianAxialAttention(nn.Module):
    r"""Row and column attention with a learned Gaussian distance penalty, from q, k, v (fused).

    x (B, H, W, dim) -> (B, H, W, dim):
    ``o[r,c] = Σ_j softmax_j(q[r,c]·k[r,j] − θ(j−c)²) v[r,j] + Σ_i softmax_i(q[r,c]·k[i,c] − θ(i−r)²) v[i,c]``
    with q, k, v Linear projections (single head over all channels, no 1/sqrt(d) scaling) and
    θ = ``shift`` (initialised as MT-UNet does, |N(0, 1)|). H ≠ W works. The scores are never stored
    (:func:`medattn_fast.functional.gaussian_axial_attention`). Not created: the key bias and
    GaussianTrans's ``bias`` (both cancel in the softmaxes), the original's never-called ``out`` layer.
    """

    def __init__(self, dim: int, *, backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.dim, self.backend = dim, backend
        self.query = nn.Linear(dim, dim, **factory)
        self.key = nn.Linear(dim, dim, bias=False, **factory)
        self.value = nn.Linear(dim, dim, **factory)
        self.shift = nn.Parameter(torch.randn(1, **factory).abs())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_grid("GaussianAxialAttention", x, self.dim)
        return MF.gaussian_axial_attention(self.query(x), self.key(x), self.value(x), self.shift, backend=self.backend)


def _dynamic_and_small(n, window_size: int) -> bool:
    """Under torch.export (strict or not): ``n`` is a dynamic size (neither bound below is known for
    every size) and the example's value has a single window (the test adds ``n > window_size`` to
    the exported program's bounds otherwise)."""
    if statically_true(n > window_size) or statically_true(n <= window_size):
        return False  # a fixed size, or one already bounded
    return not n > window_size


class LocalGlobalAttention(nn.Module):
    r"""Local window attention plus global axial attention on the grid of windows (MT-UNet CSAttention).

    x (B, H, W, dim) -> (B, H, W, dim), any H, W:

    1. local  = WindowAttention(x) in the windowed layout (H, W padded up to multiples of ws);
    2. tokens = WindowAggregation(local): one token per window, a (Hp/ws, Wp/ws) grid;
    3. global = GaussianAxialAttention(tokens), upsampled ×ws bilinearly (align_corners=True) back
       to (Hp, Wp);
    4. out    = fuse([global, local]) (a 1×1 projection 2·dim -> dim), cropped to H × W.
    """

    def __init__(self, dim: int, num_heads: int = 8, window_size: int = 4, *, pad_mode: str = "mtunet",
                 backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.dim, self.window_size = dim, window_size
        self.local = WindowAttention(dim, num_heads, window_size, pad_mode=pad_mode, layout="windows",
                                     backend=backend, **factory)
        self.aggregate = WindowAggregation(dim, window_size, **factory)
        self.global_attention = GaussianAxialAttention(dim, backend=backend, **factory)
        self.fuse = nn.Linear(2 * dim, dim, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_grid("LocalGlobalAttention", x, self.dim)
        if torch.compiler.is_exporting() and any(_dynamic_and_small(n, self.window_size) for n in x.shape[1:3]):
            # From an example whose grid of windows has a single row or column along a dynamic size,
            # the exporter fixes that size, and the graph (which ONNX Runtime runs at any size) gave
            # wrong results at others.
            raise ValueError(f"LocalGlobalAttention: export with dynamic sizes from an example with at least 2 "
                             f"windows along each dim (H, W > window_size = {self.window_size}), got x of shape "
                             f"{tuple(int(n) for n in x.shape)}; or export with fixed sizes")
        windows = self.local(x)  # (B, nH, nW, ws², dim)
        glob = self.global_attention(self.aggregate(windows))  # (B, nH, nW, dim)
        return fuse_local_global(windows, glob, x.shape[1:3], self.fuse.weight, self.fuse.bias, scale=self.window_size)


class ExternalAttention(nn.Module):
    r"""Multi-head external attention with double normalisation (MT-UNet MEAttention).

    x (B, ..., dim) -> (B, ..., dim); tokens are every position between the batch and the channel
    dims. ``query`` expands dim -> expansion·dim, split into ``num_heads`` heads of width d; per
    head ``a = softmax_tokens(q_h M_kᵀ)``, ``a / (1e-9 + Σ_slots a)``, ``y_h = a M_vᵀ + b_v``;
    heads concatenated, ``proj`` back to dim. The query and memory-key projections have no bias
    (it could not change the output: it is constant over the tokens the softmax runs over).
    """

    def __init__(self, dim: int, num_heads: int = 32, memory_size: int = 64, expansion: int = 4, *,
                 backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        inner = dim * expansion
        if inner % num_heads != 0:
            raise ValueError(f"ExternalAttention: expansion·dim={inner} must be divisible by num_heads={num_heads}")
        self.dim, self.num_heads, self.backend = dim, num_heads, backend
        head_dim = inner // num_heads
        self.query = nn.Linear(dim, inner, bias=False, **factory)
        self.memory_key = nn.Linear(head_dim, memory_size, bias=False, **factory)
        self.memory_value = nn.Linear(memory_size, head_dim, **factory)
        self.proj = nn.Linear(inner, dim, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 3 or x.shape[-1] != self.dim:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"ExternalAttention: input must have shape (B, ..., C) = (*, ..., {self.dim}), got {got}")
        tokens = x.reshape(x.shape[0], -1, self.dim)
        out = MF.external_attention(tokens, self.query.weight, None, self.memory_key.weight, None,
                                    self.memory_value.weight, self.memory_value.bias, self.proj.weight,
                                    self.proj.bias, num_heads=self.num_heads, backend=self.backend)
        return out.view(x.shape)


class MixedTransformerBlock(nn.Module):
    r"""MT-UNet's mixed transformer module (EAmodule): x (B, H, W, dim) -> (B, H, W, dim).

    ``x = x + LocalGlobalAttention(LN(x))``; ``x = x + ExternalAttention(LN'(x))`` (eps 1e-6).
    LN' has no bias: it would reach the external attention only as a constant over tokens.
    """

    def __init__(self, dim: int, num_heads: int = 8, window_size: int = 4, *, external_heads: Optional[int] = None,
                 memory_size: int = 64, expansion: int = 4, pad_mode: str = "mtunet", backend: Optional[str] = None,
                 device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.norm_attention = nn.LayerNorm(dim, eps=1e-6, **factory)
        self.attention = LocalGlobalAttention(dim, num_heads, window_size, pad_mode=pad_mode, backend=backend, **factory)
        self.norm_external = nn.LayerNorm(dim, eps=1e-6, bias=False, **factory)
        self.external = ExternalAttention(dim, external_heads or expansion * num_heads, memory_size, expansion,
                                          backend=backend, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm_attention(x))
        return x + self.external(self.norm_external(x))
