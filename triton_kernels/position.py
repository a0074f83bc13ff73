r"""Fused Triton kernels of position attention, forward and backward.

Math (``s`` = scale; all statistics in float32):

    P_ij = softmax_j(s · q_i·k_j) = exp(s · q_i·k_j − lse_i)       q (B, Nq, dk), k (B, Nk, dk)
    o_i  = Σ_j P_ij v_j                 transpose=False             v (B, Nk, dv) -> o (B, Nq, dv)
    o_j  = Σ_i P_ij v_i                 transpose=True (V @ A)      v (B, Nq, dv) -> o (B, Nk, dv)
    out  = γ · (o ⊙ f) + x              fused epilogue, each of γ (1 element), f, x optional

No N×N tensor exists anywhere: the forward is flash attention (online softmax over key blocks),
and the backward recomputes P from the saved row log-sum-exp. Internally the scores live in base 2
(``exp2`` is the native instruction): the kernels multiply q·k by ``s · log2(e)`` and the saved
statistic is ``lse2_i = log2 Σ_j exp2(s · log2(e) · q_i·k_j)`` (= lse_i / ln 2).

Backward, with g = ∂L/∂o = γ · (∂L/∂out ⊙ f) and D_i = Σ_j P_ij dP_ij:

    transpose=False:  dP_ij = g_i·v_j,  D_i = g_i·o_i,  dv_j = Σ_i P_ij g_i
    transpose=True:   dP_ij = v_i·g_j,  dv_i = Σ_j P_ij g_j,  D_i = v_i·dv_i
    dS_ij = P_ij (dP_ij − D_i),  dq_i = s Σ_j dS_ij k_j,  dk_j = s Σ_i dS_ij q_i
    dγ = Σ ∂L/∂out ⊙ o ⊙ f,  df = γ · ∂L/∂out ⊙ o,  dx = ∂L/∂out

Kernels (every one masks rows, keys and feature columns, so no size needs to be a multiple of a
block; dk is padded to a power of two ≥ 16, the minimum ``tl.dot`` size). Each also has an unmasked
specialisation, ``EVEN``, that the launch picks when every size it tiles is a whole number of its
blocks and dk is a power of two ≥ 16 (DANet's 64² and 128² maps with C = 512: N = 4096 / 16384,
dk = 64, dv = 512): no masks on loads, stores and scores (``PositionConfig(even=False)`` turns it off):

* ``_forward_kernel``          online-softmax row accumulation (transpose=False), epilogue, lse2
* ``_row_lse_kernel``          the row statistics alone (pass 1 of transpose=True)
* ``_column_kernel``           out_j = Σ_i P_ij R_i with known lse2: the transposed forward
                               (R = v, with epilogue) and dv of transpose=False (R = g)
* ``_row_kernel``              out_i = Σ_j P_ij R_j with known lse2, and D_i partials:
                               dv and D of transpose=True (R = g)
* ``_grad_out_kernel``         g = γ · ∂L/∂out ⊙ f, D partials (transpose=False), df, dγ partials
  (its own tile, ``block_m_grad_out`` × ``block_dv_grad_out``: an elementwise pass)
* ``_dq_kernel``, ``_dk_kernel`` dS recomputed per tile; dP contracted over dv in BLOCK_DV chunks, or
  (``HOIST``) with the operand invariant across the outer loop loaded whole once before it
  (``_dk_kernel`` with ``DQ_ATOMIC``: the ``fused`` backward variant, dS and dP = g·vᵀ once per
  tile instead of once in each kernel, dq by relaxed atomic adds: ``red.global.gpu.relaxed.add`` in
  the PTX, no value returned, no fence)

dv (up to C = 1024 for DANet) is split across programs (grid axis 2, ``block_dv`` wide) in every
kernel that produces a dv-wide result; each split recomputes the scores, which costs
2·N²·dk per split against 2·N²·block_dv for its share of the P·V product — cheap because
dk = C/8 is small. ``block_dv >= dv`` gives the single-program (loop-free) variant; 16-bit inputs
at dk <= 64 split 256 wide by default (DANet's dv = 512: QKᵀ computed 2x in the forward instead of
the 4x of a 128-wide split; 0 spills on sm_90), ``KernelConfig(position_dv_split=...)`` selects
another width. Which split is fastest on an H100 is a measurement (see ``default_config``). The
kernels that only need a dv contraction (dq, dk) loop over dv chunks instead.

Precision: scores, softmax statistics and every accumulator are float32. For 16-bit inputs P and
dS enter their dots rounded to bf16/fp16 by default (flash attention's choice: full tensor-core
rate, the V tile used as loaded), within the tests' 2x-PyTorch's-error rule; feeding them as TF32
instead (``p16=False``, ``medattn_fast.KernelConfig(position_p16=False)``, or
``fp32_probabilities=True`` in a config) rounds them ~8x less at half the rate of those dots, with
V widened to float32. float32 inputs multiply as ``_util.fp32_precision()`` says (three TF32
products by default: float32 accuracy on the tensor cores). The pre-epilogue output saved for
backward is float32. dq by atomics is the ``fused`` backward variant (``variant="fused"``,
``medattn_fast.KernelConfig(position_backward="fused")``); the hoisted dq/dk operand is
``KernelConfig(position_hoist=True)`` (16-bit). Not yet written, to be weighed on a GPU: a fused
dK/dV kernel for small dv (one pass instead of two), autotuned configs.

Under ``TRITON_INTERPRET=1`` (CPU tests) the dots run on float32 copies and bfloat16 stores round
explicitly (``_util``): the interpreter's bfloat16 dot and cast are wrong in triton 3.9.

Launch functions take any strides (channel-first conv outputs arrive as transposed views) and
allocate their results; they do no autograd (see ``medattn_fast/ops/_position_triton.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._util import (
    dot as _dot, dot_f32 as _dot_f32, dot_precision as _dot_precision, interpreted, load_tile as _load_2d,
    launch, pow2_at_least_16 as _pow2_at_least_16, store_tile as _store_2d, to_storage,
)

__all__ = ["PositionConfig", "default_config", "position_forward", "position_backward", "MAX_HEAD_DIM",
           "BACKWARD_VARIANTS"]

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256   # dk is held whole in registers (padded to a power of two)


@dataclass(frozen=True)
class PositionConfig:
    """Tile sizes of the kernels: query rows, key rows, dv columns per program; warps; stages; and
    the kernel variants a config selects."""

    block_m: int = 64
    block_n: int = 64
    block_dv: int = 64
    num_warps: int = 4
    num_stages: int = 2
    # Feed P and dS to the P·V / dS·K / dSᵀ·Q dots in float32 (TF32 for 16-bit inputs) instead of
    # rounding them to bf16/fp16: about 8x less rounding error in those products, at half the
    # tensor-core rate for those dots. :func:`default_config` sets False for 16-bit inputs (flash
    # attention's choice; within the tests' 2x-PyTorch's-error rule); float32 inputs ignore it.
    fp32_probabilities: bool = True
    # Width of the dv chunks the dq/dk kernels contract dP = a·cᵀ over (0: block_dv). Narrower
    # chunks hold fewer registers (float32's three-TF32 split keeps hi and lo copies of each).
    block_dv_chunk: int = 0
    block_m_dq: int = 0         # query rows per dq program (0: block_m)
    block_dv_row: int = 0       # dv columns per _row_kernel program (transpose=True's dV; 0: block_dv)
    block_m_dk: int = 0         # query rows per iteration of the dk kernel (0: block_m)
    block_m_column: int = 0     # query rows per iteration of _column_kernel (0: block_m)
    # key rows per iteration of _row_lse_kernel (transpose=True's row statistics; 0: block_n). Only
    # the order in which each row's exponentials are summed depends on it, never a score's value:
    # every score is the same dk-long dot in every kernel.
    block_n_lse: int = 0
    # dP chunk of the unmasked (EVEN) dq/dk kernels (0: block_dv_chunk): without the masks' registers
    # a wider chunk can fit where the masked kernel would spill
    block_dv_chunk_even: int = 0
    # _grad_out_kernel's own tile (an elementwise pass; 0: block_m / block_dv) and warps
    block_m_grad_out: int = 0
    block_dv_grad_out: int = 0
    num_warps_grad_out: int = 4
    # dq/dk: load the operand invariant across the outer loop (dq: the rows' a, dk: the keys' c, both
    # dv wide) once before it, dP one dv-long dot per tile; False: re-read in block_dv_chunk chunks
    hoist_invariant: bool = False
    # Allow the unmasked specialisation (EVEN) where every size is a whole number of blocks and dk a
    # power of two >= 16 (the launch checks); False: always masked (to test the masked path on even sizes)
    even: bool = True


def default_config(dk: int, dv: int, dtype: torch.dtype) -> PositionConfig:
    """A starting heuristic for an H100 (to be replaced by measured choices).

    16-bit inputs (dk <= 64): 128×64 score tiles, 8 warps, 2 stages, 16-bit P and dS, dv split into
    256-wide programs (DANet dv = 512: 2 splits, each recomputing only the dk-wide scores; the
    128-wide split of before computed QKᵀ 4x in the forward and 6x in the backward) except the
    transposed dV kernel (``_row_kernel``, 128 wide: at 256 it spilled 64-104 B), dq/dk contracting
    dP in 128-wide chunks. On sm_90 (triton 3.9) every one of them compiles with 0 spills at
    dk = 64, dv = 512 (forward 219-225 registers, 98,304 B shared; dV 227-229, 172,544 B; dq 200-210,
    dk 232-254, 122,880 B); at 3 stages the 256-wide split asked 254,976 B. float32 inputs halve the tiles
    (twice the registers per element) and keep 8 warps: with 4, ptxas reported up to 360 B per
    thread spilled in the float32 dq/dk/forward kernels on sm_90 (tests/_sm90_compile.py). Their
    three-TF32 dots hold hi and lo copies of each operand: with 64-row dq programs and 64-wide dP
    chunks the dq kernel then spilled up to 176 B per thread at dk = 64 (triton 3.6), so dq takes
    32 query rows per program and dq/dk contract dP in 32-wide chunks (no spills under 3.6).
    dk > 128 (padded to 256) needs smaller tiles, chosen by their sm_90 compile (triton 3.9, the table
    bench/results/sm90_compile_table.csv): float32 with the dk = 64 tiles asks 237,568 B of shared
    memory (over the H100's 232,448 B: it would not launch) and every 32- or 64-row float32 tile
    spills 300-7000 B per thread; 16×16 tiles, 8 warps, one stage fit in 64 KB at 226-254
    registers, where one more live value spills, so the kernels differ in two places: the row
    statistics (transpose=True) take 32 keys per iteration (16 spilled 112-184 B at every warp
    count, triton 3.6 and 3.9), and dq/dk contract dP in 16-wide chunks when masked, 32-wide when
    EVEN (masked dq spilled 24 B at 32, EVEN dq 8 B at 16). 16-bit inputs at dk = 256 spilled
    744-800 B in dq/dk with 64×64 tiles and spill nothing with 64×32 tiles, 8 warps, 32-wide
    chunks and 16-row dq programs (32 rows: 16 B at 128 registers under triton 3.6); at dk = 128
    8 warps, 64-wide chunks and 32-row dq programs remove the 16-80 B that 4 warps spilled.
    float32 at dk = 128 spilled 8-32 B (forward, dq, dk) with the dk = 64 tiles, and 136-152 B in
    the forward and transposed dV kernels with 64×16 tiles under triton 3.6; 32×16 score tiles
    with 16-wide dP chunks spill nothing under either. float32 at dk <= 16: the column kernel
    iterates over 32 query rows (64: 8 B at 128 registers under triton 3.6; 4 warps for every kernel
    instead spilled 8-280 B under 3.9 in the channel-first cases with epilogues).
    """
    dk_pad = _pow2_at_least_16(dk)
    dv_pad = _pow2_at_least_16(dv)
    return replace(_score_tiles(dk_pad, dv_pad, dtype), fp32_probabilities=dtype == torch.float32,
                   block_m_grad_out=GRAD_OUT_TILE[0], block_dv_grad_out=min(GRAD_OUT_TILE[1], dv_pad),
                   num_warps_grad_out=GRAD_OUT_TILE[2])


# _grad_out_kernel's own tile: rows, dv columns, warps (32 x 256 over 256 threads: 32 elements of
# each operand per thread; one dv block per program at DANet's dv = 512 halves the D partials)
GRAD_OUT_TILE = (32, 256, 8)

# The hoisting variant's caps on the dk kernel's query rows per iteration (block_m_dk), the dq
# kernel's rows per program and the stages (16-bit inputs; sm_90, triton 3.9, dk = 64, dv = 512): with the whole
# dv-wide invariant operand resident the 128-row tiles asked 368,640 B of shared memory; 64-row dk
# iterations fit the separate backward (226 registers, 221,696 B) but not the fused one (238,080 B),
# 32 rows fit both (fused dk kernel 180 registers, 164,096 B; dq 32 rows: 96-126 registers, 114,688 B).
# float32 (hi/lo copies of a 32 x 512 operand) spilled 9 KB in dq and asked 311,808 B in dk: the
# variant is 16-bit only.
HOIST_TILES = (32, 32, 2)
TF32_P_MAX_DV_BLOCK = 128   # the TF32 P·V variant's widest dv split for 16-bit inputs
HOIST_MAX_DV = 512   # padded dv past which the resident operand does not fit (1024: 278,784-295,168 B)


def _score_tiles(dk_pad: int, dv_pad: int, dtype: torch.dtype) -> PositionConfig:
    """The attention kernels' tiles of :func:`default_config` (padded dk and dv)."""
    if dtype == torch.float32:
        if dk_pad > 128:
            return PositionConfig(16, 16, min(32, dv_pad), num_warps=8, num_stages=1,
                                  block_dv_chunk=16, block_dv_chunk_even=min(32, dv_pad), block_m_dq=16,
                                  block_n_lse=32)
        if dk_pad > 64:
            return PositionConfig(32, 16, min(64, dv_pad), num_warps=8, num_stages=2,
                                  block_dv_chunk=min(16, dv_pad), block_m_dq=32)
        return PositionConfig(64, 32, min(64, dv_pad), num_warps=8, num_stages=2,
                              block_dv_chunk=min(32, dv_pad), block_m_dq=32,
                              block_m_column=32 if dk_pad <= 16 else 0)
    if dk_pad > 128:
        return PositionConfig(64, 32, min(128, dv_pad), num_warps=8, num_stages=2,
                              block_dv_chunk=min(32, dv_pad), block_m_dq=16)
    if dk_pad > 64:
        return PositionConfig(64, 64, min(128, dv_pad), num_warps=8, num_stages=3,
                              block_dv_chunk=min(64, dv_pad), block_m_dq=32)
    return PositionConfig(128, 64, min(256, dv_pad), num_warps=8, num_stages=2, block_dv_chunk=min(128, dv_pad),
                          block_dv_row=min(128, dv_pad))


def shared_memory_bound(cfg: PositionConfig, dk: int, dv: int, dtype: torch.dtype, *, transpose: bool,
                        backward: bool, variant: str = "separate", precision: str = "tf32x3") -> Dict[str, int]:
    """An upper bound on the shared memory (bytes per program) of each kernel a call launches with
    ``cfg``, from the tiles it stages for ``tl.dot``: the tiles loaded inside the loop once per
    pipeline stage, the tiles loaded before it (resident), and the largest set of operands one dot
    makes in registers (P or dS, a 16-bit tile widened to float32 for a TF32 product, the hi/lo parts
    of float32 operands under ``precision`` "tf32x3", the fused backward's dSᵀ, k and dq tile) — the
    compiler reuses those buffers from one dot to the next — plus 1 KiB of reduction scratch.
    Checked against every position row of the sm_90 compile table (tests/test_triton_sm90_compile.py:
    never below what the compiler allocates; 395 rows of triton 3.9 when written, the old and new
    defaults, fused, TF32-P and hoisting variants); the defaults stay within an H100's 232,448 B. It is
    conservative (up to ~2x for float32 and the hoisting variant), so a combination near the limit
    may be refused although it would fit: 16-bit hoisting with TF32 P at dk in (64, 128], dv = 512
    (bound 246,784 B, compiled 126,976 B). The capability check
    (``medattn_fast.ops._families.PositionSharedMemory``) refuses a call whose bound exceeds the
    device's opt-in shared memory, naming the kernel and the numbers, before any launch."""
    f32 = dtype == torch.float32
    e = 4 if f32 else 2
    parts = 2 if (f32 and precision == "tf32x3") else 1     # hi/lo copies of a float32 operand
    p_fp32 = cfg.fp32_probabilities or f32
    pe = (4 * parts) if f32 else (4 if p_fp32 else e)       # P / dS as a dot operand
    wide = 4 * parts if (p_fp32 or f32) else 0              # a tile widened (or split) for a float32 product
    dk_pad, dvf = _pow2_at_least_16(dk), _pow2_at_least_16(dv)
    stages = max(1, cfg.num_stages)
    m, n = cfg.block_m, cfg.block_n
    m_column = cfg.block_m_column or m
    chunk = max(cfg.block_dv_chunk or cfg.block_dv, cfg.block_dv_chunk_even)   # the wider of masked/EVEN
    scratch = 1024

    def scores(rows, cols):      # the score dot's operands split in registers (float32 "tf32x3" only)
        return (dk_pad * cols + rows * dk_pad) * 4 * parts if parts == 2 else 0

    def pv_kernel(rows, cols, inner):   # rows resident (× dk), dk × inner and inner × cols streamed
        piped = stages * (dk_pad * inner + inner * cols) * e
        resident = rows * dk_pad * e * (parts if f32 else 1)
        return piped + resident + max(scores(rows, inner), rows * inner * pe + inner * cols * wide) + scratch

    def d_kernel(rows, cols, fused):    # rows resident (× dk), the outer loop's cols streamed
        resident = rows * dk_pad * e * (parts if f32 else 1)
        if cfg.hoist_invariant:
            resident += rows * dvf * e
            piped, dp = stages * (dk_pad * cols + dvf * cols) * e, 0
        else:
            piped = stages * (dk_pad * cols + rows * chunk + chunk * cols) * e
            dp = (rows * chunk + chunk * cols) * 4 * parts if parts == 2 else 0
        ds = rows * cols * pe + cols * dk_pad * wide
        dq = (rows * cols * pe + rows * dk_pad * wide + cols * dk_pad * 4) if fused else 0
        return piped + resident + max(scores(rows, cols), dp, ds, dq) + scratch

    needs = {}
    if transpose:
        n_lse = cfg.block_n_lse or n
        needs["_row_lse_kernel"] = (stages * dk_pad * n_lse * e + m * dk_pad * e * (parts if f32 else 1)
                                    + scores(m, n_lse) + scratch)
        needs["_column_kernel"] = pv_kernel(n, cfg.block_dv, m_column)
    else:
        needs["_forward_kernel"] = pv_kernel(m, cfg.block_dv, n)
    if not backward:
        return needs
    needs["_grad_out_kernel"] = scratch
    if transpose:
        needs["_row_kernel"] = pv_kernel(m, cfg.block_dv_row or cfg.block_dv, n)
    else:
        needs["_column_kernel"] = pv_kernel(n, cfg.block_dv, m_column)
    if variant != "fused":
        needs["_dq_kernel"] = d_kernel(cfg.block_m_dq or m, n, False)
    needs["_dk_kernel"] = d_kernel(n, cfg.block_m_dk or m, variant == "fused")
    return needs


def _upcast_dots() -> bool:
    """Under TRITON_INTERPRET the dots run on float32 copies (the interpreter's bf16 tl.dot is wrong)."""
    return interpreted()


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _ld(base, rows, cols, stride_r, stride_c, n_rows, n_cols, EVEN: tl.constexpr):
    """A (len(rows), len(cols)) tile; ``EVEN`` (every dimension a whole number of blocks, the
    launch's check): no mask. Otherwise out-of-range entries read as 0."""
    if EVEN:
        return tl.load(base + rows[:, None] * stride_r + cols[None, :] * stride_c)
    return _load_2d(base, rows, cols, stride_r, stride_c, n_rows, n_cols)


@triton.jit
def _st(base, value, rows, cols, stride_r, stride_c, n_rows, n_cols, EVEN: tl.constexpr):
    """Store a float32 tile into base's dtype (rounded to nearest even); ``EVEN``: no mask."""
    if EVEN:
        tl.store(base + rows[:, None] * stride_r + cols[None, :] * stride_c, to_storage(value, base.dtype.element_ty))
    else:
        _store_2d(base, value, rows, cols, stride_r, stride_c, n_rows, n_cols)


@triton.jit
def _ld_row(ptr, rows, n_rows, EVEN: tl.constexpr, other: tl.constexpr = 0.0):
    """A float32 row statistic (lse2, D) for ``rows``; ``other`` past ``n_rows`` (``EVEN``: no mask).
    A query-row loop masks its P tile through lse2 = +inf there (exp2(s − inf) = 0): one value per
    row instead of a select over the whole (keys, rows) tile, which cost the 16-bit dV kernel 32 B
    of spills at its default tiles."""
    if EVEN:
        return tl.load(ptr + rows)
    return tl.load(ptr + rows, mask=rows < n_rows, other=other)


@triton.jit
def _st_row(ptr, value, rows, n_rows, EVEN: tl.constexpr):
    if EVEN:
        tl.store(ptr + rows, value)
    else:
        tl.store(ptr + rows, value, mask=rows < n_rows)


@triton.jit
def _dot_p(p, x, PRECISION: tl.constexpr, UPCAST: tl.constexpr, P_FP32: tl.constexpr):
    """p @ x for a float32 probability (or dS) tile p. ``P_FP32``: p keeps its float32 value and x
    is widened (TF32 dots for 16-bit inputs: p rounded to 11 bits); otherwise p is rounded to x's
    dtype (bf16: 8 bits, fp16: 11 bits; to nearest even, also under the interpreter) for full-rate
    16-bit dots, as flash attention does."""
    if P_FP32:
        return _dot_f32(p, x, PRECISION, UPCAST)
    return _dot(to_storage(p, x.dtype), x, PRECISION, UPCAST)


@triton.jit
def _epilogue(o, rows, cols, n_rows, n_cols, b, gamma_ptr, res_ptr, srb, srn, srd, mul_ptr, smb, smn, smd,
              HAS_GAMMA: tl.constexpr, HAS_RES: tl.constexpr, HAS_MUL: tl.constexpr, EVEN: tl.constexpr):
    """γ · (o ⊙ f) + x on a float32 tile."""
    if HAS_MUL:
        o = o * _ld(mul_ptr + b * smb, rows, cols, smn, smd, n_rows, n_cols, EVEN).to(tl.float32)
    if HAS_GAMMA:
        o = o * tl.load(gamma_ptr).to(tl.float32)
    if HAS_RES:
        o = o + _ld(res_ptr + b * srb, rows, cols, srn, srd, n_rows, n_cols, EVEN).to(tl.float32)
    return o


@triton.jit
def _forward_kernel(q_ptr, k_ptr, v_ptr, o_ptr, out_ptr, lse_ptr, gamma_ptr, res_ptr, mul_ptr,
                    sqb, sqn, sqd, skb, skn, skd, svb, svn, svd, sob, son, sod, sxb, sxn, sxd,
                    srb, srn, srd, smb, smn, smd,
                    n_q, n_k, d_k, d_v, qk_scale,
                    HAS_GAMMA: tl.constexpr, HAS_RES: tl.constexpr, HAS_MUL: tl.constexpr,
                    STORE_O: tl.constexpr, STORE_LSE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
                    BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                    P_FP32: tl.constexpr, EVEN: tl.constexpr):
    """o_i = Σ_j softmax_j(s q_i·k_j) v_j for BLOCK_M rows × BLOCK_DV columns, online softmax."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pid_v = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dks = tl.arange(0, BLOCK_DK)
    dvs = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    q = _ld(q_ptr + b * sqb, rows, dks, sqn, sqd, n_q, d_k, EVEN)
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start in range(0, n_k, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k_t = _ld(k_ptr + b * skb, dks, keys, skd, skn, d_k, n_k, EVEN)                   # (DK, N)
        s = _dot(q, k_t, PRECISION, UPCAST) * qk_scale
        if not EVEN:
            s = tl.where(keys[None, :] < n_k, s, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, 1))
        alpha = tl.exp2(row_max - new_max)    # 0 on the first block (row_max = -inf)
        p = tl.exp2(s - new_max[:, None])
        row_sum = row_sum * alpha + tl.sum(p, 1)
        v = _ld(v_ptr + b * svb, keys, dvs, svn, svd, n_k, d_v, EVEN)
        acc = acc * alpha[:, None] + _dot_p(p, v, PRECISION, UPCAST, P_FP32)
        row_max = new_max
    o = acc / row_sum[:, None]
    if STORE_O:
        _st(o_ptr + b * sob, o, rows, dvs, son, sod, n_q, d_v, EVEN)
    out = _epilogue(o, rows, dvs, n_q, d_v, b, gamma_ptr, res_ptr, srb, srn, srd, mul_ptr, smb, smn, smd,
                    HAS_GAMMA, HAS_RES, HAS_MUL, EVEN)
    _st(out_ptr + b * sxb, out, rows, dvs, sxn, sxd, n_q, d_v, EVEN)
    if STORE_LSE:
        if pid_v == 0:
            _st_row(lse_ptr + b * n_q, row_max + tl.log2(row_sum), rows, n_q, EVEN)


@triton.jit
def _row_lse_kernel(q_ptr, k_ptr, lse_ptr, sqb, sqn, sqd, skb, skn, skd, n_q, n_k, d_k, qk_scale,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr, P_FP32: tl.constexpr, EVEN: tl.constexpr):
    """lse2_i = log2 Σ_j exp2(qk_scale · q_i·k_j), online over key blocks."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dks = tl.arange(0, BLOCK_DK)
    q = _ld(q_ptr + b * sqb, rows, dks, sqn, sqd, n_q, d_k, EVEN)
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, n_k, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k_t = _ld(k_ptr + b * skb, dks, keys, skd, skn, d_k, n_k, EVEN)
        s = _dot(q, k_t, PRECISION, UPCAST) * qk_scale
        if not EVEN:
            s = tl.where(keys[None, :] < n_k, s, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, 1))
        row_sum = row_sum * tl.exp2(row_max - new_max) + tl.sum(tl.exp2(s - new_max[:, None]), 1)
        row_max = new_max
    _st_row(lse_ptr + b * n_q, row_max + tl.log2(row_sum), rows, n_q, EVEN)


