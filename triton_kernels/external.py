r"""Fused Triton kernels of external attention's core (MT-UNet MEAttention, EANet),
forward and backward. The N × S attention matrix is never stored, in either direction.

Per batch b and head h (q_h = the head's d columns of the query projection, N tokens, S slots)::

    a     = q_h M_kᵀ                       (N × S; + b_k, which cancels: constant over the tokens)
    p     = softmax over the TOKENS of a    p[n,s] = exp(a[n,s] − lse[s]),  lse[s] = log Σ_n exp a[n,s]
    r[n]  = Σ_s p[n,s]
    â     = p / (ε + r)                     (the slot normalisation, ε = 1e-9)
    y_h   = â M_vᵀ + b_v                   (N × d)

The column statistics lse[s] need all N tokens before any p is known, hence two passes:

* ``_column_stats_kernel``   per (chunk of tokens, b·h): column max and Σ exp over the chunk
                             (online over BLOCK_N tiles) -> per-chunk partials;
* ``_forward_kernel``        per (chunk, b·h): combines the partials of every chunk in chunk order
                             (the same order in every program: deterministic), recomputes a per
                             tile, normalises over tokens with lse and over slots in registers,
                             multiplies by M_vᵀ and stores y; chunk 0 also stores lse (B·heads × S,
                             float32), the only thing the backward keeps besides the inputs.

Backward, with dy = ∂L/∂y_h, recomputing a, p, r, â per tile from q and lse::

    dâ    = dy M_v                         dM_v += dyᵀ â           db_v = Σ dy
    dp    = (dâ − Σ_s dâ ⊙ â) / (ε + r)    (row-wise, over slots)
    c[s]  = Σ_n p[n,s] dp[n,s]              (column-wise, over tokens: a full pass)
    da    = p ⊙ (dp − c)                    dq_h = da M_k            dM_k += daᵀ q_h
    db_k  = Σ_n da = 0 exactly              (returned as zeros)

* ``_backward_columns_kernel``  per (chunk, b·h): partials of c and of dM_v;
* ``_backward_kernel``          per (chunk, b·h): c combined in chunk order, dq stored, partials of dM_k.

The memory gradients are sums over B·heads·N; each program writes its partial (S × d float32) and
``torch.sum`` reduces them in a fixed order — deterministic, no atomics. Chunks hold
``tiles_per_chunk`` tiles of BLOCK_N tokens: enough programs to fill the GPU (``default_config``),
few enough partials to keep the combines cheap.

Every tile masks tokens, slots and features (no size need be a multiple of a block; S and d are
padded to powers of two ≥ 16, ``tl.dot``'s minimum; ``MAX_SLOTS`` = ``MAX_HEAD_DIM`` = 128 keep a
program's memories in registers). Float32 backward at padded d = 128 does not hold them: its kernels
sum q M_kᵀ and dy M_v over 32-feature chunks re-read per tile and split dM_v's rows, dq's and dM_k's
columns over a third grid axis (``_head_dim_split``: register spills otherwise).

Precision: a, the statistics and every accumulator in float32; p, â, dp, da enter their dots in
float32 (``ieee`` for float32 inputs, TF32 for 16-bit ones). Under ``TRITON_INTERPRET=1`` the dots
run on float32 copies and bfloat16 stores round explicitly (``_util``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._util import (
    dot as _dot, dot_precision as _dot_precision, interpreted, mma as _mma, multiprocessor_count,
    pow2_at_least_16 as _pow2_at_least_16, to_storage,
)
from ._util import launch

__all__ = ["ExternalConfig", "default_config", "external_forward", "external_backward", "MAX_HEAD_DIM",
           "MAX_SLOTS", "SLOT_EPS"]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_HEAD_DIM = 128
MAX_SLOTS = 128
SLOT_EPS = 1e-9   # the original's guard against a slot row summing to zero


@dataclass(frozen=True)
class ExternalConfig:
    """Tokens per tile, tiles per program (chunk), warps."""

    block_n: int = 64
    tiles_per_chunk: int = 4
    num_warps: int = 4


def default_config(n_tokens: int, batch_heads: int, device: torch.device, head_dim: int = 32,
                   dtype: torch.dtype = torch.float32) -> ExternalConfig:
    """A starting heuristic (not yet timed on a GPU). Under the interpreter: one chunk of 64-token
    tiles per (b, head). On a GPU: chunks sized so that about 4 programs per SM run, 8 warps, and
    16-token tiles for float32. The warps and the float32 tile come from ptxas's register report for
    sm_90 (tests/_sm90_compile.py, MT-UNet's B=12 levels): float32's IEEE dots run on FMAs, and with
    64-token tiles the backward spilled 56 B per thread at d = 32 and 0.4–1.2 KB at d = 64; 16-token
    tiles spill nothing there. At the bottleneck's d = 128 the (d, S) memories and dM_v's accumulator
    held across the loop spilled 384 B in the backward's column kernel (24 B in the other) at every
    tile and warp count tried (8/16/32 tokens, 2–16 warps); the backward kernels now take d in
    chunks there (``_head_dim_split``) and compile with 0 B (136 and 182 registers at B=12 N=49
    C=1024, 16-token tiles, 8 warps), so every default of the compile sweep and of MT-UNet's levels
    is spill-free in float32, bfloat16 and float16 (d = 64 takes chunks too, for triton 3.6)."""
    if interpreted():
        block_n = 64
        return ExternalConfig(block_n, triton.cdiv(n_tokens, block_n), 4)
    block_n = 16 if dtype == torch.float32 else 64
    n_tiles = triton.cdiv(n_tokens, block_n)
    target_chunks = max(1, triton.cdiv(4 * multiprocessor_count(device), batch_heads))
    return ExternalConfig(block_n, max(1, triton.cdiv(n_tiles, target_chunks)), 8)


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _dot_f32(p, x, PRECISION: tl.constexpr):
    """p @ x for a float32 tile p: x is widened, p keeps its value."""
    return _mma(p, x.to(tl.float32), PRECISION)


@triton.jit
def _program(heads, tiles_per_chunk, BLOCK_N: tl.constexpr):
    """(b, h, first token of the chunk) of this program; grid = (chunks, B·heads)."""
    chunk = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)   # partial-buffer offsets scale with B·heads·chunks·S·d
    return bh // heads, bh % heads, bh, chunk * tiles_per_chunk * BLOCK_N


@triton.jit
def _load_tile(ptr, b, rows, h, d, sb, sn, sc, N, BLOCK_D: tl.constexpr):
    """(BLOCK_N, BLOCK_D) token rows of head h's d columns of a (B, N, heads·d) tensor; 0 outside."""
    feats = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < N) & (feats[None, :] < d)
    return tl.load(ptr + b.to(tl.int64) * sb + rows[:, None].to(tl.int64) * sn + (h * d + feats)[None, :] * sc,
                   mask=mask, other=0.0)


