r"""Fused Triton kernels of window attention's core (MT-UNet WinAttention), forward
and backward.

The q/k/v projections and the output projection stay GEMMs (``medattn_fast/ops/_window_triton.py``).
These kernels do the part between them, per (batch, window, head), reading the q/k/v rows of the
window's tokens straight out of the projection ``qkv`` (B, H, W, 3A) — columns [0, A) q, [A, 2A)
k, [2A, 3A) v, head h at columns h·d .. h·d + d of each — by index arithmetic: no padded copy of
x, no partition permute, no merge permute.

Math, per window of L = ws² tokens and head h (d = A / heads, s = 1/sqrt(d)):

    P = softmax_row(s · q kᵀ)       (L × L; in "mask" mode padded keys get −inf first)
    o = P v                          (L × d)

Backward (dO = ∂L/∂o): dv = Pᵀ dO, dP = dO vᵀ, D_i = Σ_j P_ij dP_ij, dS = P ⊙ (dP − D),
dq = s · dS k, dk = s · dSᵀ q. Windows are tiny (MT-UNet: L = 16, d = 32..128), so the backward
recomputes P from q and k instead of saving anything: the forward saves nothing but its inputs.

Padding (pad_h = (−H) mod ws rows, pad_w = (−W) mod ws columns) is index arithmetic too. A token
at (r, c) of the padded (Hp, Wp) grid is one of

* real (r < H and c < W): its q/k/v row is ``qkv[b, r, c]``;
* a corner token ("mtunet" only: r ≥ H and c ≥ W): the original copies x[H − pad_h + i, W − pad_w + j]
  there, so its q/k/v row *is* the projection of that source token:
  ``qkv[b, max(r − pad_h, 0), max(c − pad_w, 0)]`` (the clamp is the module's rule for a grid
  smaller than the pad);
* a zero token (every other padded position; in "mask" mode the corner too): x = 0 there, so its
  q/k/v are the projection biases ``qkv_bias`` (zeros without biases).

The backward folds the padded tokens' gradients back onto what produced them: zero tokens' onto the
bias (per-window partial sums, reduced in a fixed order by ``torch.sum``), corner tokens' onto
their source tokens' rows. A source token can also be a real token of another window, so the corner
gradients go to a small (B, pad_h, pad_w, 3A) float32 buffer that is added onto ``dqkv`` after the
kernel with one slice add (the few clamped duplicates summed first): deterministic, no atomics, and
it costs a pad_h × pad_w block per image.

Output layouts (``layout``), all written directly by the kernel through strides:
"grid" (B, H, W, A) — real tokens only; "padded" (B, Hp, Wp, A); "windows" (B, Hp/ws, Wp/ws, L, A),
the layout MT-UNet's DlightConv consumes. The same stride arithmetic reads ∂L/∂o in the backward
(positions a layout does not hold have a zero gradient).

DlightConv is not fused into the epilogue. It consumes the windows *after* the output projection,
a GEMM over all heads of a token, while these programs own one head: the aggregation
``softmax(mean_L(out) W_sᵀ + b_s)`` needs every head's projected output of the window, i.e. a
cross-program reduction, and MT-UNet's local branch needs the windows themselves anyway (so they
are written whatever happens). What a fusion could save is one read of the (B, Hp, Wp, C) windows
tensor — DlightConv is a memory-bound pass of that size, small next to this op's q/k/v traffic.

Launch plan: one program per (window, head, batch) (grid axes in that order: the window count is
the large one), tiles of BLOCK_L = max(16, next_pow2(L)) tokens × BLOCK_D = max(16, next_pow2(d))
features (16 is ``tl.dot``'s minimum), every row, key and feature masked. ws ≤ 8 (L ≤ 64) and
d ≤ 128 keep a program's q, k, v, P and gradient tiles in registers (``MAX_WINDOW``/``MAX_HEAD_DIM``),
but for 64-token windows at padded d = 128 (float32, and the 16-bit backward): there the scores and
dO vᵀ are summed over head-dim chunks and o, dq, dk, dv computed and stored chunk by chunk, each
chunk of q/k/v/dO loaded when used (``_head_dim_chunk``: register spills otherwise).

Precision: scores, softmax and every accumulator in float32; P and dS enter their dots in float32
(``ieee`` for float32 inputs, TF32 for 16-bit ones). Under ``TRITON_INTERPRET=1`` (CPU tests) the
dots run on float32 copies and bfloat16 stores round explicitly (``_util``: the interpreter's
bfloat16 dot and cast are wrong in triton 3.9).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._util import (
    dot as _dot, dot_f32 as _dot_f32, dot_precision as _dot_precision, interpreted,
    pow2_at_least_16 as _pow2_at_least_16, to_storage,
)
from ._util import launch

__all__ = ["window_forward", "window_backward", "MAX_HEAD_DIM", "MAX_WINDOW", "PAD_MODES", "LAYOUTS"]

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128   # d held whole in registers (but see _head_dim_chunk)
MAX_WINDOW = 8       # ws: L = ws² ≤ 64 tokens per program
PAD_MODES = ("mtunet", "mask")
LAYOUTS = ("grid", "padded", "windows")


def _num_warps(block_l: int, block_d: int) -> int:
    # One warp per 256 elements of a (BLOCK_L × BLOCK_D) tile, 2 to 16. From ptxas's register
    # report for sm_90 (tests/_sm90_compile.py with TRITON_DUMP_PTXAS_LOG=1): the earlier rule
    # (1/2/4 warps at ≤1024/≤4096/more elements) spilled in float32, whose IEEE dots run on FMAs
    # (24 KB forward / 75 KB backward spill stores at ws=8, d=128; 616 B backward at MT-UNet's
    # ws=4, d=128); this one spills nowhere at ws ≤ 5 or d ≤ 64. At 64-token windows with d = 128
    # (float32 forward 424 B / backward 2,560 B, 16-bit backward 360 B with whole-d tiles) the
    # kernels take d in chunks instead, with their own warps: _head_dim_chunk. At least 2 warps: the
    # one-warp 16 × 16 tile's float16 backward spilled 4 B (8 B stack) at 96 registers, 2 warps
    # need 72 (bf16 71, float32 107; was 100 and 167). Not yet timed on a GPU.
    return min(16, max(2, block_l * block_d // 256))


def _head_dim_chunk(block_l: int, block_d: int, dtype: torch.dtype, backward: bool) -> Tuple[int, int]:
    """(D_CHUNK, num_warps) of a kernel. ``D_CHUNK = block_d`` holds q, k, v (and dO) whole in
    registers. At 64-token windows (ws 6–8) with d = 128 that spilled for sm_90 whatever the warps
    (16 warps cap a thread at 128 registers): float32 forward 424 B and backward 2,560 B per
    thread, 16-bit backward 360–368 B. There the kernels take d in chunks, each loaded when used:
    float32 16 features, 8 warps (forward 112 registers, backward 180, 0 B; 32-feature chunks
    spill 560 B at 16 warps, 0 B at 210 registers with 8), 16-bit backward 32 features, 8 warps
    (123 registers, 0 B). Costs: q, k (and dO) read twice from L1/L2 in the backward."""
    if block_l >= 64 and block_d >= 128:
        if dtype == torch.float32:
            return 16, 8
        if backward:
            return 32, 8
    return block_d, _num_warps(block_l, block_d)


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _window_tokens(window, n_win_w, H, W, pad_h, pad_w, WS: tl.constexpr, BLOCK_L: tl.constexpr,
                   MTUNET: tl.constexpr):
    """Classify the BLOCK_L token slots of one window (row-major inside the window).

    Returns (ti, tj, in_window, real, corner, zero, src_r, src_c): the slot's row/column inside the
    window, masks, and the grid position its q/k/v row is read from (real and corner tokens)."""
    wi = window // n_win_w
    wj = window % n_win_w
    t = tl.arange(0, BLOCK_L)
    ti = t // WS
    tj = t % WS
    in_window = t < WS * WS
    r = wi * WS + ti
    c = wj * WS + tj
    real = in_window & (r < H) & (c < W)
    if MTUNET:
        corner = in_window & (r >= H) & (c >= W)
    else:
        corner = t < 0
    zero = in_window & (~real) & (~corner)
    src_r = tl.where(real, r, tl.maximum(r - pad_h, 0))
    src_c = tl.where(real, c, tl.maximum(c - pad_w, 0))
    return wi, wj, ti, tj, in_window, real, corner, zero, src_r, src_c


@triton.jit
def _load_part(qkv_ptr, bias_ptr, b, src_r, src_c, from_x, zero, feats, col0, d, sqb, sqh, sqw, sqc,
               HAS_BIAS: tl.constexpr):
    """(BLOCK_L, BLOCK_D) rows of one of q/k/v (columns col0 + feats): the projection row of the
    token's source, or the bias for a zero token; 0 outside the window and past d."""
    fmask = feats < d
    ptrs = (qkv_ptr + b * sqb + src_r[:, None].to(tl.int64) * sqh + src_c[:, None].to(tl.int64) * sqw
            + (col0 + feats)[None, :] * sqc)
    val = tl.load(ptrs, mask=from_x[:, None] & fmask[None, :], other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + col0 + feats, mask=fmask, other=0.0)
        val = tl.where(zero[:, None] & fmask[None, :], bias[None, :], val)
    return val