@triton.jit
def _column_kernel(q_ptr, k_ptr, r_ptr, lse_ptr, o_ptr, out_ptr, gamma_ptr, res_ptr, mul_ptr,
                   sqb, sqn, sqd, skb, skn, skd, srb_, srn_, srd_, sob, son, sod, sxb, sxn, sxd,
                   srb, srn, srd, smb, smn, smd,
                   n_q, n_k, d_k, d_v, qk_scale,
                   HAS_GAMMA: tl.constexpr, HAS_RES: tl.constexpr, HAS_MUL: tl.constexpr,
                   STORE_O: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
                   BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                   P_FP32: tl.constexpr, EVEN: tl.constexpr):
    """out_j = epilogue(Σ_i P_ij r_i) for BLOCK_N key rows × BLOCK_DV columns; r has Nq rows.

    P_ij = exp2(qk_scale · q_i·k_j − lse2_i) with the row statistics already known, so the sum
    over i is a plain accumulation (P is built transposed, (keys, queries), to feed tl.dot).
    """
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pid_v = tl.program_id(2)
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dks = tl.arange(0, BLOCK_DK)
    dvs = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    k = _ld(k_ptr + b * skb, keys, dks, skn, skd, n_k, d_k, EVEN)                          # (N, DK)
    acc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for start in range(0, n_q, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q_t = _ld(q_ptr + b * sqb, dks, rows, sqd, sqn, d_k, n_q, EVEN)                    # (DK, M)
        s_t = _dot(k, q_t, PRECISION, UPCAST) * qk_scale                                 # (N, M)
        lse = _ld_row(lse_ptr + b * n_q, rows, n_q, EVEN, float("inf"))   # rows past n_q: P = 0
        p_t = tl.exp2(s_t - lse[None, :])
        r = _ld(r_ptr + b * srb_, rows, dvs, srn_, srd_, n_q, d_v, EVEN)                  # (M, DV)
        acc += _dot_p(p_t, r, PRECISION, UPCAST, P_FP32)
    if STORE_O:
        _st(o_ptr + b * sob, acc, keys, dvs, son, sod, n_k, d_v, EVEN)
    out = _epilogue(acc, keys, dvs, n_k, d_v, b, gamma_ptr, res_ptr, srb, srn, srd, mul_ptr, smb, smn, smd,
                    HAS_GAMMA, HAS_RES, HAS_MUL, EVEN)
    _st(out_ptr + b * sxb, out, keys, dvs, sxn, sxd, n_k, d_v, EVEN)


@triton.jit
def _row_kernel(q_ptr, k_ptr, r_ptr, lse_ptr, v_ptr, out_ptr, dpart_ptr,
                sqb, sqn, sqd, skb, skn, skd, srb, srn, srd, svb, svn, svd, sxb, sxn, sxd,
                n_q, n_k, d_k, d_v, qk_scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
                BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                P_FP32: tl.constexpr, EVEN: tl.constexpr):
    """dv_i = Σ_j P_ij r_j (r has Nk rows) and the partial row term Σ_{c in block} v_ic dv_ic.

    The partials, (B, n_dv_blocks, Nq) in float32, sum to D_i = v_i·dv_i of transpose=True.
    """
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pid_v = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dks = tl.arange(0, BLOCK_DK)
    dvs = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    q = _ld(q_ptr + b * sqb, rows, dks, sqn, sqd, n_q, d_k, EVEN)
    lse = _ld_row(lse_ptr + b * n_q, rows, n_q, EVEN)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start in range(0, n_k, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k_t = _ld(k_ptr + b * skb, dks, keys, skd, skn, d_k, n_k, EVEN)
        s = _dot(q, k_t, PRECISION, UPCAST) * qk_scale
        p = tl.exp2(s - lse[:, None])
        if not EVEN:
            p = tl.where(keys[None, :] < n_k, p, 0.0)
        r = _ld(r_ptr + b * srb, keys, dvs, srn, srd, n_k, d_v, EVEN)
        acc += _dot_p(p, r, PRECISION, UPCAST, P_FP32)
    _st(out_ptr + b * sxb, acc, rows, dvs, sxn, sxd, n_q, d_v, EVEN)
    v = _ld(v_ptr + b * svb, rows, dvs, svn, svd, n_q, d_v, EVEN).to(tl.float32)
    n_dv_blocks = tl.num_programs(2)
    _st_row(dpart_ptr + (b * n_dv_blocks + pid_v) * n_q, tl.sum(v * acc, 1), rows, n_q, EVEN)


@triton.jit
def _grad_out_kernel(dout_ptr, o_ptr, gamma_ptr, mul_ptr, g_ptr, df_ptr, dpart_ptr, gpart_ptr,
                     sdb, sdn, sdd, sob, son, sod, smb, smn, smd, sgb, sgn, sgd, sfb, sfn, sfd,
                     n_rows, d_v,
                     HAS_GAMMA: tl.constexpr, HAS_MUL: tl.constexpr, STORE_G: tl.constexpr,
                     ROW_TERM: tl.constexpr, STORE_DF: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, EVEN: tl.constexpr):
    """Backward of the epilogue on one tile: g = γ · dout ⊙ f, df = γ · dout ⊙ o, partial sums of
    dγ = Σ dout ⊙ o ⊙ f (B, row blocks, dv blocks) and of D_i = g_i·o_i (B, dv blocks, rows).
    Elementwise: its tile (``PositionConfig.block_m_grad_out`` × ``block_dv_grad_out``) is its own,
    not the attention kernels' (wider dv blocks: fewer D partials, longer contiguous rows)."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pid_v = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dvs = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dout = _ld(dout_ptr + b * sdb, rows, dvs, sdn, sdd, n_rows, d_v, EVEN).to(tl.float32)
    o = _ld(o_ptr + b * sob, rows, dvs, son, sod, n_rows, d_v, EVEN).to(tl.float32)
    g = dout
    if HAS_MUL:
        f = _ld(mul_ptr + b * smb, rows, dvs, smn, smd, n_rows, d_v, EVEN).to(tl.float32)
        g = g * f
    if HAS_GAMMA:
        gamma = tl.load(gamma_ptr).to(tl.float32)
        n_row_blocks = tl.num_programs(0)
        n_dv_blocks = tl.num_programs(2)
        tl.store(gpart_ptr + (b * n_row_blocks + pid_m) * n_dv_blocks + pid_v, tl.sum(tl.sum(g * o, 1), 0))
        g = g * gamma
    if STORE_G:
        _st(g_ptr + b * sgb, g, rows, dvs, sgn, sgd, n_rows, d_v, EVEN)
    if STORE_DF:
        df = dout * o
        if HAS_GAMMA:
            df = df * gamma
        _st(df_ptr + b * sfb, df, rows, dvs, sfn, sfd, n_rows, d_v, EVEN)
    if ROW_TERM:
        n_dv = tl.num_programs(2)
        _st_row(dpart_ptr + (b * n_dv + pid_v) * n_rows, tl.sum(g * o, 1), rows, n_rows, EVEN)


@triton.jit
def _dq_kernel(q_ptr, k_ptr, a_ptr, c_ptr, lse_ptr, delta_ptr, dq_ptr,
               sqb, sqn, sqd, skb, skn, skd, sab, san, sad, scb, scn, scd, sdb, sdn, sdd,
               n_q, n_k, d_k, d_v, qk_scale, scale,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
               BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
               P_FP32: tl.constexpr, EVEN: tl.constexpr, HOIST: tl.constexpr, BLOCK_DVF: tl.constexpr):
    """dq_i = s Σ_j P_ij (dP_ij − D_i) k_j with dP_ij = a_i·c_j (a: Nq rows, c: Nk rows).

    ``HOIST``: the program's rows of a, the operand invariant across the key loop, are loaded once
    (whole, BLOCK_M × BLOCK_DVF) before it and dP is one dv-long dot per tile; otherwise a is
    re-read in BLOCK_DV chunks every key block (fewer registers, more L2 traffic)."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dks = tl.arange(0, BLOCK_DK)
    q = _ld(q_ptr + b * sqb, rows, dks, sqn, sqd, n_q, d_k, EVEN)
    lse = _ld_row(lse_ptr + b * n_q, rows, n_q, EVEN)
    delta = _ld_row(delta_ptr + b * n_q, rows, n_q, EVEN)
    acc = tl.zeros([BLOCK_M, BLOCK_DK], tl.float32)
    if HOIST:
        cols_all = tl.arange(0, BLOCK_DVF)
        a_all = _load_2d(a_ptr + b * sab, rows, cols_all, san, sad, n_q, d_v)            # (M, DVF), once
    for start in range(0, n_k, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k_t = _ld(k_ptr + b * skb, dks, keys, skd, skn, d_k, n_k, EVEN)
        s = _dot(q, k_t, PRECISION, UPCAST) * qk_scale
        p = tl.exp2(s - lse[:, None])
        if not EVEN:
            p = tl.where(keys[None, :] < n_k, p, 0.0)
        if HOIST:
            c_t = _load_2d(c_ptr + b * scb, cols_all, keys, scd, scn, d_v, n_k)
            dp = _dot(a_all, c_t.to(a_all.dtype), PRECISION, UPCAST)
        else:
            dp = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for c0 in range(0, d_v, BLOCK_DV):
                cols = c0 + tl.arange(0, BLOCK_DV)
                a = _ld(a_ptr + b * sab, rows, cols, san, sad, n_q, d_v, EVEN)
                c_t = _ld(c_ptr + b * scb, cols, keys, scd, scn, d_v, n_k, EVEN)
                dp += _dot(a, c_t.to(a.dtype), PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        acc += _dot_p(ds, tl.trans(k_t), PRECISION, UPCAST, P_FP32)
    _st(dq_ptr + b * sdb, acc * scale, rows, dks, sdn, sdd, n_q, d_k, EVEN)


@triton.jit
def _dk_kernel(q_ptr, k_ptr, a_ptr, c_ptr, lse_ptr, delta_ptr, dk_ptr, dq_ptr,
               sqb, sqn, sqd, skb, skn, skd, sab, san, sad, scb, scn, scd, sdb, sdn, sdd,
               n_q, n_k, d_k, d_v, qk_scale, scale,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
               BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
               P_FP32: tl.constexpr, DQ_ATOMIC: tl.constexpr, EVEN: tl.constexpr, HOIST: tl.constexpr,
               BLOCK_DVF: tl.constexpr):
    """dk_j = s Σ_i P_ij (dP_ij − D_i) q_i with dP_ij = a_i·c_j, built transposed (keys, queries).

    ``DQ_ATOMIC`` (the ``fused`` backward): also add each tile's dq_i += s Σ_j dS_ij k_j into a
    float32 (B, Nq, dk) buffer with atomics — dS and its dv-long dP contraction computed once
    instead of again in ``_dq_kernel``, for Nk / BLOCK_N atomic adds per dq element and a summation
    order that varies from run to run (not bitwise deterministic). The adds are relaxed and their
    results unused (``red.global.add.f32`` in the PTX, no acquire/release fence per add): nothing
    reads the buffer before the kernel ends. ``HOIST``: as :func:`_dq_kernel`'s, for c's key rows."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dks = tl.arange(0, BLOCK_DK)
    k = _ld(k_ptr + b * skb, keys, dks, skn, skd, n_k, d_k, EVEN)
    acc = tl.zeros([BLOCK_N, BLOCK_DK], tl.float32)
    if HOIST:
        cols_all = tl.arange(0, BLOCK_DVF)
        c_all = _load_2d(c_ptr + b * scb, keys, cols_all, scn, scd, n_k, d_v)            # (N, DVF), once
    for start in range(0, n_q, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q_t = _ld(q_ptr + b * sqb, dks, rows, sqd, sqn, d_k, n_q, EVEN)
        s_t = _dot(k, q_t, PRECISION, UPCAST) * qk_scale
        lse = _ld_row(lse_ptr + b * n_q, rows, n_q, EVEN)
        delta = _ld_row(delta_ptr + b * n_q, rows, n_q, EVEN)
        p_t = tl.exp2(s_t - lse[None, :])
        if not EVEN:
            p_t = tl.where(rows[None, :] < n_q, p_t, 0.0)
        if HOIST:
            a_t = _load_2d(a_ptr + b * sab, cols_all, rows, sad, san, d_v, n_q)
            dp_t = _dot(c_all, a_t.to(c_all.dtype), PRECISION, UPCAST)
        else:
            dp_t = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            for c0 in range(0, d_v, BLOCK_DV):
                cols = c0 + tl.arange(0, BLOCK_DV)
                c = _ld(c_ptr + b * scb, keys, cols, scn, scd, n_k, d_v, EVEN)
                a_t = _ld(a_ptr + b * sab, cols, rows, sad, san, d_v, n_q, EVEN)
                dp_t += _dot(c, a_t.to(c.dtype), PRECISION, UPCAST)
        ds_t = p_t * (dp_t - delta[None, :])
        acc += _dot_p(ds_t, tl.trans(q_t), PRECISION, UPCAST, P_FP32)
        if DQ_ATOMIC:
            dq_tile = _dot_p(tl.trans(ds_t), k, PRECISION, UPCAST, P_FP32) * scale              # (M, DK)
            dq_at = dq_ptr + (b * n_q + rows[:, None]) * d_k + dks[None, :]
            if EVEN:
                tl.atomic_add(dq_at, dq_tile, sem="relaxed")
            else:
                tl.atomic_add(dq_at, dq_tile, mask=(rows[:, None] < n_q) & (dks[None, :] < d_k), sem="relaxed")
    _st(dk_ptr + b * sdb, acc * scale, keys, dks, sdn, sdd, n_k, d_k, EVEN)

# ---------------------------------------------------------------------------------------------
# launch functions
# ---------------------------------------------------------------------------------------------
def _strides(t: Optional[torch.Tensor]) -> Tuple[int, int, int]:
    return tuple(t.stride()) if t is not None else (0, 0, 0)


def _resolve(config: Optional[PositionConfig], dk: int, dv: int, dtype: torch.dtype, p16: Optional[bool] = None,
             dv_split: int = 0, hoist: Optional[bool] = None) -> PositionConfig:
    """``config`` if given, else :func:`default_config` with the variants asked for applied:

    * ``p16`` (16-bit inputs only; None: the default, True): P and dS enter their dots rounded to
      bf16/fp16 (flash attention's choice, full tensor-core rate); False: as TF32 (about 8x less
      rounding in those products, half the rate). float32 inputs have no 16-bit P.
    * ``dv_split`` (0: the default's): the width of the dv slice each program of the P·V kernels
      produces (a power of two >= 16); wider splits recompute QKᵀ fewer times (dv / dv_split).
    * ``hoist`` (None: the default's; 16-bit inputs only, float32 ignores it): the dq/dk kernels load
      their invariant dv-wide operand once before the outer loop instead of re-reading it in chunks
      every iteration, on the smaller tiles of :data:`HOIST_TILES` (up to a padded dv of
      :data:`HOIST_MAX_DV`; wider dv keeps the chunked kernels).
    """
    if config is not None:
        return config
    cfg = default_config(dk, dv, dtype)
    if dtype != torch.float32 and p16 is not None and p16 == cfg.fp32_probabilities:
        cfg = replace(cfg, fp32_probabilities=not p16)
        if not p16:   # TF32 P·V widens the V tile to float32: a 256-wide split asked 238,080 B (dV kernel)
            cfg = replace(cfg, block_dv=min(cfg.block_dv, TF32_P_MAX_DV_BLOCK))
    if dv_split:
        if dv_split < 16 or dv_split & (dv_split - 1):
            raise ValueError(f"position: dv_split must be 0 or a power of two >= 16, got {dv_split}")
        cfg = replace(cfg, block_dv=dv_split, block_dv_row=0)
    if hoist is not None and hoist != cfg.hoist_invariant and dtype != torch.float32 and \
            _pow2_at_least_16(dv) <= HOIST_MAX_DV:
        cfg = replace(cfg, hoist_invariant=bool(hoist))
        if hoist:   # the whole dv-wide operand stays resident: the hoisting tiles (HOIST_TILES)
            block_m_dk, block_m_dq, stages = HOIST_TILES
            cfg = replace(cfg, block_m_dk=min(cfg.block_m_dk or cfg.block_m, block_m_dk),
                          block_m_dq=min(cfg.block_m_dq or cfg.block_m, block_m_dq),
                          num_stages=min(cfg.num_stages, stages))
    return cfg


def _even(allowed: bool, *pairs: Tuple[int, int]) -> bool:
    """The unmasked specialisation (``EVEN``) applies: ``allowed`` and every (size, block) pair a
    whole number of blocks (the launches pass the padded dk as (dk, BLOCK_DK): dk itself a power of two)."""
    return allowed and all(n % block == 0 for n, block in pairs)


def _dp_chunk(cfg: PositionConfig, *pairs: Tuple[int, int], d_v: int) -> Tuple[int, bool]:
    """(dP chunk, EVEN) of a dq/dk launch tiling ``pairs``: the unmasked kernel with
    ``block_dv_chunk_even`` where every size, d_v included, is a whole number of its blocks, else the
    masked one with ``block_dv_chunk`` (either 0: ``block_dv``)."""
    chunk = cfg.block_dv_chunk or cfg.block_dv
    chunk_even = cfg.block_dv_chunk_even or chunk
    if _even(cfg.even, *pairs, (d_v, chunk_even)):
        return chunk_even, True
    return chunk, _even(cfg.even, *pairs, (d_v, chunk))


BACKWARD_VARIANTS = ("separate", "fused")


def _backward_variant(variant: str) -> str:
    if variant not in BACKWARD_VARIANTS:
        raise ValueError(f"position_backward: variant must be one of {BACKWARD_VARIANTS}, got {variant!r}")
    return variant


def _alloc_out(batch: int, n: int, dv: int, like: torch.Tensor, channels_first: bool) -> torch.Tensor:
    """A (B, n, dv) token-major view; channel-first storage (B, dv, n) when asked."""
    if channels_first:
        return like.new_empty(batch, dv, n).transpose(1, 2)
    return like.new_empty(batch, n, dv)


def position_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, transpose: bool,
                     gamma: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
                     multiply: Optional[torch.Tensor] = None, channels_first: bool = False,
                     save_for_backward: bool = True, config: Optional[PositionConfig] = None,
                     p16: Optional[bool] = None, fp32_precision: Optional[str] = None, dv_split: int = 0,
                     ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Fused forward. q (B, Nq, dk), k (B, Nk, dk), v (B, Nk, dv) [transpose: (B, Nq, dv)], any strides.
    ``p16``, ``dv_split``: the variants of :func:`_resolve` (16-bit P·V, the dv split's width);
    ``fp32_precision``: of float32 dots (``_util.fp32_precision``; None: PyTorch's TF32 setting decides).

    Returns ``(out, o, lse2)``: ``out`` = γ·(o ⊙ f) + x as a token-major (B, n_out, dv) tensor (a view
    of channel-first storage when ``channels_first``); ``o`` the attention output before the
    epilogue (contiguous float32, only when ``save_for_backward`` and an epilogue is present — otherwise
    None, and ``out`` is o); ``lse2`` (B, Nq) float32 base-2 row log-sum-exp (None when not saved
    and not needed). ``residual``/``multiply`` are token-major (B, n_out, dv) tensors (any strides).
    """
    batch, n_q, d_k = q.shape
    n_k = k.shape[1]
    d_v = v.shape[2]
    if d_k > MAX_HEAD_DIM:
        raise ValueError(f"position_forward: dk (q.shape[2]) must be <= {MAX_HEAD_DIM}, got {d_k}")
    n_out = n_k if transpose else n_q
    cfg = _resolve(config, d_k, d_v, q.dtype, p16, dv_split)
    block_dk = _pow2_at_least_16(d_k)
    has_epilogue = gamma is not None or residual is not None or multiply is not None
    store_o = save_for_backward and has_epilogue
    out = _alloc_out(batch, n_out, d_v, q, channels_first)
    # o is kept in float32: dγ = Σ ∂L/∂out ⊙ o ⊙ f and D_i = g_i·o_i are long sums, and a 16-bit o
    # would put its rounding noise (√terms half-ulps) into them.
    o = q.new_empty(batch, n_out, d_v, dtype=torch.float32) if store_o else None
    lse = None
    if transpose or save_for_backward:
        lse = torch.empty(batch, n_q, device=q.device, dtype=torch.float32)
    qk_scale = float(scale) * LOG2E
    precision = _dot_precision(q.dtype, forced=fp32_precision)
    dummy = q
    common = dict(HAS_GAMMA=gamma is not None, HAS_RES=residual is not None, HAS_MUL=multiply is not None,
                  STORE_O=store_o, BLOCK_DK=block_dk, BLOCK_DV=cfg.block_dv, PRECISION=precision,
                  UPCAST=_upcast_dots(), P_FP32=cfg.fp32_probabilities,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    epilogue_args = (*_strides(residual), *_strides(multiply))
    n_dv_blocks = triton.cdiv(d_v, cfg.block_dv)
    even = _even(cfg.even, (n_q, cfg.block_m), (n_k, cfg.block_n), (d_k, block_dk), (d_v, cfg.block_dv))
    if not transpose:
        grid = (triton.cdiv(n_q, cfg.block_m), batch, n_dv_blocks)
        launch(_forward_kernel)[grid](
            q, k, v, o if o is not None else dummy, out, lse if lse is not None else dummy,
            gamma if gamma is not None else dummy, residual if residual is not None else dummy,
            multiply if multiply is not None else dummy,
            *q.stride(), *k.stride(), *v.stride(), *_strides(o), *out.stride(), *epilogue_args,
            n_q, n_k, d_k, d_v, qk_scale, STORE_LSE=lse is not None,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, EVEN=even, **common)
    else:
        block_n_lse = cfg.block_n_lse or cfg.block_n
        launch(_row_lse_kernel)[(triton.cdiv(n_q, cfg.block_m), batch)](
            q, k, lse, *q.stride(), *k.stride(), n_q, n_k, d_k, qk_scale,
            BLOCK_M=cfg.block_m, BLOCK_N=block_n_lse, BLOCK_DK=block_dk, PRECISION=precision,
            UPCAST=_upcast_dots(), P_FP32=cfg.fp32_probabilities,
            EVEN=_even(cfg.even, (n_q, cfg.block_m), (n_k, block_n_lse), (d_k, block_dk)),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        grid = (triton.cdiv(n_k, cfg.block_n), batch, n_dv_blocks)
        block_m_column = cfg.block_m_column or cfg.block_m
        launch(_column_kernel)[grid](
            q, k, v, lse, o if o is not None else dummy, out,
            gamma if gamma is not None else dummy, residual if residual is not None else dummy,
            multiply if multiply is not None else dummy,
            *q.stride(), *k.stride(), *v.stride(), *_strides(o), *out.stride(), *epilogue_args,
            n_q, n_k, d_k, d_v, qk_scale,
            BLOCK_M=block_m_column, BLOCK_N=cfg.block_n,
            EVEN=_even(cfg.even, (n_q, block_m_column), (n_k, cfg.block_n), (d_k, block_dk), (d_v, cfg.block_dv)),
            **common)
        if not save_for_backward:
            lse = None
    return out, o, lse


def position_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      o: torch.Tensor, lse: torch.Tensor, *, scale: float, transpose: bool,
                      gamma: Optional[torch.Tensor] = None, multiply: Optional[torch.Tensor] = None,
                      need_multiply_grad: bool = True, config: Optional[PositionConfig] = None,
                      variant: str = "separate", p16: Optional[bool] = None, fp32_precision: Optional[str] = None,
                      dv_split: int = 0, hoist: Optional[bool] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor],
                                 Optional[torch.Tensor]]:
    """Gradients ``(dq, dk, dv, dγ, df)`` of the fused forward (dγ, df None when absent).

    ``grad_out``: ∂L/∂out, token-major (B, n_out, dv), any strides. ``o``: the attention output
    before the epilogue (``out`` itself when there is no γ/f/x). ``lse``: the forward's lse2.
    The residual's gradient is ``grad_out`` itself and is not computed here.
    dq, dk, dv have the strides of q, k, v when those are dense (``torch.empty_like``).
    ``variant``: "separate" (the default) recomputes dS in a dq kernel and a dk kernel
    (deterministic); "fused" computes it once and adds dq with atomics (``_dk_kernel`` with
    ``DQ_ATOMIC``) — the faster candidate on a GPU, timed side by side by bench/gpu_check.sh.
    ``p16``, ``fp32_precision``, ``dv_split``: as :func:`position_forward`'s (the forward's own, for
    the same P); ``hoist``: the dq/dk kernels' invariant operand loaded once (:func:`_resolve`).
    """
    batch, n_q, d_k = q.shape
    n_k = k.shape[1]
    d_v = v.shape[2]
    n_out = n_k if transpose else n_q
    cfg = _resolve(config, d_k, d_v, q.dtype, p16, dv_split, hoist)
    block_dk = _pow2_at_least_16(d_k)
    precision = _dot_precision(q.dtype, forced=fp32_precision)
    qk_scale = float(scale) * LOG2E
    n_dv_blocks = triton.cdiv(d_v, cfg.block_dv)
    schedule = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    dummy = q

    # 1. the epilogue's backward: g = γ · dout ⊙ f, df, dγ partials, and (transpose=False) D_i.
    has_gamma, has_mul = gamma is not None, multiply is not None
    store_g = has_gamma or has_mul
    g = q.new_empty(batch, n_out, d_v) if store_g else grad_out
    d_mul = torch.empty_like(multiply) if (has_mul and need_multiply_grad) else None
    # its own tile (an elementwise pass: not the attention kernels' score tiles)
    block_m_go = cfg.block_m_grad_out or cfg.block_m
    block_dv_go = cfg.block_dv_grad_out or cfg.block_dv
    row_blocks, go_dv_blocks = triton.cdiv(n_out, block_m_go), triton.cdiv(d_v, block_dv_go)
    # D partials: one per dv block of the kernel that makes them (_grad_out_kernel, or _row_kernel)
    row_term = not transpose
    block_dv_row = cfg.block_dv_row or cfg.block_dv
    block_m_column = cfg.block_m_column or cfg.block_m
    row_dv_blocks = triton.cdiv(d_v, block_dv_row)
    delta_parts = torch.empty(batch, go_dv_blocks if row_term else row_dv_blocks, n_q, device=q.device,
                              dtype=torch.float32)
    gamma_parts = torch.empty(batch, row_blocks, go_dv_blocks, device=q.device, dtype=torch.float32) \
        if has_gamma else None
    if store_g or d_mul is not None or has_gamma or row_term:
        launch(_grad_out_kernel)[(row_blocks, batch, go_dv_blocks)](
            grad_out, o, gamma if has_gamma else dummy, multiply if has_mul else dummy,
            g, d_mul if d_mul is not None else dummy, delta_parts,
            gamma_parts if gamma_parts is not None else dummy,
            *grad_out.stride(), *o.stride(), *_strides(multiply), *g.stride(), *_strides(d_mul),
            n_out, d_v, HAS_GAMMA=has_gamma, HAS_MUL=has_mul, STORE_G=store_g, ROW_TERM=row_term,
            STORE_DF=d_mul is not None, BLOCK_M=block_m_go, BLOCK_DV=block_dv_go,
            EVEN=_even(cfg.even, (n_out, block_m_go), (d_v, block_dv_go)), num_warps=cfg.num_warps_grad_out,
            num_stages=1)
    d_gamma = gamma_parts.sum().reshape(gamma.shape).to(gamma.dtype) if has_gamma else None

    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    blocks = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_DK=block_dk, BLOCK_DV=cfg.block_dv,
                  PRECISION=precision, UPCAST=_upcast_dots(), P_FP32=cfg.fp32_probabilities, **schedule)
    # 2. the value gradient (and, transpose=True, the row term D_i = v_i·dv_i).
    if transpose:
        launch(_row_kernel)[(triton.cdiv(n_q, cfg.block_m), batch, row_dv_blocks)](
            q, k, g, lse, v, dv, delta_parts, *q.stride(), *k.stride(), *g.stride(), *v.stride(),
            *dv.stride(), n_q, n_k, d_k, d_v, qk_scale,
            EVEN=_even(cfg.even, (n_q, cfg.block_m), (n_k, cfg.block_n), (d_k, block_dk), (d_v, block_dv_row)),
            **dict(blocks, BLOCK_DV=block_dv_row))
        row_operand, col_operand = v, g       # dP_ij = v_i·g_j
    else:
        launch(_column_kernel)[(triton.cdiv(n_k, cfg.block_n), batch, n_dv_blocks)](
            q, k, g, lse, dummy, dv, dummy, dummy, dummy,
            *q.stride(), *k.stride(), *g.stride(), 0, 0, 0, *dv.stride(), 0, 0, 0, 0, 0, 0,
            n_q, n_k, d_k, d_v, qk_scale, HAS_GAMMA=False, HAS_RES=False, HAS_MUL=False, STORE_O=False,
            EVEN=_even(cfg.even, (n_q, block_m_column), (n_k, cfg.block_n), (d_k, block_dk), (d_v, cfg.block_dv)),
            **dict(blocks, BLOCK_M=block_m_column))
        row_operand, col_operand = g, v       # dP_ij = g_i·v_j
    delta = delta_parts.sum(dim=1) if delta_parts.shape[1] > 1 else delta_parts[:, 0]
    delta = delta.contiguous()

    # 3. query and key gradients, dS recomputed tile by tile.
    operands = (*row_operand.stride(), *col_operand.stride())
    blocks = dict(blocks, HOIST=cfg.hoist_invariant, BLOCK_DVF=_pow2_at_least_16(d_v))
    block_m_dq = cfg.block_m_dq or cfg.block_m
    block_m_dk = cfg.block_m_dk or cfg.block_m
    chunk_dq, even_dq = _dp_chunk(cfg, (n_q, block_m_dq), (n_k, cfg.block_n), (d_k, block_dk), d_v=d_v)
    chunk_dk, even_dk = _dp_chunk(cfg, (n_q, block_m_dk), (n_k, cfg.block_n), (d_k, block_dk), d_v=d_v)
    if _backward_variant(variant) == "fused":
        dq_sum = torch.zeros(batch, n_q, d_k, device=q.device, dtype=torch.float32)
        launch(_dk_kernel)[(triton.cdiv(n_k, cfg.block_n), batch)](
            q, k, row_operand, col_operand, lse, delta, dk, dq_sum, *q.stride(), *k.stride(), *operands,
            *dk.stride(), n_q, n_k, d_k, d_v, qk_scale, float(scale), DQ_ATOMIC=True, EVEN=even_dk,
            **dict(blocks, BLOCK_M=block_m_dk, BLOCK_DV=chunk_dk))
        dq.copy_(dq_sum)
        return dq, dk, dv, d_gamma, d_mul
    launch(_dq_kernel)[(triton.cdiv(n_q, block_m_dq), batch)](
        q, k, row_operand, col_operand, lse, delta, dq, *q.stride(), *k.stride(), *operands, *dq.stride(),
        n_q, n_k, d_k, d_v, qk_scale, float(scale),
        EVEN=even_dq, **dict(blocks, BLOCK_M=block_m_dq, BLOCK_DV=chunk_dq))
    launch(_dk_kernel)[(triton.cdiv(n_k, cfg.block_n), batch)](
        q, k, row_operand, col_operand, lse, delta, dk, dummy, *q.stride(), *k.stride(), *operands, *dk.stride(),
        n_q, n_k, d_k, d_v, qk_scale, float(scale), DQ_ATOMIC=False, EVEN=even_dk,
        **dict(blocks, BLOCK_M=block_m_dk, BLOCK_DV=chunk_dk))
    return dq, dk, dv, d_gamma, d_mul