@triton.jit
def _load_columns(ptr, b, rows, h, feats, d, sb, sn, sc, N):
    """(BLOCK_N, len(feats)) token rows of head h's features ``feats`` (indices into its d columns)
    of a (B, N, heads·d) tensor; 0 outside."""
    mask = (rows[:, None] < N) & (feats[None, :] < d)
    return tl.load(ptr + b.to(tl.int64) * sb + rows[:, None].to(tl.int64) * sn + (h * d + feats)[None, :] * sc,
                   mask=mask, other=0.0)


@triton.jit
def _load_matrix(ptr, rows, cols, s_r, s_c, n_rows, n_cols):
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * s_r + cols[None, :] * s_c, mask=mask, other=0.0)


@triton.jit
def _slot_normalised(q, mk_t, lse2, rows, slots, N, S, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """p (softmax over tokens, known statistics), â = p / (ε + Σ_s p) and 1 / (ε + Σ_s p) of a tile;
    p is 0 outside the tokens and slots."""
    a2 = _dot(q, mk_t, PRECISION, UPCAST) * 1.4426950408889634
    valid = (rows[:, None] < N) & (slots[None, :] < S)
    p = tl.where(valid, tl.exp2(a2 - lse2[None, :]), 0.0)
    inv = 1.0 / (1e-9 + tl.sum(p, 1))
    return p, p * inv[:, None], inv


@triton.jit
def _combine_lse2(max_ptr, sum_ptr, bh, n_chunks, slots, S, BLOCK_S: tl.constexpr):
    """log2 Σ_n exp2(a2[n, s]) from the per-chunk (max, Σ exp2) partials, in chunk order."""
    smask = slots < S
    col_max = tl.full([BLOCK_S], float("-inf"), tl.float32)
    col_sum = tl.zeros([BLOCK_S], tl.float32)
    for j in range(n_chunks):
        base = (bh * n_chunks + j) * S
        m = tl.load(max_ptr + base + slots, mask=smask, other=0.0)
        s = tl.load(sum_ptr + base + slots, mask=smask, other=0.0)
        new_max = tl.maximum(col_max, m)
        col_sum = col_sum * tl.exp2(col_max - new_max) + s * tl.exp2(m - new_max)
        col_max = new_max
    # padded slots (s >= S) have no terms: log2 of 1, not of 0
    return col_max + tl.log2(tl.where(smask, col_sum, 1.0))


@triton.jit
def _column_stats_kernel(q_ptr, mk_ptr, max_ptr, sum_ptr, sqb, sqn, sqc, smk_s, smk_d,
                         N, d, S, heads, tiles_per_chunk,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                         PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Per chunk: column max and Σ exp2 of a2 = log2(e)·q M_kᵀ over the chunk's tokens."""
    b, h, bh, start = _program(heads, tiles_per_chunk, BLOCK_N)
    feats = tl.arange(0, BLOCK_D)
    slots = tl.arange(0, BLOCK_S)
    mk_t = _load_matrix(mk_ptr, feats, slots, smk_d, smk_s, d, S)                  # (D, S)
    col_max = tl.full([BLOCK_S], float("-inf"), tl.float32)
    col_sum = tl.zeros([BLOCK_S], tl.float32)
    for i in range(tiles_per_chunk):
        rows = start + i * BLOCK_N + tl.arange(0, BLOCK_N)
        q = _load_tile(q_ptr, b, rows, h, d, sqb, sqn, sqc, N, BLOCK_D)
        a2 = _dot(q, mk_t, PRECISION, UPCAST) * 1.4426950408889634
        a2 = tl.where(rows[:, None] < N, a2, float("-inf"))
        new_max = tl.maximum(col_max, tl.max(a2, 0))
        # A tile past N leaves new_max = col_max, finite after the chunk's first (never empty) tile.
        col_sum = col_sum * tl.exp2(col_max - new_max) + tl.sum(tl.exp2(a2 - new_max[None, :]), 0)
        col_max = new_max
    base = (bh * tl.num_programs(0) + tl.program_id(0)) * S
    tl.store(max_ptr + base + slots, col_max, mask=slots < S)
    tl.store(sum_ptr + base + slots, col_sum, mask=slots < S)


@triton.jit
def _forward_kernel(q_ptr, mk_ptr, mv_ptr, bv_ptr, max_ptr, sum_ptr, lse_ptr, y_ptr,
                    sqb, sqn, sqc, smk_s, smk_d, smv_d, smv_s, syb, syn, syc,
                    N, d, S, heads, tiles_per_chunk, n_chunks,
                    HAS_VB: tl.constexpr, STORE_LSE: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """y = (softmax_N(q M_kᵀ) / (ε + Σ_S ·)) M_vᵀ + b_v for the chunk's tokens of one (b, h)."""
    b, h, bh, start = _program(heads, tiles_per_chunk, BLOCK_N)
    feats = tl.arange(0, BLOCK_D)
    slots = tl.arange(0, BLOCK_S)
    lse2 = _combine_lse2(max_ptr, sum_ptr, bh, n_chunks, slots, S, BLOCK_S)
    if STORE_LSE:
        if tl.program_id(0) == 0:
            tl.store(lse_ptr + bh * S + slots, lse2, mask=slots < S)
    mk_t = _load_matrix(mk_ptr, feats, slots, smk_d, smk_s, d, S)                  # (D, S)
    mv_t = _load_matrix(mv_ptr, slots, feats, smv_s, smv_d, S, d)                  # (S, D)
    if HAS_VB:
        bv = tl.load(bv_ptr + feats, mask=feats < d, other=0.0).to(tl.float32)
    for i in range(tiles_per_chunk):
        rows = start + i * BLOCK_N + tl.arange(0, BLOCK_N)
        q = _load_tile(q_ptr, b, rows, h, d, sqb, sqn, sqc, N, BLOCK_D)
        _p, a_hat, _inv = _slot_normalised(q, mk_t, lse2, rows, slots, N, S, PRECISION, UPCAST)
        y = _dot_f32(a_hat, mv_t, PRECISION)
        if HAS_VB:
            y += bv[None, :]
        mask = (rows[:, None] < N) & (feats[None, :] < d)
        offs = b.to(tl.int64) * syb + rows[:, None].to(tl.int64) * syn + (h * d + feats)[None, :] * syc
        tl.store(y_ptr + offs, to_storage(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _slot_grads(q, dy, mk_t, mv, lse2, rows, slots, N, S, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """p, â and dp = ∂L/∂p (through the slot normalisation) of a tile."""
    p, a_hat, inv = _slot_normalised(q, mk_t, lse2, rows, slots, N, S, PRECISION, UPCAST)
    da_hat = _dot(dy, mv, PRECISION, UPCAST)                                        # (N, S)
    dp = (da_hat - tl.sum(da_hat * a_hat, 1)[:, None]) * inv[:, None]
    return p, a_hat, dp


@triton.jit
def _slot_grads_chunked(q_ptr, dy_ptr, mk_ptr, mv_ptr, b, h, rows, slots, lse2, d, N, S,
                        sqb, sqn, sqc, sgb, sgn, sgc, smk_s, smk_d, smv_d, smv_s,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                        D_CHUNK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """:func:`_slot_grads` with a = q M_kᵀ and dâ = dy M_v summed over head-dim chunks of D_CHUNK
    features: each chunk of q, dy and of the memories is (re)loaded from L1/L2 for the tile, so
    neither (d, S) memory nor a d-wide dot operand is held in registers (float32 at d = 128)."""
    a = tl.zeros([BLOCK_N, BLOCK_S], tl.float32)
    da_hat = tl.zeros([BLOCK_N, BLOCK_S], tl.float32)
    for k0 in range(0, BLOCK_D, D_CHUNK):
        fk = k0 + tl.arange(0, D_CHUNK)
        q = _load_columns(q_ptr, b, rows, h, fk, d, sqb, sqn, sqc, N)
        mk_t = _load_matrix(mk_ptr, fk, slots, smk_d, smk_s, d, S)                  # (D_CHUNK, S)
        a += _dot(q, mk_t, PRECISION, UPCAST)
        dy = _load_columns(dy_ptr, b, rows, h, fk, d, sgb, sgn, sgc, N)
        mv = _load_matrix(mv_ptr, fk, slots, smv_d, smv_s, d, S)                    # (D_CHUNK, S)
        da_hat += _dot(dy, mv, PRECISION, UPCAST)
    valid = (rows[:, None] < N) & (slots[None, :] < S)
    p = tl.where(valid, tl.exp2(a * 1.4426950408889634 - lse2[None, :]), 0.0)
    inv = 1.0 / (1e-9 + tl.sum(p, 1))
    a_hat = p * inv[:, None]
    dp = (da_hat - tl.sum(da_hat * a_hat, 1)[:, None]) * inv[:, None]
    return p, a_hat, dp


@triton.jit
def _tile_slot_grads(q_ptr, dy_ptr, mk_t, mv, lse2, b, rows, h, d, slots, N, S, sqb, sqn, sqc, sgb, sgn, sgc,
                     BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One token tile's q and dy rows (whole head dim) and :func:`_slot_grads` of them with the
    memories held in registers: ``(q, dy, p, â, dp)``."""
    q = _load_tile(q_ptr, b, rows, h, d, sqb, sqn, sqc, N, BLOCK_D)
    dy = _load_tile(dy_ptr, b, rows, h, d, sgb, sgn, sgc, N, BLOCK_D)
    p, a_hat, dp = _slot_grads(q, dy, mk_t, mv, lse2, rows, slots, N, S, PRECISION, UPCAST)
    return q, dy, p, a_hat, dp


@triton.jit
def _store_dq(dq_ptr, dq, b, rows, h, d, feats, sdb, sdn, sdc, N):
    """dq's (tokens × feats) tile of head h into the (B, N, heads·d) gradient, in its dtype."""
    mask = (rows[:, None] < N) & (feats[None, :] < d)
    offs = b.to(tl.int64) * sdb + rows[:, None].to(tl.int64) * sdn + (h * d + feats)[None, :] * sdc
    tl.store(dq_ptr + offs, to_storage(dq, dq_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_columns_kernel(q_ptr, dy_ptr, mk_ptr, mv_ptr, lse_ptr, c_part_ptr, dmv_part_ptr,
                             sqb, sqn, sqc, sgb, sgn, sgc, smk_s, smk_d, smv_d, smv_s,
                             N, d, S, heads, tiles_per_chunk,
                             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                             D_CHUNK: tl.constexpr, D_PARTS: tl.constexpr,
                             PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Per chunk: partial c[s] = Σ_n p dp and partial dM_v = dyᵀ â.

    ``D_CHUNK < BLOCK_D`` (float32 at d = 128, see :func:`_head_dim_split`): the products over d
    run in chunks (:func:`_slot_grads_chunked`), and program (chunk, b·h, part) accumulates dM_v's
    rows part·BLOCK_D/D_PARTS .. (part + 1)·BLOCK_D/D_PARTS only (part 0 also stores c)."""
    b, h, bh, start = _program(heads, tiles_per_chunk, BLOCK_N)
    slots = tl.arange(0, BLOCK_S)
    lse2 = tl.load(lse_ptr + bh * S + slots, mask=slots < S, other=0.0)
    part = bh * tl.num_programs(0) + tl.program_id(0)
    if D_CHUNK == BLOCK_D:
        feats = tl.arange(0, BLOCK_D)
        mk_t = _load_matrix(mk_ptr, feats, slots, smk_d, smk_s, d, S)                  # (D, S)
        mv = _load_matrix(mv_ptr, feats, slots, smv_d, smv_s, d, S)                    # (D, S)
        c_acc = tl.zeros([BLOCK_S], tl.float32)
        dmv_acc = tl.zeros([BLOCK_D, BLOCK_S], tl.float32)
        for i in range(tiles_per_chunk):
            rows = start + i * BLOCK_N + tl.arange(0, BLOCK_N)
            _q, dy, p, a_hat, dp = _tile_slot_grads(q_ptr, dy_ptr, mk_t, mv, lse2, b, rows, h, d, slots, N, S,
                                                    sqb, sqn, sqc, sgb, sgn, sgc, BLOCK_D, PRECISION, UPCAST)
            c_acc += tl.sum(p * dp, 0)
            dmv_acc += _dot_f32(tl.trans(dy.to(tl.float32)), a_hat, PRECISION)
        tl.store(c_part_ptr + part * S + slots, c_acc, mask=slots < S)
    else:
        BLOCK_DP: tl.constexpr = BLOCK_D // D_PARTS
        feats = tl.program_id(2) * BLOCK_DP + tl.arange(0, BLOCK_DP)
        c_acc = tl.zeros([BLOCK_S], tl.float32)
        dmv_acc = tl.zeros([BLOCK_DP, BLOCK_S], tl.float32)
        for i in range(tiles_per_chunk):
            rows = start + i * BLOCK_N + tl.arange(0, BLOCK_N)
            p, a_hat, dp = _slot_grads_chunked(q_ptr, dy_ptr, mk_ptr, mv_ptr, b, h, rows, slots, lse2, d, N, S,
                                               sqb, sqn, sqc, sgb, sgn, sgc, smk_s, smk_d, smv_d, smv_s,
                                               BLOCK_N, BLOCK_D, BLOCK_S, D_CHUNK, PRECISION, UPCAST)
            c_acc += tl.sum(p * dp, 0)
            dy = _load_columns(dy_ptr, b, rows, h, feats, d, sgb, sgn, sgc, N)       # (N, D/D_PARTS)
            dmv_acc += _dot_f32(tl.trans(dy.to(tl.float32)), a_hat, PRECISION)
        if tl.program_id(2) == 0:
            tl.store(c_part_ptr + part * S + slots, c_acc, mask=slots < S)
    mask = (feats[:, None] < d) & (slots[None, :] < S)
    tl.store(dmv_part_ptr + (part * d + feats[:, None]) * S + slots[None, :], dmv_acc, mask=mask)


@triton.jit
def _backward_kernel(q_ptr, dy_ptr, mk_ptr, mv_ptr, lse_ptr, c_part_ptr, dq_ptr, dmk_part_ptr,
                     sqb, sqn, sqc, sgb, sgn, sgc, smk_s, smk_d, smv_d, smv_s, sdb, sdn, sdc,
                     N, d, S, heads, tiles_per_chunk, n_chunks,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                     D_CHUNK: tl.constexpr, D_PARTS: tl.constexpr,
                     PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Per chunk: da = p (dp − c), dq = da M_k stored, partial dM_k = daᵀ q.

    ``D_CHUNK < BLOCK_D``: as in :func:`_backward_columns_kernel`; program (chunk, b·h, part)
    stores dq's and accumulates dM_k's columns of its part of the head dim only."""
    b, h, bh, start = _program(heads, tiles_per_chunk, BLOCK_N)
    slots = tl.arange(0, BLOCK_S)
    smask = slots < S
    lse2 = tl.load(lse_ptr + bh * S + slots, mask=smask, other=0.0)
    col_term = tl.zeros([BLOCK_S], tl.float32)
    for j in range(n_chunks):   # c[s], combined in chunk order
        col_term += tl.load(c_part_ptr + (bh * n_chunks + j) * S + slots, mask=smask, other=0.0)
    if D_CHUNK == BLOCK_D:
        feats = tl.arange(0, BLOCK_D)
        mk_t = _load_matrix(mk_ptr, feats, slots, smk_d, smk_s, d, S)                  # (D, S)
        mv = _load_matrix(mv_ptr, feats, slots, smv_d, smv_s, d, S)                    # (D, S)
        dmk_acc = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
        for i in range(tiles_per_chunk):
            rows = start + i * BLOCK_N + tl.arange(0, BLOCK_N)
            q, _dy, p, _a_hat, dp = _tile_slot_grads(q_ptr, dy_ptr, mk_t, mv, lse2, b, rows, h, d, slots, N, S,
                                                     sqb, sqn, sqc, sgb, sgn, sgc, BLOCK_D, PRECISION, UPCAST)
            da = p * (dp - col_term[None, :])
            dq = _dot_f32(da, tl.trans(mk_t), PRECISION)                                 # (N, D)
            _store_dq(dq_ptr, dq, b, rows, h, d, feats, sdb, sdn, sdc, N)
            dmk_acc += _dot_f32(tl.trans(da), q, PRECISION)
    else:
        BLOCK_DP: tl.constexpr = BLOCK_D // D_PARTS
        feats = tl.program_id(2) * BLOCK_DP + tl.arange(0, BLOCK_DP)
        dmk_acc = tl.zeros([BLOCK_S, BLOCK_DP], tl.float32)
        for i in range(tiles_per_chunk):
            rows = start + i * BLOCK_N + tl.arange(0, BLOCK_N)
            p, _a_hat, dp = _slot_grads_chunked(q_ptr, dy_ptr, mk_ptr, mv_ptr, b, h, rows, slots, lse2, d, N, S,
                                                sqb, sqn, sqc, sgb, sgn, sgc, smk_s, smk_d, smv_d, smv_s,
                                                BLOCK_N, BLOCK_D, BLOCK_S, D_CHUNK, PRECISION, UPCAST)
            da = p * (dp - col_term[None, :])
            mk_t = _load_matrix(mk_ptr, feats, slots, smk_d, smk_s, d, S)              # (D/D_PARTS, S)
            dq = _dot_f32(da, tl.trans(mk_t), PRECISION)                                 # (N, D/D_PARTS)
            _store_dq(dq_ptr, dq, b, rows, h, d, feats, sdb, sdn, sdc, N)
            q = _load_columns(q_ptr, b, rows, h, feats, d, sqb, sqn, sqc, N)
            dmk_acc += _dot_f32(tl.trans(da), q, PRECISION)
    part = bh * n_chunks + tl.program_id(0)
    mask = (slots[:, None] < S) & (feats[None, :] < d)
    tl.store(dmk_part_ptr + (part * S + slots[:, None]) * d + feats[None, :], dmk_acc, mask=mask)


# ---------------------------------------------------------------------------------------------
# launch functions
# ---------------------------------------------------------------------------------------------
def _head_dim_split(block_d: int, dtype: torch.dtype) -> dict:
    """Constexprs ``D_CHUNK``, ``D_PARTS`` of ``_backward_columns_kernel`` and ``_backward_kernel``:
    the head-dim chunk of their q·M_kᵀ and dy·M_v products, and how many programs (a third grid
    axis) share a tile's head dim for dM and dq.

    ``D_CHUNK = block_d, D_PARTS = 1`` keeps both (d, S) memories in registers across the token
    loop: every 16-bit width and float32 up to d = 32 compile without spills for sm_90 that way.
    float32 at d = 128 (MT-UNet's bottleneck) runs its IEEE dots on FMAs, whose operand layouts
    hold a thread's rows/columns over the whole reduction: with the memories and a 128 × 64 dM
    accumulator held across the loop the column kernel spilled 384 B per thread and the other
    24 B (255 registers) at every tile and warp count tried. There both kernels take 32-feature
    chunks re-read from L1/L2 per tile and split dM's (and dq's) head dim over 2 programs, which
    both recompute the tile's p and dp (2 × 2·N·S·d more FMAs): 0 B at 136–182 registers (16-token
    tiles, 8 warps). Chunks alone leave _backward_kernel at 24 B, and the column kernel at 254
    registers (0 B) when a chunk is one tile (tiles_per_chunk = 1 is specialised); chunks of 64
    spill 16 B. Under triton 3.6 (the GPU machine's ptxas, which settles at 128 registers where
    3.9's takes up to 255) 32-feature chunks still spilled 8 B in the column kernel at d = 128, and
    the unchunked d = 64 backward 24 B: d = 128 takes 16-feature chunks over 2 programs, d = 64
    32-feature chunks in one program (no recomputation), 0 B under both (100-182 registers at
    MT-UNet's B=12 levels)."""
    if dtype == torch.float32 and block_d >= 128:
        return dict(D_CHUNK=16, D_PARTS=2)
    if dtype == torch.float32 and block_d >= 64:
        return dict(D_CHUNK=32, D_PARTS=1)
    return dict(D_CHUNK=block_d, D_PARTS=1)


def _plan(q: torch.Tensor, key_memory: torch.Tensor, num_heads: int, config: Optional[ExternalConfig],
          fp32_precision: Optional[str]):
    batch, n_tokens, a_dim = q.shape
    d = a_dim // num_heads
    slots = key_memory.shape[0]
    if d > MAX_HEAD_DIM or slots > MAX_SLOTS or key_memory.shape[1] != d:
        raise ValueError(f"external kernels: need key_memory (S, d) with d = {d} <= {MAX_HEAD_DIM} and "
                         f"S <= {MAX_SLOTS}, got {tuple(key_memory.shape)}")
    cfg = config or default_config(n_tokens, batch * num_heads, q.device, head_dim=d, dtype=q.dtype)
    n_chunks = triton.cdiv(triton.cdiv(n_tokens, cfg.block_n), cfg.tiles_per_chunk)
    # (under the interpreter 16-bit dots run on float32 copies; float32 ones split as on the GPU)
    precision = _dot_precision(q.dtype, split_default=False, forced=fp32_precision)
    blocks = dict(BLOCK_N=cfg.block_n, BLOCK_D=_pow2_at_least_16(d), BLOCK_S=_pow2_at_least_16(slots),
                  PRECISION=precision, UPCAST=interpreted(), num_warps=cfg.num_warps)
    return batch, n_tokens, d, slots, cfg, n_chunks, blocks, _head_dim_split(blocks["BLOCK_D"], q.dtype)


def external_forward(q: torch.Tensor, key_memory: torch.Tensor, value_memory: torch.Tensor,
                     value_bias: Optional[torch.Tensor], *, num_heads: int, save_for_backward: bool = True,
                     config: Optional[ExternalConfig] = None, fp32_precision: Optional[str] = None
                     ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    r"""External attention core: per head, ``y_h = (softmax_N(q_h M_kᵀ) / (ε + Σ_S ·)) M_vᵀ + b_v``.

    Args:
        q: (B, N, heads·d) query projection, any strides (head h = columns h·d .. h·d + d).
        key_memory: (S, d) M_k; value_memory: (d, S) M_v; value_bias: (d,) b_v or None.
        num_heads: heads. save_for_backward: also return the column statistics.

    Returns:
        ``(y, lse2)``: y (B, N, heads·d) in q's dtype; lse2 (B·heads, S) float32, the base-2 column
        log-sum-exp ``log2 Σ_n exp2(log2(e)·q_h M_kᵀ)`` (None unless ``save_for_backward``).
    """
    batch, n_tokens, d, slots, cfg, n_chunks, blocks, _split = _plan(q, key_memory, num_heads, config,
                                                                       fp32_precision)
    bh = batch * num_heads
    col_max = torch.empty((bh, n_chunks, slots), device=q.device, dtype=torch.float32)
    col_sum = torch.empty_like(col_max)
    lse = torch.empty((bh, slots), device=q.device, dtype=torch.float32) if save_for_backward else None
    y = q.new_empty(q.shape)
    grid = (n_chunks, bh)
    launch(_column_stats_kernel)[grid](q, key_memory, col_max, col_sum, *q.stride(), *key_memory.stride(),
                               n_tokens, d, slots, num_heads, cfg.tiles_per_chunk, **blocks)
    launch(_forward_kernel)[grid](q, key_memory, value_memory, value_bias if value_bias is not None else q, col_max,
                          col_sum, lse if lse is not None else col_max, y,
                          *q.stride(), *key_memory.stride(), *value_memory.stride(), *y.stride(),
                          n_tokens, d, slots, num_heads, cfg.tiles_per_chunk, n_chunks,
                          HAS_VB=value_bias is not None, STORE_LSE=lse is not None, **blocks)
    return y, lse


def external_backward(grad_y: torch.Tensor, q: torch.Tensor, key_memory: torch.Tensor,
                      value_memory: torch.Tensor, lse: torch.Tensor, *, num_heads: int, value_bias_grad: bool,
                      config: Optional[ExternalConfig] = None, fp32_precision: Optional[str] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    r"""Gradients ``(dq, dM_k, dM_v, db_v)`` of :func:`external_forward` (db_v None unless asked).

    ``grad_y``: ∂L/∂y (B, N, heads·d), any strides; ``lse``: the forward's lse2. The memories'
    gradients are per-program float32 partials summed by ``torch.sum`` (deterministic).
    """
    batch, n_tokens, d, slots, cfg, n_chunks, blocks, split = _plan(q, key_memory, num_heads, config,
                                                                      fp32_precision)
    bh = batch * num_heads
    c_part = torch.empty((bh, n_chunks, slots), device=q.device, dtype=torch.float32)
    dmv_part = torch.empty((bh * n_chunks, d, slots), device=q.device, dtype=torch.float32)
    dmk_part = torch.empty((bh * n_chunks, slots, d), device=q.device, dtype=torch.float32)
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    common = (*key_memory.stride(), *value_memory.stride())
    # grid (chunks, B·heads, head-dim parts): see _head_dim_split
    grid = (n_chunks, bh, split["D_PARTS"])
    launch(_backward_columns_kernel)[grid](q, grad_y, key_memory, value_memory, lse, c_part, dmv_part,
                                   *q.stride(), *grad_y.stride(), *common,
                                   n_tokens, d, slots, num_heads, cfg.tiles_per_chunk, **blocks, **split)
    launch(_backward_kernel)[grid](q, grad_y, key_memory, value_memory, lse, c_part, dq, dmk_part,
                           *q.stride(), *grad_y.stride(), *common, *dq.stride(),
                           n_tokens, d, slots, num_heads, cfg.tiles_per_chunk, n_chunks, **blocks, **split)
    d_key_memory = dmk_part.sum(dim=0).to(key_memory.dtype)
    d_value_memory = dmv_part.sum(dim=0).to(value_memory.dtype)
    d_value_bias = None
    if value_bias_grad:
        d_value_bias = grad_y.reshape(batch * n_tokens * num_heads, d).sum(dim=0, dtype=torch.float32)
        d_value_bias = d_value_bias.to(value_memory.dtype)
    return dq, d_key_memory, d_value_memory, d_value_bias