@triton.jit
def _window_probs(q, k, in_window, real, qk_scale, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                  MASK_KEYS: tl.constexpr):
    """Row softmax of s·q kᵀ (base 2 inside: qk_scale = s·log2 e), keys outside the window (and
    padded keys in mask mode) excluded. Every row keeps at least one key (a window always holds a
    real token), so no row is empty."""
    return _probs_of_scores(_dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale, in_window, real, MASK_KEYS)


@triton.jit
def _window_attention(qkv_ptr, bias_ptr, b, src_r, src_c, from_x, zero, in_window, real, feats, hd, d, A,
                      sqb, sqh, sqw, sqc, qk_scale, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                      UPCAST: tl.constexpr, MASK_KEYS: tl.constexpr):
    """This (window, head)'s q, k, v tiles and its probabilities P (the backward recomputes P
    exactly as the forward computes it)."""
    q = _load_part(qkv_ptr, bias_ptr, b, src_r, src_c, from_x, zero, feats, hd, d, sqb, sqh, sqw, sqc, HAS_BIAS)
    k = _load_part(qkv_ptr, bias_ptr, b, src_r, src_c, from_x, zero, feats, A + hd, d, sqb, sqh, sqw, sqc,
                   HAS_BIAS)
    v = _load_part(qkv_ptr, bias_ptr, b, src_r, src_c, from_x, zero, feats, 2 * A + hd, d, sqb, sqh, sqw, sqc,
                   HAS_BIAS)
    return q, k, v, _window_probs(q, k, in_window, real, qk_scale, PRECISION, UPCAST, MASK_KEYS)


