r"""Fused Triton kernels of Gaussian-weighted axial attention (MT-UNet GaussianTrans).

Math, for batch b and pixel (r, c) of an H×W grid, θ = ``shift`` (all statistics in float32)::

    px[j] = softmax_j(Sx[b, r, c, j] − θ (j − c)²)     j < W      (along the pixel's row)
    py[i] = softmax_i(Sy[b, c, r, i] − θ (i − r)²)     i < H      (along the pixel's column)
    out[b, r, c] = Σ_j px[j] v[b, r, j] + Σ_i py[i] v[b, i, c]

with the scores either computed here from q, k (B, H, W, D) — Sx[b,r,c,j] = q[b,r,c]·k[b,r,j],
Sy[b,c,r,i] = q[b,r,c]·k[b,i,c], no 1/√D — or given (``atten_x`` (B, H, W, W), ``atten_y``
(B, W, H, H): GaussianTrans's own interface).

Lines. Both halves are one computation on a *line* of L pixels: a row (b, r) with L = W, or a
column (b, c) with L = H — a small L×L attention with a Gaussian distance penalty between query
position m and key position n along the line. Every kernel here works on lines; the launch
functions run a *row pass* (B·H lines) and then a *column pass* (B·W lines) of the same kernel,
addressing the tensors through (batch, line, position, feature) strides, so no transposed copy
of anything is made and H ≠ W needs nothing special.

Backward of one line (P the line's probabilities, G = ∂L/∂out on the line's pixels)::

    dP[m, n] = G[m]·V[n],   Δ[m] = Σ_n P[m, n] dP[m, n],   dS = P ⊙ (dP − Δ)
    dq[m] += Σ_n dS[m, n] k[n],   dk[n] += Σ_m dS[m, n] q[m],   dv[n] += Σ_m P[m, n] G[m]
    ∂L/∂Sx (or ∂L/∂Sy) = dS,      dθ += Σ_{m,n} dS[m, n] · (−(n − m)²)

(Δ is taken as Σ P ⊙ dP rather than G·o as flash attention does, because ``out`` is the *sum* of
both axes' outputs and the per-axis output is not kept.)

The variant chosen: one program per whole line (× a range of feature columns).
    The grids of GaussianTrans are tiny — MT-UNet sees 7×7, 4×4 and 2×2 at 224² input, the bench's
    larger cases 14×14 and 28×28 — so a whole line (≤ ``MAX_LINE`` = 128 pixels, padded to a power
    of two ≥ 16 for ``tl.dot``) fits in one program: its L×L scores, probabilities and score
    gradients stay in registers, the softmax is exact (no online rescaling), and a program owns
    every output its line touches (out, dq, dk, dv of the line's pixels, the line's block of the
    score gradient). So the backward needs **no atomics** and no second kernel per axis (the
    flash-attention split into a dq kernel and a dk/dv kernel exists because a long sequence does
    not fit one program; a line does). Across the two passes the pixels' results are combined
    in a fixed order: the row pass writes its part (float32 scratch for 16-bit inputs, the output
    itself for float32), the column pass reads it, adds its own part and writes the result in the
    input dtype — deterministic, bit for bit. dθ: each line program writes its partial to a buffer
    of B·(H + W) float32 values, summed by torch (a fixed-order reduction, not atomics).

    The feature dim D (up to 1024 in MT-UNet's bottleneck) is never held whole: scores
    (q·k, and G·V in the backward) are accumulated over D in ``BLOCK_D`` chunks, and results
    (P·V, dS·K, dSᵀ·Q, Pᵀ·G) are produced chunk by chunk. To give a small grid enough programs
    (MT-UNet at B = 12 has 24 lines in the bottleneck), the D columns of the results may be split
    across programs (grid axis 1, ``d_per_program`` wide); each such program recomputes the line's
    L×L scores over the full D — 2·L²·D extra multiply-adds per split, against 2·L²·d_per_program
    of useful work per result — which pays while L² is small and the GPU would otherwise idle.

    Rejected alternatives: a program per pixel (each would reload its line's keys: H·W·(H+W)·D
    loads, and the dv/dk reductions over queries would need atomics); flash-attention-style
    query blocks with online softmax (needed only for lines longer than a program can hold,
    which GaussianTrans never has; the ``reasons`` predicate rejects L > ``MAX_LINE``).
    Lines much shorter than 16 (MT-UNet's 2×2 bottleneck) waste most of each 16×16 ``tl.dot``
    tile; a broadcast-multiply variant for tiny L is a GPU measurement away and not written.

Kernels (every load and store is masked on line position and feature column, so no size needs
to be a multiple of a block):

* ``_line_forward_kernel``   scores (from q·k or loaded), Gaussian-penalised softmax, P·V; the row
                             or column pass (``ACCUMULATE``: add the row pass's part); lse stored
* ``_line_backward_kernel``  P recomputed (from the saved lse for q, k; an exact softmax of the
                             given scores otherwise), dP, dS, dq/dk (from q, k) or ∂L/∂scores,
                             dv, and the line's dθ partial

Precision: scores, statistics and accumulators are float32. float32 inputs use IEEE dots (no
TF32, like PyTorch's float32 matmuls); for 16-bit inputs q·k and G·V are 16-bit dots with float32
accumulation (exact products) and P, dS enter their dots as float32 (TF32), which keeps the errors
within 2× of the torch backend (which rounds P to the input dtype before its matmul). The saved
statistic is the natural-log log-sum-exp of each pixel's softmax along each axis, (B, H, W) float32.

Under ``TRITON_INTERPRET=1`` (CPU tests) the dots run on float32 copies and bfloat16 stores round
explicitly (``_util``): the interpreter's bfloat16 dot and cast are wrong in triton 3.9.

Launch functions take inputs of any strides, allocate their (contiguous) results and do no
autograd (see ``medattn_fast/ops/_gaussian_axial_triton.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._util import (
    dot as _dot_in, dot_f32 as _dot_f32, dot_precision as _dot_precision, interpreted,
    load_tile as _load_tile, pow2_at_least_16 as _pow2_at_least_16, store_tile as _store_tile, to_storage,
)
from ._util import launch

__all__ = ["AxialConfig", "default_config", "MAX_LINE", "axial_forward", "axial_backward"]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_LINE = 128   # a whole line (its L×L scores and probabilities) lives in one program's registers


@dataclass(frozen=True)
class AxialConfig:
    """Feature columns per chunk (``block_d``), feature columns per program (``d_per_program``,
    None: all of D in one program), warps and pipeline stages."""

    block_d: int = 64
    d_per_program: Optional[int] = None
    num_warps: int = 4
    num_stages: int = 2


def default_config(batch: int, height: int, width: int, d: int, dtype: torch.dtype) -> AxialConfig:
    """A starting heuristic for an H100 (to be replaced by measured choices).

    Chunks of 64 feature columns, 32 for float32 (twice the registers per element, three-TF32 hi/lo
    copies) and for lines of at most 16 pixels; more warps for long lines. When the smaller pass has
    fewer than ~2 programs per SM (132 on an H100), D is split across programs so that it has about
    264, in whole chunks. From ptxas's report on sm_90 (tests/_sm90_compile.py, triton 3.9 and 3.6):
    64-wide float32 chunks on 16-pixel lines spilled 48 B in the backward (255 registers), 64-wide
    16-bit chunks of a 5×9 map from scores 8 B in the forward (72 registers); 2 warps on short lines
    spilled 272-312 B in the 16-bit backward. Not yet timed on a GPU.
    """
    block_l = _pow2_at_least_16(max(height, width))
    block_d = 32 if (dtype == torch.float32 or block_l <= 16) else 64
    block_d = min(block_d, _pow2_at_least_16(d))
    num_warps = 8 if block_l >= 64 else 4
    lines = batch * min(height, width)
    chunks = triton.cdiv(d, block_d)
    splits = max(1, min(chunks, triton.cdiv(264, max(lines, 1))))
    d_per_program = None if splits == 1 else triton.cdiv(chunks, splits) * block_d
    return AxialConfig(block_d=block_d, d_per_program=d_per_program, num_warps=num_warps, num_stages=2)


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _line_logits(q_base, k_base, s_base, sqp, sqd, skp, skd, ssq, ssk, shift, pos, L, D,
                 FROM_SCORES: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """The line's penalised logits in base 2, (S[m, n] − θ (n − m)²) · log2(e), float32 (BL, BL);
    keys beyond the line are −inf. S is loaded (``FROM_SCORES``) or q·k accumulated over D chunks."""
    if FROM_SCORES:
        s = _load_tile(s_base, pos, pos, ssq, ssk, L, L).to(tl.float32)
    else:
        s = tl.zeros([BLOCK_L, BLOCK_L], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            q = _load_tile(q_base, pos, cols, sqp, sqd, L, D)             # (L, BD)
            k_t = _load_tile(k_base, cols, pos, skd, skp, D, L)           # (BD, L)
            s += _dot_in(q, k_t, PRECISION, UPCAST)
    dist = (pos[None, :] - pos[:, None]).to(tl.float32)
    logits = (s - shift * dist * dist) * 1.4426950408889634
    return tl.where(pos[None, :] < L, logits, float("-inf"))


@triton.jit
def _line_forward_kernel(q_ptr, k_ptr, s_ptr, v_ptr, shift_ptr, acc_ptr, out_ptr, lse_ptr,
                         sqb, sql, sqp, sqd, skb, skl, skp, skd, ssb, ssl, ssq, ssk,
                         svb, svl, svp, svd, sob, sol, sop, sod, slb, sll, slp,
                         lines, L, D, d_per_program,
                         FROM_SCORES: tl.constexpr, ACCUMULATE: tl.constexpr, STORE_LSE: tl.constexpr,
                         BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
                         PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One line × one range of feature columns: out[m] (+)= Σ_n softmax_n(logits[m, n]) v[n].

    ``acc_ptr``/``out_ptr`` share the (b, line, position, feature) strides ``so*``; with
    ``ACCUMULATE`` the float32 partial at ``acc_ptr`` (the row pass's part) is added before the
    store to ``out_ptr`` (the two may be the same tensor).
    """
    pid = tl.program_id(0)
    b = (pid // lines).to(tl.int64)
    line = (pid % lines).to(tl.int64)
    pid_d = tl.program_id(1)
    pos = tl.arange(0, BLOCK_L)
    shift = tl.load(shift_ptr).to(tl.float32)
    logits = _line_logits(q_ptr + b * sqb + line * sql, k_ptr + b * skb + line * skl,
                          s_ptr + b * ssb + line * ssl, sqp, sqd, skp, skd, ssq, ssk, shift, pos, L, D,
                          FROM_SCORES, BLOCK_L, BLOCK_D, PRECISION, UPCAST)
    row_max = tl.max(logits, 1)
    p = tl.exp2(logits - row_max[:, None])
    row_sum = tl.sum(p, 1)
    p = p / row_sum[:, None]
    if STORE_LSE:
        if pid_d == 0:
            lse = (row_max + tl.log2(row_sum)) * 0.6931471805599453
            tl.store(lse_ptr + b * slb + line * sll + pos * slp, lse, mask=pos < L)
    v_base = v_ptr + b * svb + line * svl
    o_off = b * sob + line * sol
    d_begin = pid_d * d_per_program
    d_end = tl.minimum(d_begin + d_per_program, D)
    for d0 in range(d_begin, d_end, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        v = _load_tile(v_base, pos, cols, svp, svd, L, d_end)
        o = _dot_f32(p, v, PRECISION, UPCAST)
        if ACCUMULATE:
            o += _load_tile(acc_ptr + o_off, pos, cols, sop, sod, L, d_end)
        _store_tile(out_ptr + o_off, o, pos, cols, sop, sod, L, d_end)


@triton.jit
def _line_backward_kernel(q_ptr, k_ptr, s_ptr, v_ptr, g_ptr, shift_ptr, lse_ptr,
                          dq_acc_ptr, dk_acc_ptr, dv_acc_ptr, dq_ptr, dk_ptr, dv_ptr, ds_ptr, dshift_ptr,
                          sqb, sql, sqp, sqd, skb, skl, skp, skd, ssb, ssl, ssq, ssk,
                          svb, svl, svp, svd, sgb, sgl, sgp, sgd, slb, sll, slp,
                          sob, sol, sop, sod, sdb, sdl, sdq, sdk,
                          lines, L, D, d_per_program,
                          FROM_SCORES: tl.constexpr, ACCUMULATE: tl.constexpr,
                          BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
                          PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One line × one range of feature columns of the backward (see the module docstring).

    ``FROM_SCORES``: P is an exact softmax of the given scores and dS is stored to ``ds_ptr``
    (strides ``sd*``, by the first column range only); otherwise P = exp(logits − lse) from the
    saved statistics and dq, dk are produced. dq/dk/dv (and their float32 partials for
    ``ACCUMULATE``) share the strides ``so*``. ``dshift_ptr[pid]``: the line's dθ partial.
    """
    pid = tl.program_id(0)
    b = (pid // lines).to(tl.int64)
    line = (pid % lines).to(tl.int64)
    pid_d = tl.program_id(1)
    pos = tl.arange(0, BLOCK_L)
    valid = (pos[:, None] < L) & (pos[None, :] < L)
    shift = tl.load(shift_ptr).to(tl.float32)
    q_base = q_ptr + b * sqb + line * sql
    k_base = k_ptr + b * skb + line * skl
    logits = _line_logits(q_base, k_base, s_ptr + b * ssb + line * ssl, sqp, sqd, skp, skd, ssq, ssk,
                          shift, pos, L, D, FROM_SCORES, BLOCK_L, BLOCK_D, PRECISION, UPCAST)
    if FROM_SCORES:
        row_max = tl.max(logits, 1)
        p = tl.exp2(logits - row_max[:, None])
        p = tl.where(valid, p / tl.sum(p, 1)[:, None], 0.0)
    else:
        lse = tl.load(lse_ptr + b * slb + line * sll + pos * slp, mask=pos < L, other=0.0)
        p = tl.where(valid, tl.exp2(logits - lse[:, None] * 1.4426950408889634), 0.0)
    # dP = G Vᵀ over all of D (every column range needs the whole of dS).
    v_base = v_ptr + b * svb + line * svl
    g_base = g_ptr + b * sgb + line * sgl
    dp = tl.zeros([BLOCK_L, BLOCK_L], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        g = _load_tile(g_base, pos, cols, sgp, sgd, L, D)
        v_t = _load_tile(v_base, cols, pos, svd, svp, D, L)
        dp += _dot_in(g, v_t, PRECISION, UPCAST)
    delta = tl.sum(p * dp, 1)
    ds = tl.where(valid, p * (dp - delta[:, None]), 0.0)
    if pid_d == 0:
        dist = (pos[None, :] - pos[:, None]).to(tl.float32)
        tl.store(dshift_ptr + pid, -tl.sum(tl.sum(ds * dist * dist, 1), 0))
        if FROM_SCORES:
            _store_tile(ds_ptr + b * sdb + line * sdl, ds, pos, pos, sdq, sdk, L, L)
    o_off = b * sob + line * sol
    d_begin = pid_d * d_per_program
    d_end = tl.minimum(d_begin + d_per_program, D)
    p_t = tl.trans(p)
    ds_t = tl.trans(ds)
    for d0 in range(d_begin, d_end, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        g = _load_tile(g_base, pos, cols, sgp, sgd, L, d_end)
        dv = _dot_f32(p_t, g, PRECISION, UPCAST)                                # Pᵀ G
        if ACCUMULATE:
            dv += _load_tile(dv_acc_ptr + o_off, pos, cols, sop, sod, L, d_end)
        _store_tile(dv_ptr + o_off, dv, pos, cols, sop, sod, L, d_end)
        if not FROM_SCORES:
            k = _load_tile(k_base, pos, cols, skp, skd, L, d_end)
            dq = _dot_f32(ds, k, PRECISION, UPCAST)                             # dS K
            q = _load_tile(q_base, pos, cols, sqp, sqd, L, d_end)
            dk = _dot_f32(ds_t, q, PRECISION, UPCAST)                           # dSᵀ Q
            if ACCUMULATE:
                dq += _load_tile(dq_acc_ptr + o_off, pos, cols, sop, sod, L, d_end)
                dk += _load_tile(dk_acc_ptr + o_off, pos, cols, sop, sod, L, d_end)
            _store_tile(dq_ptr + o_off, dq, pos, cols, sop, sod, L, d_end)
            _store_tile(dk_ptr + o_off, dk, pos, cols, sop, sod, L, d_end)


# ---------------------------------------------------------------------------------------------
# launch functions
# ---------------------------------------------------------------------------------------------
def _line_strides(t: torch.Tensor, axis: str) -> Tuple[int, int, int, int]:
    """(batch, line, position, feature) strides of a (B, H, W, X) tensor: rows are lines (b, r)
    along W, columns are lines (b, c) along H."""
    sb, sh, sw, sx = t.stride()
    return (sb, sh, sw, sx) if axis == "rows" else (sb, sw, sh, sx)


def _pixel_stat_strides(t: torch.Tensor, axis: str) -> Tuple[int, int, int]:
    sb, sh, sw = t.stride()
    return (sb, sh, sw) if axis == "rows" else (sb, sw, sh)


def _resolve(config: Optional[AxialConfig], shape, dtype) -> Tuple[AxialConfig, int]:
    batch, height, width, d = shape
    cfg = config if config is not None else default_config(batch, height, width, d, dtype)
    d_per_program = cfg.d_per_program or triton.cdiv(max(d, 1), cfg.block_d) * cfg.block_d
    if d_per_program % cfg.block_d:
        raise ValueError(f"AxialConfig: d_per_program ({d_per_program}) must be a multiple of block_d "
                         f"({cfg.block_d})")
    return cfg, d_per_program


def _check_line(height: int, width: int) -> None:
    if max(height, width) > MAX_LINE:
        raise ValueError(f"gaussian axial (triton): a line (H or W) must be <= {MAX_LINE} pixels, "
                         f"got H={height}, W={width}")


def _shift32(shift: torch.Tensor) -> torch.Tensor:
    return shift.reshape(1).to(torch.float32)


def axial_forward(v: torch.Tensor, shift: torch.Tensor, *, q: Optional[torch.Tensor] = None,
                  k: Optional[torch.Tensor] = None, atten_x: Optional[torch.Tensor] = None,
                  atten_y: Optional[torch.Tensor] = None, config: Optional[AxialConfig] = None,
                  fp32_precision: Optional[str] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Fused forward from q, k (B, H, W, D) or from atten_x (B, H, W, W), atten_y (B, W, H, H).

    v: (B, H, W, D); shift: θ, one element (any float dtype). Any strides. Exactly one of the pairs
    (q, k) / (atten_x, atten_y) is given.

    Returns ``(out, lse_rows, lse_cols)``: out (B, H, W, D) contiguous in v's dtype; from q, k the
    natural-log log-sum-exp of each pixel's row and column softmax, (B, H, W) float32 each (the
    only state the backward needs besides the inputs); None, None from scores.
    """
    from_scores = atten_x is not None
    if from_scores == (q is not None):
        raise ValueError("axial_forward: give either q and k or atten_x and atten_y")
    batch, height, width, d = v.shape
    _check_line(height, width)
    cfg, d_per_program = _resolve(config, v.shape, v.dtype)
    out = torch.empty(batch, height, width, d, device=v.device, dtype=v.dtype)
    # The row pass writes a float32 partial that the column pass completes; float32 outputs are
    # their own partial.
    acc = out if v.dtype == torch.float32 else torch.empty_like(out, dtype=torch.float32)
    lse_rows = lse_cols = None
    if not from_scores:
        lse_rows = torch.empty(batch, height, width, device=v.device, dtype=torch.float32)
        lse_cols = torch.empty_like(lse_rows)
    theta = _shift32(shift)
    block_l = _pow2_at_least_16(max(height, width))
    n_splits = triton.cdiv(d, d_per_program) if d else 0
    for axis, n_lines, length in (("rows", height, width), ("cols", width, height)):
        first = axis == "rows"
        scores = (atten_x if first else atten_y) if from_scores else v
        lse = (lse_rows if first else lse_cols) if not from_scores else None
        grid = (batch * n_lines, max(n_splits, 1))
        launch(_line_forward_kernel)[grid](
            q if q is not None else v, k if k is not None else v, scores, v, theta,
            acc, acc if first else out, lse if lse is not None else theta,
            *_line_strides(q if q is not None else v, axis), *_line_strides(k if k is not None else v, axis),
            *scores.stride(), *_line_strides(v, axis), *_line_strides(out, axis),
            *(_pixel_stat_strides(lse, axis) if lse is not None else (0, 0, 0)),
            n_lines, length, d, d_per_program,
            FROM_SCORES=from_scores, ACCUMULATE=not first, STORE_LSE=lse is not None,
            BLOCK_L=block_l, BLOCK_D=cfg.block_d, PRECISION=_dot_precision(v.dtype, forced=fp32_precision), UPCAST=interpreted(),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse_rows, lse_cols


def axial_backward(grad_out: torch.Tensor, v: torch.Tensor, shift: torch.Tensor, *,
                   q: Optional[torch.Tensor] = None, k: Optional[torch.Tensor] = None,
                   lse_rows: Optional[torch.Tensor] = None, lse_cols: Optional[torch.Tensor] = None,
                   atten_x: Optional[torch.Tensor] = None, atten_y: Optional[torch.Tensor] = None,
                   config: Optional[AxialConfig] = None, fp32_precision: Optional[str] = None) -> Tuple[torch.Tensor, ...]:
    """Gradients of :func:`axial_forward`. grad_out, v (B, H, W, D), any strides.

    From q, k (with the forward's ``lse_rows``/``lse_cols``): returns ``(dq, dk, dv, dshift)``.
    From scores: returns ``(d_atten_x, d_atten_y, dv, dshift)``. Gradients are contiguous in the
    inputs' dtype; dshift has shift's shape and dtype and is a fixed-order sum of one float32
    partial per line (deterministic).
    """
    from_scores = atten_x is not None
    if from_scores == (q is not None):
        raise ValueError("axial_backward: give either q, k, lse_rows, lse_cols or atten_x and atten_y")
    batch, height, width, d = v.shape
    _check_line(height, width)
    cfg, d_per_program = _resolve(config, v.shape, v.dtype)

    def new_grad():
        return torch.empty(batch, height, width, d, device=v.device, dtype=v.dtype)

    dv = new_grad()
    dq = dk = None
    if not from_scores:
        dq, dk = new_grad(), new_grad()
    # float32 partials of the row pass (the gradients themselves when they are float32)
    if v.dtype == torch.float32:
        dq_acc, dk_acc, dv_acc = dq, dk, dv
    else:
        dv_acc = torch.empty_like(dv, dtype=torch.float32)
        dq_acc = torch.empty_like(dv_acc) if not from_scores else None
        dk_acc = torch.empty_like(dv_acc) if not from_scores else None
    d_atten_x = torch.empty(batch, height, width, width, device=v.device, dtype=v.dtype) if from_scores else None
    d_atten_y = torch.empty(batch, width, height, height, device=v.device, dtype=v.dtype) if from_scores else None
    shift_partials = torch.empty(batch * (height + width), device=v.device, dtype=torch.float32)
    theta = _shift32(shift)
    block_l = _pow2_at_least_16(max(height, width))
    n_splits = max(triton.cdiv(d, d_per_program), 1)
    offset = 0
    for axis, n_lines, length in (("rows", height, width), ("cols", width, height)):
        first = axis == "rows"
        scores = (atten_x if first else atten_y) if from_scores else v
        d_scores = (d_atten_x if first else d_atten_y) if from_scores else dv
        lse = (lse_rows if first else lse_cols) if not from_scores else None
        qq, kk = (q, k) if not from_scores else (v, v)
        targets = (dq_acc, dk_acc, dv_acc) if first else (dq, dk, dv)
        targets = tuple(t if t is not None else dv for t in targets)
        acc_in = tuple(t if t is not None else dv for t in (dq_acc, dk_acc, dv_acc))
        launch(_line_backward_kernel)[(batch * n_lines, n_splits)](
            qq, kk, scores, v, grad_out, theta, lse if lse is not None else theta,
            *acc_in, *targets, d_scores, shift_partials[offset:],
            *_line_strides(qq, axis), *_line_strides(kk, axis), *scores.stride(), *_line_strides(v, axis),
            *_line_strides(grad_out, axis), *(_pixel_stat_strides(lse, axis) if lse is not None else (0, 0, 0)),
            *_line_strides(dv, axis), *d_scores.stride(),
            n_lines, length, d, d_per_program,
            FROM_SCORES=from_scores, ACCUMULATE=not first,
            BLOCK_L=block_l, BLOCK_D=cfg.block_d, PRECISION=_dot_precision(v.dtype, forced=fp32_precision), UPCAST=interpreted(),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        offset += batch * n_lines
    d_shift = shift_partials.sum(dtype=torch.float64).to(shift.dtype).reshape(shift.shape)
    if from_scores:
        return d_atten_x, d_atten_y, dv, d_shift
    return dq, dk, dv, d_shift
