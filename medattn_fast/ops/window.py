r"""Window attention (MT-UNet ``WinAttention`` + ``Attention``, Swin-like).

Tokens on a grid (B, H, W, C) are padded up to multiples of the window size ws, cut into
(Hp/ws)·(Wp/ws) windows of L = ws² tokens, and each window runs multi-head softmax attention on
its own tokens, followed by the output projection::

    q, k, v = x W_qᵀ + b_q, x W_kᵀ + b_k, x W_vᵀ + b_v            (heads of width d = A/heads)
    o_h     = softmax(q_h k_hᵀ / sqrt(d)) v_h                      (inside each window, per head)
    out     = concat_h(o_h) W_oᵀ + b_o

Padding (``pad_mode``), for pad_h = (−H) mod ws rows and pad_w = (−W) mod ws columns:

* ``"mtunet"`` — exactly the original: zeros on the bottom strip and the right strip, and the
  bottom-right pad_h × pad_w corner filled with a copy of x's last pad_h × pad_w block
  ``x[H−pad_h:, W−pad_w:]``; padded tokens are keys like any other (no mask). The original only
  handles square grids; for H ≠ W the same rule is applied per axis. Where the grid is smaller than
  the pad (H < pad_h, e.g. H = 1 with ws = 4) the corner's source rows/columns are clamped to the
  grid, which is what the original's broadcast does for H = 1 (for 1 < H < pad_h it raises).
* ``"mask"`` — zeros, and padded keys are masked out of every softmax (Swin-style). Every window
  holds at least one real token (pad < ws), so no softmax row is empty.

Output ``layout``:

* ``"grid"``    (B, H, W, Co): the padded positions dropped;
* ``"padded"``  (B, Hp, Wp, Co): every position the attention computed, padding included;
* ``"windows"`` (B, Hp/ws, Wp/ws, ws·ws, Co): the original WinAttention's own output layout
  (tokens row-major inside each window), which MT-UNet's DlightConv consumes.

Backends: ``reference`` (explicit loops over windows and heads, the original's math), ``torch``
(vectorised: the grid is partitioned with one reshape of a permuted view, q/k/v come from one GEMM
with the three weights concatenated, and every window and head is one batch of small matmuls);
``triton`` (``_window_triton.py``: the same GEMMs around a fused per-window kernel that pads,
partitions and merges by index arithmetic; preferred by ``auto`` on CUDA).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .. import backend as B
from .._shapes import crop_grid, statically_true
from . import _validate as V
from ._families import dispatcher

__all__ = ["window_attention", "PAD_MODES", "LAYOUTS", "padded_size"]

_OP = "window_attention"
_op = dispatcher(_OP)   # its row in ops/_families.py: auto orders, export backend, limits

PAD_MODES = ("mtunet", "mask")
LAYOUTS = ("grid", "padded", "windows")


def padded_size(n: int, window_size: int) -> int:
    """``n`` rounded up to a multiple of ``window_size`` (written as windows · ws, so that a
    symbolic n under ``torch.export`` gives a size the window reshapes can prove divisible)."""
    return (n + window_size - 1) // window_size * window_size


# The size tests below go through ``known`` (_shapes.statically_true): the plain test in eager
# mode; in an exported or traced graph the general path (pad by a size that may be 0), valid for
# every input size instead of the example's.
known = statically_true


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------

def _check(x, query_weight, query_bias, key_weight, key_bias, value_weight, value_bias, proj_weight, proj_bias,
           window_size, num_heads, pad_mode, layout):
    V.tensor(_OP, "x", x, 4)
    V.positive_int(_OP, "window_size", window_size)
    V.positive_int(_OP, "num_heads", num_heads)
    V.choice(_OP, "pad_mode", pad_mode, PAD_MODES)
    V.choice(_OP, "layout", layout, LAYOUTS)
    C = x.shape[-1]
    A = V.head_projection(_OP, "query_weight", query_weight, C, num_heads)
    for name, w in (("key_weight", key_weight), ("value_weight", value_weight)):
        V.tensor(_OP, name, w, 2)
        V.shape(_OP, name, w, (A, C), names="(heads·d, C)")
    Co = V.head_output(_OP, "proj_weight", proj_weight, A)
    V.optional_vectors(_OP, ("query_bias", query_bias, A), ("key_bias", key_bias, A), ("value_bias", value_bias, A),
                       ("proj_bias", proj_bias, Co))
    V.same_device_dtype(_OP, x=x, query_weight=query_weight, query_bias=query_bias, key_weight=key_weight,
                        key_bias=key_bias, value_weight=value_weight, value_bias=value_bias,
                        proj_weight=proj_weight, proj_bias=proj_bias)


# ---------------------------------------------------------------------------------------------
# layout helpers shared by both backends (views and one reshape; no math)
# ---------------------------------------------------------------------------------------------

def _partition(xp: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, Hp, Wp, C) -> (B, Hp/ws, Wp/ws, ws·ws, C), tokens row-major inside a window."""
    Bn, Hp, Wp, C = xp.shape
    return (xp.view(Bn, Hp // ws, ws, Wp // ws, ws, C)
            .permute(0, 1, 3, 2, 4, 5)
            .reshape(Bn, Hp // ws, Wp // ws, ws * ws, C))


def _to_layout(windows: torch.Tensor, layout: str, H: int, W: int, ws: int) -> torch.Tensor:
    """Windowed output (B, nH, nW, ws·ws, Co) -> the requested layout."""
    if layout == "windows":
        return windows
    Bn, nH, nW, _, Co = windows.shape
    grid = (windows.view(Bn, nH, nW, ws, ws, Co)
            .permute(0, 1, 3, 2, 4, 5)
            .reshape(Bn, nH * ws, nW * ws, Co))
    return grid if layout == "padded" else crop_grid(grid, H, W)


def _padded_source(n: int, pad: int, device) -> torch.Tensor:
    """For each of the n + pad rows (or columns) of the padded grid, the row of x it copies: i for
    i < n, i − pad below (the corner copies x's last ``pad`` rows), clamped to the grid when n < pad."""
    i = torch.arange(n + pad, device=device)
    return torch.where(i < n, i, i - pad).clamp_min(0)


# ---------------------------------------------------------------------------------------------
# reference backend: the original's math, one window and one head at a time
# ---------------------------------------------------------------------------------------------

def _reference_pad(x: torch.Tensor, ws: int, pad_mode: str) -> torch.Tensor:
    Bn, H, W, C = x.shape
    Hp, Wp = padded_size(H, ws), padded_size(W, ws)
    xp = x.new_zeros((Bn, Hp, Wp, C))
    xp[:, :H, :W] = x
    if pad_mode == "mtunet":
        pad_h, pad_w = Hp - H, Wp - W
        for i in range(pad_h):
            for j in range(pad_w):
                xp[:, H + i, W + j] = x[:, max(H - pad_h + i, 0), max(W - pad_w + j, 0)]
    return xp


@_op.register("reference")
def _reference(x, query_weight, query_bias, key_weight, key_bias, value_weight, value_bias, proj_weight,
               proj_bias, *, window_size, num_heads, pad_mode, layout):
    ws = window_size
    Bn, H, W, _ = x.shape
    xp = _reference_pad(x, ws, pad_mode)
    Hp, Wp = xp.shape[1], xp.shape[2]
    d = query_weight.shape[0] // num_heads
    # real[i, j]: is pixel (i, j) of the padded grid a real token?
    real = torch.zeros(Hp, Wp, dtype=torch.bool, device=x.device)
    real[:H, :W] = True
    rows = []
    for wi in range(Hp // ws):
        cols = []
        for wj in range(Wp // ws):
            tokens = xp[:, wi * ws:(wi + 1) * ws, wj * ws:(wj + 1) * ws].reshape(Bn, ws * ws, -1)
            keep = real[wi * ws:(wi + 1) * ws, wj * ws:(wj + 1) * ws].reshape(ws * ws)
            q = F.linear(tokens, query_weight, query_bias)
            k = F.linear(tokens, key_weight, key_bias)
            v = F.linear(tokens, value_weight, value_bias)
            heads = []
            for h in range(num_heads):
                sl = slice(h * d, (h + 1) * d)
                scores = torch.matmul(q[..., sl], k[..., sl].transpose(-1, -2)) / math.sqrt(d)  # (B, L, L)
                if pad_mode == "mask":
                    scores = scores.masked_fill(~keep, float("-inf"))
                heads.append(torch.matmul(torch.softmax(scores, dim=-1), v[..., sl]))
            cols.append(F.linear(torch.cat(heads, dim=-1), proj_weight, proj_bias))  # (B, L, Co)
        rows.append(torch.stack(cols, dim=1))  # (B, nW, L, Co)
    windows = torch.stack(rows, dim=1)  # (B, nH, nW, L, Co)
    return _to_layout(windows, layout, H, W, ws)


# ---------------------------------------------------------------------------------------------
# torch backend: vectorised
# ---------------------------------------------------------------------------------------------

def _torch_pad(x: torch.Tensor, ws: int, pad_mode: str) -> torch.Tensor:
    Bn, H, W, C = x.shape
    pad_h, pad_w = padded_size(H, ws) - H, padded_size(W, ws) - W
    if known(pad_h == 0) and known(pad_w == 0):
        return x
    if pad_mode == "mask":
        return F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    # mtunet: [x | 0] over [0 | corner], corner = x's last pad_h × pad_w block (gathered, so
    # autograd routes its gradient back to those pixels of x).
    if isinstance(pad_h, int) and isinstance(pad_w, int):  # eager: pad, and stack the corner below
        top = F.pad(x, (0, 0, 0, pad_w))  # (B, H, Wp, C)
        if pad_h == 0:
            return top
        corner = x.index_select(1, _padded_source(H, pad_h, x.device)[H:])
        corner = corner.index_select(2, _padded_source(W, pad_w, x.device)[W:])
        return torch.cat((top, F.pad(corner, (0, 0, W, 0))), dim=1)  # zeros under x, the corner on the right
    # Exported or traced graph: no tensor may have a pad-sized dim (the exporter would fix the
    # pad), so one gather over the whole padded grid and one mask for the two zero strips
    # (2-3x slower than the eager path above, same values and gradients).
    rows, cols = _padded_source(H, pad_h, x.device), _padded_source(W, pad_w, x.device)
    gathered = x.index_select(1, rows).index_select(2, cols)  # (B, Hp, Wp, C)
    real_rows = torch.arange(H + pad_h, device=x.device) < H
    real_cols = torch.arange(W + pad_w, device=x.device) < W
    keep = real_rows[:, None] == real_cols[None, :]  # x itself and the corner
    return torch.where(keep[..., None], gathered, 0.0)


def _key_mask(H: int, W: int, ws: int, device) -> torch.Tensor:
    """(nH, nW, 1, 1, L) bool, True for real keys: broadcasts over (B, nH, nW, heads, L, L)."""
    Hp, Wp = padded_size(H, ws), padded_size(W, ws)
    rows = torch.arange(Hp, device=device) < H
    cols = torch.arange(Wp, device=device) < W
    real = (rows[:, None] & cols[None, :]).view(Hp // ws, ws, Wp // ws, ws).permute(0, 2, 1, 3)
    return real.reshape(Hp // ws, Wp // ws, 1, 1, ws * ws)


@_op.register("torch")
def _torch(x, query_weight, query_bias, key_weight, key_bias, value_weight, value_bias, proj_weight, proj_bias,
           *, window_size, num_heads, pad_mode, layout):
    ws = window_size
    Bn, H, W, _ = x.shape
    A = query_weight.shape[0]
    d = A // num_heads
    windows = _partition(_torch_pad(x, ws, pad_mode), ws)  # (B, nH, nW, L, C)
    nH, nW, L = windows.shape[1:4]

    # One GEMM for q, k and v. A missing bias becomes zeros only when another one is given.
    qkv_weight = torch.cat((query_weight, key_weight, value_weight), dim=0)
    biases = (query_bias, key_bias, value_bias)
    qkv_bias = None
    if any(b is not None for b in biases):
        qkv_bias = torch.cat([b if b is not None else query_weight.new_zeros(A) for b in biases])
    qkv = F.linear(windows, qkv_weight, qkv_bias).view(Bn, nH, nW, L, 3, num_heads, d)
    q, k, v = qkv.permute(4, 0, 1, 2, 5, 3, 6).unbind(0)  # each (B, nH, nW, heads, L, d)

    # Windows are tiny (L = 16 in MT-UNet): the (L, L) scores are smaller than q itself, so plain
    # batched matmuls beat F.scaled_dot_product_attention here (measured ~5x forward on CPU, whose
    # fused kernels target long sequences and fall back to an unfused path for 6-d batches).
    scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(d))  # (B, nH, nW, heads, L, L)
    if pad_mode == "mask" and not (known(H % ws == 0) and known(W % ws == 0)):
        scores = scores.masked_fill(~_key_mask(H, W, ws, x.device), float("-inf"))
    o = torch.matmul(torch.softmax(scores, dim=-1), v)  # (B, nH, nW, heads, L, d)
    o = o.transpose(-2, -3).reshape(Bn, nH, nW, L, A)  # heads concatenated per token
    return _to_layout(F.linear(o, proj_weight, proj_bias), layout, H, W, ws)


# ---------------------------------------------------------------------------------------------
# public entry point
# ---------------------------------------------------------------------------------------------

@B.autocast_entry()
def window_attention(x: torch.Tensor, query_weight: torch.Tensor, query_bias: Optional[torch.Tensor],
                     key_weight: torch.Tensor, key_bias: Optional[torch.Tensor], value_weight: torch.Tensor,
                     value_bias: Optional[torch.Tensor], proj_weight: torch.Tensor,
                     proj_bias: Optional[torch.Tensor], *, window_size: int, num_heads: int,
                     pad_mode: str = "mtunet", layout: str = "grid",
                     backend: Optional[str] = None) -> torch.Tensor:
    r"""Multi-head attention inside ws×ws windows, then the output projection: MT-UNet's
    ``WinAttention`` (Wang et al., ICASSP 2022; Swin-style windows without shift).

    Per window and head: ``o_h = softmax(q_h k_hᵀ / sqrt(d)) v_h`` with q, k, v the Linear
    projections of the window's tokens; ``out = concat_h(o_h) W_oᵀ + b_o``. Every weight is in
    ``nn.Linear`` layout (out, in); ``key_bias`` cannot change the output (its gradient is 0).

    Args:
        x: tokens on a grid (B, H, W, C), any H, W (padded up to multiples of ``window_size``).
        query_weight, query_bias: (A, C), (A,) or None, A = heads·d — ``Attention.query_layer``.
        key_weight, key_bias: (A, C), (A,) or None — ``Attention.key_layer``.
        value_weight, value_bias: (A, C), (A,) or None — ``Attention.value_layer``.
        proj_weight, proj_bias: (Co, A), (Co,) or None — ``Attention.out``.
        window_size: ws (MT-UNet: configs["win_size"] = 4).
        num_heads: heads (MT-UNet: configs["head"] = 8).
        pad_mode: ``"mtunet"`` (the original's padding: zeros plus a copied corner, unmasked) or
            ``"mask"`` (zeros, padded keys masked); see the module docstring.
        layout: ``"grid"`` -> (B, H, W, Co); ``"padded"`` -> (B, Hp, Wp, Co);
            ``"windows"`` -> (B, Hp/ws, Wp/ws, ws·ws, Co), the original WinAttention's output.
        backend: force a backend for this call (``"reference"``, ``"torch"``, ``"triton"``); default: the
            one in force.

    Returns:
        The attention output in ``layout``, dtype of x.
    """
    _check(x, query_weight, query_bias, key_weight, key_bias, value_weight, value_bias, proj_weight, proj_bias,
           window_size, num_heads, pad_mode, layout)
    return _op(x, query_weight, query_bias, key_weight, key_bias, value_weight, value_bias, proj_weight,
               proj_bias, window_size=window_size, num_heads=num_heads, pad_mode=pad_mode, layout=layout,
               backend=backend)