@triton.jit
def _probs_of_scores(scores, in_window, real, MASK_KEYS: tl.constexpr):
    """:func:`_window_probs` from the scaled scores (base 2) s·log2(e)·q kᵀ."""
    keep = in_window
    if MASK_KEYS:
        keep = real
    scores = tl.where(keep[None, :], scores, float("-inf"))
    p = tl.exp2(scores - tl.max(scores, 1)[:, None])
    return p / tl.sum(p, 1)[:, None]


@triton.jit
def _chunked_scores(qkv_ptr, bias_ptr, b, src_r, src_c, from_x, zero, hd, d, A, sqb, sqh, sqw, sqc,
                    HAS_BIAS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
                    D_CHUNK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """q kᵀ (unscaled, L × L) summed over head-dim chunks of D_CHUNK features, each chunk of q and
    k loaded for its product only."""
    scores = tl.zeros([BLOCK_L, BLOCK_L], tl.float32)
    for k0 in range(0, BLOCK_D, D_CHUNK):
        feats = k0 + tl.arange(0, D_CHUNK)
        q = _load_part(qkv_ptr, bias_ptr, b, src_r, src_c, from_x, zero, feats, hd, d, sqb, sqh, sqw, sqc, HAS_BIAS)
        k = _load_part(qkv_ptr, bias_ptr, b, src_r, src_c, from_x, zero, feats, A + hd, d, sqb, sqh, sqw, sqc,
                       HAS_BIAS)
        scores += _dot(q, tl.trans(k), PRECISION, UPCAST)
    return scores


@triton.jit
def _window_forward_kernel(qkv_ptr, bias_ptr, o_ptr,
                           sqb, sqh, sqw, sqc, sob, sowi, sowj, soti, sotj, soc,
                           H, W, pad_h, pad_w, n_win_w, d, A, qk_scale,
                           WS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
                           MTUNET: tl.constexpr, MASK_KEYS: tl.constexpr, STORE_PADDED: tl.constexpr,
                           HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                           D_CHUNK: tl.constexpr):
    """o = softmax(s q kᵀ) v for one (window, head, batch), stored in the output layout.
    ``D_CHUNK < BLOCK_D`` (see :func:`_head_dim_chunk`): q kᵀ summed over head-dim chunks and o
    stored chunk by chunk, each chunk of q/k/v loaded when used (no d-wide tile held)."""
    window = tl.program_id(0)
    head = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    wi, wj, ti, tj, in_window, real, corner, zero, src_r, src_c = _window_tokens(
        window, n_win_w, H, W, pad_h, pad_w, WS, BLOCK_L, MTUNET)
    from_x = real | corner
    hd = head * d
    rows = in_window
    if not STORE_PADDED:
        rows = real
    if D_CHUNK == BLOCK_D:
        feats = tl.arange(0, BLOCK_D)
        q, k, v, p = _window_attention(qkv_ptr, bias_ptr, b, src_r, src_c, from_x, zero, in_window, real, feats,
                                       hd, d, A, sqb, sqh, sqw, sqc, qk_scale, HAS_BIAS, PRECISION, UPCAST,
                                       MASK_KEYS)
        o = _dot_f32(p, v, PRECISION, UPCAST)
        offs = (b * sob + wi.to(tl.int64) * sowi + wj.to(tl.int64) * sowj + ti[:, None].to(tl.int64) * soti
                + tj[:, None].to(tl.int64) * sotj + (hd + feats)[None, :] * soc)
        tl.store(o_ptr + offs, to_storage(o, o_ptr.dtype.element_ty), mask=rows[:, None] & (feats < d)[None, :])
    else:
        scores = _chunked_scores(qkv_ptr, bias_ptr, b, src_r, src_c, from_x, zero, hd, d, A, sqb, sqh, sqw, sqc,
                                 HAS_BIAS, BLOCK_L, BLOCK_D, D_CHUNK, PRECISION, UPCAST)
        p = _probs_of_scores(scores * qk_scale, in_window, real, MASK_KEYS)
        for k0 in range(0, BLOCK_D, D_CHUNK):
            feats = k0 + tl.arange(0, D_CHUNK)
            v = _load_part(qkv_ptr, bias_ptr, b, src_r, src_c, from_x, zero, feats, 2 * A + hd, d,
                           sqb, sqh, sqw, sqc, HAS_BIAS)
            o = _dot_f32(p, v, PRECISION, UPCAST)
            offs = (b * sob + wi.to(tl.int64) * sowi + wj.to(tl.int64) * sowj + ti[:, None].to(tl.int64) * soti
                    + tj[:, None].to(tl.int64) * sotj + (hd + feats)[None, :] * soc)
            tl.store(o_ptr + offs, to_storage(o, o_ptr.dtype.element_ty), mask=rows[:, None] & (feats < d)[None, :])


@triton.jit
def _store_grad_part(g, dqkv_ptr, corner_ptr, bias_part_ptr, b, window, n_windows, r_src, c_src, ti, tj, wi, wj,
                     real, corner, zero, feats, col, d, sdb, sdh, sdw, sdc, H, W, pad_h, pad_w, A3,
                     WS: tl.constexpr, MTUNET: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Route one gradient tile (dq, dk or dv of this head; columns ``col + feats`` of 3A) to where
    its tokens came from: real rows into dqkv, corner rows into the corner buffer, zero rows summed
    into this window's bias partial."""
    fmask = (feats < d)[None, :]
    offs = (b * sdb + r_src[:, None].to(tl.int64) * sdh + c_src[:, None].to(tl.int64) * sdw
            + (col + feats)[None, :] * sdc)
    tl.store(dqkv_ptr + offs, to_storage(g, dqkv_ptr.dtype.element_ty), mask=real[:, None] & fmask)
    if MTUNET:
        # corner slot (H + i, W + j) -> buffer (B, pad_h, pad_w, 3A), float32, contiguous
        i = wi * WS + ti - H
        j = wj * WS + tj - W
        coffs = ((b * pad_h + i[:, None]) * pad_w + j[:, None]) * A3 + (col + feats)[None, :]
        tl.store(corner_ptr + coffs, g, mask=corner[:, None] & fmask)
    if HAS_BIAS:
        part = tl.sum(tl.where(zero[:, None], g, 0.0), 0)
        tl.store(bias_part_ptr + (b * n_windows + window) * A3 + col + feats, part, mask=feats < d)


@triton.jit
def _window_backward_kernel(qkv_ptr, bias_ptr, do_ptr, dqkv_ptr, corner_ptr, bias_part_ptr,
                            sqb, sqh, sqw, sqc, sgb, sgwi, sgwj, sgti, sgtj, sgc, sdb, sdh, sdw, sdc,
                            H, W, pad_h, pad_w, n_win_w, n_windows, d, A, qk_scale, scale,
                            WS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
                            MTUNET: tl.constexpr, MASK_KEYS: tl.constexpr, STORE_PADDED: tl.constexpr,
                            HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                            D_CHUNK: tl.constexpr):
    """dq, dk, dv of one (window, head, batch), P recomputed; routed by ``_store_grad_part``.
    ``D_CHUNK < BLOCK_D``: q kᵀ and dO vᵀ summed over head-dim chunks, then dq, dk, dv computed
    and stored chunk by chunk (q, k, dO reloaded from L1/L2), no d-wide tile held."""
    window = tl.program_id(0)
    head = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    wi, wj, ti, tj, in_window, real, corner, zero, src_r, src_c = _window_tokens(
        window, n_win_w, H, W, pad_h, pad_w, WS, BLOCK_L, MTUNET)
    from_x = real | corner
    hd = head * d
    rows = in_window
    if not STORE_PADDED:
        rows = real   # the grid layout holds no padded position: their output gradient is 0
    A3 = 3 * A
    goffs0 = (b * sgb + wi.to(tl.int64) * sgwi + wj.to(tl.int64) * sgwj + ti[:, None].to(tl.int64) * sgti
              + tj[:, None].to(tl.int64) * sgtj)
    if D_CHUNK == BLOCK_D:
        feats = tl.arange(0, BLOCK_D)
        fmask = feats < d
        q, k, v, p = _window_attention(qkv_ptr, bias_ptr, b, src_r, src_c, from_x, zero, in_window, real, feats,
                                       hd, d, A, sqb, sqh, sqw, sqc, qk_scale, HAS_BIAS, PRECISION, UPCAST,
                                       MASK_KEYS)
        do = tl.load(do_ptr + goffs0 + (hd + feats)[None, :] * sgc, mask=rows[:, None] & fmask[None, :],
                     other=0.0).to(tl.float32)

        dv = _dot_f32(tl.trans(p), do, PRECISION, UPCAST)                       # (L, D)
        dp = _dot_f32(do, tl.trans(v), PRECISION, UPCAST)                       # (L, L)
        ds = p * (dp - tl.sum(p * dp, 1)[:, None])
        dq = _dot_f32(ds, k, PRECISION, UPCAST) * scale
        dk = _dot_f32(tl.trans(ds), q, PRECISION, UPCAST) * scale
        _store_grad_part(dq, dqkv_ptr, corner_ptr, bias_part_ptr, b, window, n_windows, src_r, src_c, ti, tj, wi,
                         wj, real, corner, zero, feats, hd, d, sdb, sdh, sdw, sdc, H, W, pad_h, pad_w, A3,
                         WS, MTUNET, HAS_BIAS)
        _store_grad_part(dk, dqkv_ptr, corner_ptr, bias_part_ptr, b, window, n_windows, src_r, src_c, ti, tj, wi,
                         wj, real, corner, zero, feats, A + hd, d, sdb, sdh, sdw, sdc, H, W, pad_h, pad_w, A3,
                         WS, MTUNET, HAS_BIAS)
        _store_grad_part(dv, dqkv_ptr, corner_ptr, bias_part_ptr, b, window, n_windows, src_r, src_c, ti, tj, wi,
                         wj, real, corner, zero, feats, 2 * A + hd, d, sdb, sdh, sdw, sdc, H, W, pad_h, pad_w, A3,
                         WS, MTUNET, HAS_BIAS)
    else:
        scores = _chunked_scores(qkv_ptr, bias_ptr, b, src_r, src_c, from_x, zero, hd, d, A, sqb, sqh, sqw, sqc,
                                 HAS_BIAS, BLOCK_L, BLOCK_D, D_CHUNK, PRECISION, UPCAST)
        dp = tl.zeros([BLOCK_L, BLOCK_L], tl.float32)
        for k0 in range(0, BLOCK_D, D_CHUNK):
            feats = k0 + tl.arange(0, D_CHUNK)
            v = _load_part(qkv_ptr, bias_ptr, b, src_r, src_c, from_x, zero, feats, 2 * A + hd, d,
                           sqb, sqh, sqw, sqc, HAS_BIAS)
            do = tl.load(do_ptr + goffs0 + (hd + feats)[None, :] * sgc, mask=rows[:, None] & (feats < d)[None, :],
                         other=0.0).to(tl.float32)
            dp += _dot_f32(do, tl.trans(v), PRECISION, UPCAST)
        p = _probs_of_scores(scores * qk_scale, in_window, real, MASK_KEYS)
        ds = p * (dp - tl.sum(p * dp, 1)[:, None])
        for k0 in range(0, BLOCK_D, D_CHUNK):
            feats = k0 + tl.arange(0, D_CHUNK)
            q = _load_part(qkv_ptr, bias_ptr, b, src_r, src_c, from_x, zero, feats, hd, d, sqb, sqh, sqw, sqc,
                           HAS_BIAS)
            k = _load_part(qkv_ptr, bias_ptr, b, src_r, src_c, from_x, zero, feats, A + hd, d, sqb, sqh, sqw, sqc,
                           HAS_BIAS)
            do = tl.load(do_ptr + goffs0 + (hd + feats)[None, :] * sgc, mask=rows[:, None] & (feats < d)[None, :],
                         other=0.0).to(tl.float32)
            dq = _dot_f32(ds, k, PRECISION, UPCAST) * scale
            _store_grad_part(dq, dqkv_ptr, corner_ptr, bias_part_ptr, b, window, n_windows, src_r, src_c, ti, tj,
                             wi, wj, real, corner, zero, feats, hd, d, sdb, sdh, sdw, sdc, H, W, pad_h, pad_w, A3,
                             WS, MTUNET, HAS_BIAS)
            dk = _dot_f32(tl.trans(ds), q, PRECISION, UPCAST) * scale
            _store_grad_part(dk, dqkv_ptr, corner_ptr, bias_part_ptr, b, window, n_windows, src_r, src_c, ti, tj,
                             wi, wj, real, corner, zero, feats, A + hd, d, sdb, sdh, sdw, sdc, H, W, pad_h, pad_w,
                             A3, WS, MTUNET, HAS_BIAS)
            dv = _dot_f32(tl.trans(p), do, PRECISION, UPCAST)
            _store_grad_part(dv, dqkv_ptr, corner_ptr, bias_part_ptr, b, window, n_windows, src_r, src_c, ti, tj,
                             wi, wj, real, corner, zero, feats, 2 * A + hd, d, sdb, sdh, sdw, sdc, H, W, pad_h,
                             pad_w, A3, WS, MTUNET, HAS_BIAS)


# ---------------------------------------------------------------------------------------------
# launch functions
# ---------------------------------------------------------------------------------------------
def _geometry(qkv: torch.Tensor, window_size: int, num_heads: int):
    batch, H, W, three_a = qkv.shape
    if three_a % (3 * num_heads) != 0:
        raise ValueError(f"window kernels: qkv's last dim must be 3·heads·d, got {three_a} for {num_heads} heads")
    A = three_a // 3
    d = A // num_heads
    if d > MAX_HEAD_DIM or window_size > MAX_WINDOW:
        raise ValueError(f"window kernels: need d <= {MAX_HEAD_DIM} and window_size <= {MAX_WINDOW}, "
                         f"got d={d}, window_size={window_size}")
    pad_h, pad_w = (-H) % window_size, (-W) % window_size
    n_h, n_w = (H + pad_h) // window_size, (W + pad_w) // window_size
    return batch, H, W, A, d, pad_h, pad_w, n_h, n_w


def layout_shape(batch: int, H: int, W: int, channels: int, window_size: int, layout: str) -> Tuple[int, ...]:
    """Shape of an output with ``channels`` features per token in ``layout``."""
    hp, wp = H + (-H) % window_size, W + (-W) % window_size
    if layout == "grid":
        return (batch, H, W, channels)
    if layout == "padded":
        return (batch, hp, wp, channels)
    return (batch, hp // window_size, wp // window_size, window_size * window_size, channels)


def _layout_strides(t: torch.Tensor, layout: str, window_size: int) -> Tuple[int, ...]:
    """(s_batch, s_window_row, s_window_col, s_token_row, s_token_col, s_feature) of a tensor in
    ``layout``: token (ti, tj) of window (wi, wj) sits at wi·s1 + wj·s2 + ti·s3 + tj·s4."""
    if layout == "windows":
        sb, swi, swj, st, sc = t.stride()
        return sb, swi, swj, window_size * st, st, sc
    sb, sh, sw, sc = t.stride()
    return sb, window_size * sh, window_size * sw, sh, sw, sc


def window_forward(qkv: torch.Tensor, qkv_bias: Optional[torch.Tensor], *, window_size: int, num_heads: int,
                   pad_mode: str, layout: str, fp32_precision: Optional[str] = None) -> torch.Tensor:
    r"""Attention core of window attention: ``o = softmax(q kᵀ/sqrt(d)) v`` in every window and head.

    Args:
        qkv: (B, H, W, 3A) projection ``x [W_q; W_k; W_v]ᵀ + [b_q; b_k; b_v]`` of the *unpadded*
            grid, any strides; A = heads·d.
        qkv_bias: (3A,) the concatenated biases (the q/k/v of zero-padded tokens), or None (zeros).
        window_size, num_heads, pad_mode ("mtunet" | "mask"), layout ("grid" | "padded" | "windows"):
            as :func:`medattn_fast.ops.window.window_attention`.

    Returns:
        o, the heads concatenated per token, in ``layout``: (B, H, W, A), (B, Hp, Wp, A) or
        (B, Hp/ws, Wp/ws, ws², A); dtype of qkv.
    """
    batch, H, W, A, d, pad_h, pad_w, n_h, n_w = _geometry(qkv, window_size, num_heads)
    o = qkv.new_empty(layout_shape(batch, H, W, A, window_size, layout))
    block_l, block_d = _pow2_at_least_16(window_size * window_size), _pow2_at_least_16(d)
    d_chunk, num_warps = _head_dim_chunk(block_l, block_d, qkv.dtype, backward=False)
    launch(_window_forward_kernel)[(n_h * n_w, num_heads, batch)](
        qkv, qkv_bias if qkv_bias is not None else qkv, o, *qkv.stride(), *_layout_strides(o, layout, window_size),
        H, W, pad_h, pad_w, n_w, d, A, LOG2E / d ** 0.5,
        WS=window_size, BLOCK_L=block_l, BLOCK_D=block_d, MTUNET=pad_mode == "mtunet",
        MASK_KEYS=pad_mode == "mask", STORE_PADDED=layout != "grid", HAS_BIAS=qkv_bias is not None,
        PRECISION=_dot_precision(qkv.dtype, forced=fp32_precision), UPCAST=interpreted(), D_CHUNK=d_chunk,
        num_warps=num_warps)
    return o


def _fold_clamped(t: torch.Tensor, dim: int, n: int, pad: int) -> Tuple[torch.Tensor, int]:
    """Corner gradients along ``dim`` summed per source index: corner row i comes from
    max(n − pad + i, 0), so when n < pad the first pad − n + 1 rows share source 0. Returns the
    folded tensor and the first source index."""
    if n >= pad:
        return t, n - pad
    shared = pad - n + 1
    return torch.cat((t.narrow(dim, 0, shared).sum(dim, keepdim=True), t.narrow(dim, shared, pad - shared)), dim), 0


def window_backward(grad_o: torch.Tensor, qkv: torch.Tensor, qkv_bias: Optional[torch.Tensor], *,
                    window_size: int, num_heads: int, pad_mode: str, layout: str, fp32_precision: Optional[str] = None
                    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    r"""Gradients ``(dqkv, dqkv_bias)`` of :func:`window_forward`.

    ``grad_o``: ∂L/∂o in ``layout``, any strides. ``dqkv`` (B, H, W, 3A), dtype of qkv: each real
    token's own gradient plus, in "mtunet" mode, the gradient of the corner tokens copied from it.
    ``dqkv_bias`` (3A,) in the bias dtype: the zero-padded tokens' gradient (None without a bias);
    the bias's gradient through the real tokens is the projection GEMM's business.
    """
    batch, H, W, A, d, pad_h, pad_w, n_h, n_w = _geometry(qkv, window_size, num_heads)
    mtunet = pad_mode == "mtunet"
    has_corner = mtunet and pad_h > 0 and pad_w > 0
    dqkv = torch.empty((batch, H, W, 3 * A), device=qkv.device, dtype=qkv.dtype)
    corner = torch.empty((batch, pad_h, pad_w, 3 * A), device=qkv.device, dtype=torch.float32) \
        if has_corner else None
    n_windows = n_h * n_w
    bias_part = torch.empty((batch, n_windows, 3 * A), device=qkv.device, dtype=torch.float32) \
        if qkv_bias is not None else None
    block_l, block_d = _pow2_at_least_16(window_size * window_size), _pow2_at_least_16(d)
    dummy = dqkv
    d_chunk, num_warps = _head_dim_chunk(block_l, block_d, qkv.dtype, backward=True)
    launch(_window_backward_kernel)[(n_windows, num_heads, batch)](
        qkv, qkv_bias if qkv_bias is not None else qkv, grad_o, dqkv,
        corner if corner is not None else dummy, bias_part if bias_part is not None else dummy,
        *qkv.stride(), *_layout_strides(grad_o, layout, window_size), *dqkv.stride(),
        H, W, pad_h, pad_w, n_w, n_windows, d, A, LOG2E / d ** 0.5, 1.0 / d ** 0.5,
        WS=window_size, BLOCK_L=block_l, BLOCK_D=block_d, MTUNET=has_corner, MASK_KEYS=pad_mode == "mask",
        STORE_PADDED=layout != "grid", HAS_BIAS=qkv_bias is not None,
        PRECISION=_dot_precision(qkv.dtype, forced=fp32_precision), UPCAST=interpreted(), D_CHUNK=d_chunk,
        num_warps=num_warps)
    if corner is not None:
        # Sources may be real tokens of other windows: one deterministic slice add, in float32.
        corner, r0 = _fold_clamped(corner, 1, H, pad_h)
        corner, c0 = _fold_clamped(corner, 2, W, pad_w)
        block = dqkv[:, r0:r0 + corner.shape[1], c0:c0 + corner.shape[2]]
        block.copy_(block.float() + corner)
    d_bias = None
    if bias_part is not None:
        d_bias = bias_part.sum(dim=(0, 1)).to(qkv_bias.dtype)
    return dqkv, d_bias
