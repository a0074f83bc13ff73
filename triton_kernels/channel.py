r"""Fused Triton kernels of channel attention, forward and backward.

Math, per batch element, X (C, N) (any strides; N = prod of the spatial dims):

    E = X Xᵀ                          (C, C), contraction over N, accumulated in float32
    A = softmax(−E)  (negate=True, DANet: = softmax(rowmax(E) − E))  or  softmax(E)
    o = A X,   out = γ · (o ⊙ f) + x  (epilogue, each part optional)

Backward, with g = ∂L/∂o = γ · ∂L/∂out ⊙ f:

    dA = g Xᵀ,   dE = ± A ⊙ (dA − rowsum(dA ⊙ A)),   dX = Aᵀ g + (dE + dEᵀ) X

The C×C matrices (E, A, dA, dE) are small and are materialised in float32; nothing N×N exists.

Kernels:

* ``_gram_kernel``     P = U Vᵀ over an N range: E (U = V = X) and dA (U = g, V = X). When B·(C/tile)²
                       programs cannot fill the GPU (small B·C, large N) the N reduction is split
                       across programs into float32 partials summed afterwards (two-stage, so the
                       result is deterministic, unlike atomics).
* ``_softmax_kernel``  row softmax of ±E, two passes over column blocks (any C).
* ``_mix_kernel``      out = W₁ R₁ (+ W₂ R₂) with the fused epilogue: o = A X in the forward,
                       dX = Aᵀ g + (dE + dEᵀ) X in the backward (Aᵀ read through strides, dE + dEᵀ
                       formed while loading W₂: ``SYMMETRIC``).
* ``_epilogue_grad_kernel``  the epilogue's backward in one pass over (C, N): g = γ · ∂L/∂out ⊙ f,
                       df = γ · ∂L/∂out ⊙ o, and per-program partial sums of dγ = Σ ∂L/∂out ⊙ f ⊙ o
                       (summed afterwards: deterministic). Without γ and f there is nothing to do:
                       g is ∂L/∂out itself, read by the gram and mix kernels in its own dtype.
* ``_softmax_backward_kernel``  dE = ±A ⊙ (dA − rowsum(dA ⊙ A)) one row per program.

The backward is five launches (epilogue, gram, softmax backward, mix; the dγ partials' sum; float32
adds dE + dEᵀ as one (B, C, C) op, see ``channel_backward``) and writes g (float32, (B, C, N)) only
when there is an epilogue.

16-bit inputs: X Xᵀ multiplies in the input dtype (exact products) and accumulates in float32;
the mixes read A in float32 and run TF32 dots (X is exact in TF32). float32 inputs use IEEE dots.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._util import (
    dot_precision as _precision, interpreted, mma as _mma, load_tile as _load_2d, multiprocessor_count, to_storage,
)
from ._util import launch

__all__ = ["ChannelConfig", "default_config", "channel_forward", "channel_backward", "epilogue_backward", "gram",
           "row_softmax", "softmax_backward", "SOFTMAX_BLOCK_MAX"]


@dataclass(frozen=True)
class ChannelConfig:
    """Tiles: ``block_c`` channel rows (and columns of the gram), ``block_n`` positions,
    ``block_k`` contraction width of the mixes; ``splits`` of the N reduction (None: heuristic)."""

    block_c: int = 64
    block_n: int = 64
    block_k: int = 32
    splits: Optional[int] = None
    num_warps: int = 4
    num_stages: int = 2


def default_config(channels: int, n: int, dtype: torch.dtype) -> ChannelConfig:
    """A starting heuristic for an H100 (64×64 gram tiles, 128-wide position tiles for 16-bit)."""
    block_c = 64 if channels >= 64 else max(16, triton.next_power_of_2(channels))
    block_n = 64 if dtype == torch.float32 else 128
    return ChannelConfig(block_c=block_c, block_n=block_n, block_k=32, splits=None,
                         num_warps=4 if dtype == torch.float32 else 8, num_stages=3)


def _splits(cfg: ChannelConfig, batch: int, channels: int, n: int, device: torch.device) -> int:
    """How many programs share one gram tile's N reduction (each gets whole BLOCK_N chunks)."""
    if cfg.splits is not None:
        return max(1, min(cfg.splits, triton.cdiv(n, cfg.block_n)))
    tiles = batch * triton.cdiv(channels, cfg.block_c) ** 2
    wanted = triton.cdiv(4 * multiprocessor_count(device), tiles)           # about four waves of programs
    most = max(1, triton.cdiv(n, 4 * cfg.block_n))              # at least four chunks per split
    return max(1, min(wanted, most))


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _gram_kernel(u_ptr, v_ptr, p_ptr, sub, suc, sun, svb, svc, svn,
                 n_ch, n_pos, chunks_per_split,
                 NATIVE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
                 PRECISION: tl.constexpr):
    """parts[b, split, i, j] = Σ_{n in split} u[b, i, n] v[b, j, n] for one BLOCK_C² tile."""
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_bs = tl.program_id(2)
    ci = pid_i * BLOCK_C + tl.arange(0, BLOCK_C)
    cj = pid_j * BLOCK_C + tl.arange(0, BLOCK_C)
    splits = tl.cdiv(n_pos, BLOCK_N * chunks_per_split)
    b = (pid_bs // splits).to(tl.int64)
    split = pid_bs % splits
    acc = tl.zeros([BLOCK_C, BLOCK_C], tl.float32)
    first = split * chunks_per_split * BLOCK_N
    for start in range(first, first + chunks_per_split * BLOCK_N, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        u = _load_2d(u_ptr + b * sub, ci, pos, suc, sun, n_ch, n_pos)
        v_t = _load_2d(v_ptr + b * svb, pos, cj, svn, svc, n_pos, n_ch)
        if NATIVE:
            acc += _mma(u, v_t, PRECISION)
        else:
            acc += _mma(u.to(tl.float32), v_t.to(tl.float32), PRECISION)
    out = p_ptr + (b * splits + split) * n_ch * n_ch
    mask = (ci[:, None] < n_ch) & (cj[None, :] < n_ch)
    tl.store(out + ci[:, None] * n_ch + cj[None, :], acc, mask=mask)


@triton.jit
def _softmax_kernel(e_ptr, a_ptr, n_ch, NEGATE: tl.constexpr, BLOCK: tl.constexpr):
    """a[row] = softmax(±e[row]) over a contiguous float32 row of n_ch entries (one row per program)."""
    row = tl.program_id(0).to(tl.int64)
    base = e_ptr + row * n_ch
    sign = -1.0 if NEGATE else 1.0
    row_max = tl.full([BLOCK], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n_ch, BLOCK):   # online max/sum, lane-wise, merged at the end
        cols = start + tl.arange(0, BLOCK)
        e = tl.where(cols < n_ch, tl.load(base + cols, mask=cols < n_ch, other=0.0) * sign, float("-inf"))
        new_max = tl.maximum(row_max, e)
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)
        row_sum = row_sum * tl.exp(row_max - safe) + tl.exp(e - safe)
        row_max = new_max
    top = tl.max(row_max, 0)
    total = tl.sum(row_sum * tl.exp(row_max - top), 0)
    for start in range(0, n_ch, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        e = tl.load(base + cols, mask=cols < n_ch, other=0.0) * sign
        tl.store(a_ptr + row * n_ch + cols, tl.exp(e - top) / total, mask=cols < n_ch)


@triton.jit
def _mix_kernel(w1_ptr, r1_ptr, w2_ptr, r2_ptr, o_ptr, out_ptr, gamma_ptr, res_ptr, mul_ptr,
                sw1b, sw1i, sw1c, sr1b, sr1c, sr1n, sw2b, sw2i, sw2c, sr2b, sr2c, sr2n,
                sob, soc, son, sxb, sxc, sxn, srb, src, srn, smb, smc, smn,
                n_ch, n_pos,
                HAS_SECOND: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_RES: tl.constexpr,
                HAS_MUL: tl.constexpr, STORE_O: tl.constexpr, SYMMETRIC: tl.constexpr,
                BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                PRECISION: tl.constexpr):
    """o = W₁ R₁ (+ W₂ R₂) for BLOCK_C rows × BLOCK_N positions; out = γ · (o ⊙ f) + x.

    W (B, C, C) float32 (any strides), R (B, C, N) any dtype (read as float32). ``SYMMETRIC``: W₂ is
    read as W₂ + W₂ᵀ (the backward's dE + dEᵀ, never stored).
    """
    pid_c = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    pos = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_C, BLOCK_N], tl.float32)
    for start in range(0, n_ch, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        w = _load_2d(w1_ptr + b * sw1b, rows, ks, sw1i, sw1c, n_ch, n_ch).to(tl.float32)
        r = _load_2d(r1_ptr + b * sr1b, ks, pos, sr1c, sr1n, n_ch, n_pos).to(tl.float32)
        acc += _mma(w, r, PRECISION)
        if HAS_SECOND:
            w = _load_2d(w2_ptr + b * sw2b, rows, ks, sw2i, sw2c, n_ch, n_ch).to(tl.float32)
            if SYMMETRIC:
                w += _load_2d(w2_ptr + b * sw2b, rows, ks, sw2c, sw2i, n_ch, n_ch).to(tl.float32)
            r = _load_2d(r2_ptr + b * sr2b, ks, pos, sr2c, sr2n, n_ch, n_pos).to(tl.float32)
            acc += _mma(w, r, PRECISION)
    mask = (rows[:, None] < n_ch) & (pos[None, :] < n_pos)
    if STORE_O:
        tl.store(o_ptr + b * sob + rows[:, None] * soc + pos[None, :] * son,
                 to_storage(acc, o_ptr.dtype.element_ty), mask=mask)
    if HAS_MUL:
        acc = acc * _load_2d(mul_ptr + b * smb, rows, pos, smc, smn, n_ch, n_pos).to(tl.float32)
    if HAS_GAMMA:
        acc = acc * tl.load(gamma_ptr).to(tl.float32)
    if HAS_RES:
        acc = acc + _load_2d(res_ptr + b * srb, rows, pos, src, srn, n_ch, n_pos).to(tl.float32)
    tl.store(out_ptr + b * sxb + rows[:, None] * sxc + pos[None, :] * sxn,
             to_storage(acc, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _epilogue_grad_kernel(grad_ptr, o_ptr, mul_ptr, gamma_ptr, g_ptr, dmul_ptr, dgamma_ptr,
                          sgb, sgc, sgn, sob, soc, son, smb, smc, smn,
                          n_ch, n_pos,
                          HAS_MUL: tl.constexpr, NEED_DMUL: tl.constexpr, HAS_GAMMA: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """The epilogue ``out = γ · (o ⊙ f) + x`` differentiated over one BLOCK_C × BLOCK_N tile:
    g = γ ∂L/∂out ⊙ f (float32, contiguous (B, C, N)), df = γ ∂L/∂out ⊙ o (f's dtype, contiguous),
    and this program's partial dγ = Σ ∂L/∂out ⊙ f ⊙ o (float32, one per program)."""
    pid_c = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    pos = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_ch) & (pos[None, :] < n_pos)
    grad = _load_2d(grad_ptr + b * sgb, rows, pos, sgc, sgn, n_ch, n_pos).to(tl.float32)
    gamma = 1.0
    if HAS_GAMMA:
        gamma = tl.load(gamma_ptr).to(tl.float32)
    dense = b * n_ch * n_pos + rows[:, None] * n_pos + pos[None, :]
    if HAS_GAMMA or NEED_DMUL:
        o = _load_2d(o_ptr + b * sob, rows, pos, soc, son, n_ch, n_pos).to(tl.float32)
        if NEED_DMUL:
            tl.store(dmul_ptr + dense, to_storage(grad * o * gamma, dmul_ptr.dtype.element_ty), mask=mask)
    if HAS_MUL:
        grad = grad * _load_2d(mul_ptr + b * smb, rows, pos, smc, smn, n_ch, n_pos).to(tl.float32)
    if HAS_GAMMA:
        program = (b * tl.num_programs(0) + pid_c) * tl.num_programs(1) + pid_n
        tl.store(dgamma_ptr + program, tl.sum(tl.sum(grad * o, 1), 0))
    tl.store(g_ptr + dense, grad * gamma, mask=mask)


@triton.jit
def _softmax_backward_kernel(a_ptr, da_ptr, de_ptr, n_ch, NEGATE: tl.constexpr, BLOCK: tl.constexpr):
    """de[row] = ±a[row] ⊙ (da[row] − Σ da[row] ⊙ a[row]) over contiguous float32 rows of n_ch
    entries (A = softmax(±E), dA = ∂L/∂A), one row per program."""
    row = tl.program_id(0).to(tl.int64)
    base = row * n_ch
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n_ch, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        a = tl.load(a_ptr + base + cols, mask=cols < n_ch, other=0.0)
        da = tl.load(da_ptr + base + cols, mask=cols < n_ch, other=0.0)
        acc += a * da
    total = tl.sum(acc, 0)
    negation = -1.0 if NEGATE else 1.0   # d(−E)/dE
    for start in range(0, n_ch, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        a = tl.load(a_ptr + base + cols, mask=cols < n_ch, other=0.0)
        da = tl.load(da_ptr + base + cols, mask=cols < n_ch, other=0.0)
        tl.store(de_ptr + base + cols, negation * a * (da - total), mask=cols < n_ch)


# ---------------------------------------------------------------------------------------------
# launch functions
# ---------------------------------------------------------------------------------------------
def _strides(t: Optional[torch.Tensor]) -> Tuple[int, int, int]:
    return tuple(t.stride()) if t is not None else (0, 0, 0)


def gram(u: torch.Tensor, v: torch.Tensor, config: Optional[ChannelConfig] = None,
         precision: Optional[str] = None) -> torch.Tensor:
    """U Vᵀ per batch element: u, v (B, C, N) any strides/dtypes -> (B, C, C) float32 (contiguous).

    ``precision``: of the float32 dots ("tf32x3"/"ieee"/"tf32"; default: ``_util.fp32_precision()``
    unless both are 16-bit).
    """
    batch, n_ch, n_pos = u.shape
    cfg = config if config is not None else default_config(n_ch, n_pos, u.dtype)
    splits = _splits(cfg, batch, n_ch, n_pos, u.device)
    chunks_per_split = triton.cdiv(triton.cdiv(n_pos, cfg.block_n), splits)
    splits = triton.cdiv(n_pos, cfg.block_n * chunks_per_split)   # no empty split
    parts = torch.empty(batch, splits, n_ch, n_ch, device=u.device, dtype=torch.float32)
    # 16-bit operands multiply natively (exact products, float32 accumulation); not under the
    # interpreter, whose tl.dot misreads bfloat16 operands (float32 copies give the same products).
    native = u.dtype == v.dtype and u.dtype in (torch.float16, torch.bfloat16) and not interpreted()
    grid = (triton.cdiv(n_ch, cfg.block_c), triton.cdiv(n_ch, cfg.block_c), batch * splits)
    launch(_gram_kernel)[grid](u, v, parts, *u.stride(), *v.stride(), n_ch, n_pos, chunks_per_split,
                       NATIVE=native, BLOCK_C=cfg.block_c, BLOCK_N=cfg.block_n,
                       PRECISION=precision or _precision(u.dtype if native else torch.float32),
                       num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return parts[:, 0] if splits == 1 else parts.sum(dim=1)


# Widest column block of the row softmax: rows longer than this run the online max/sum over
# several blocks (the tests size one case past it).
SOFTMAX_BLOCK_MAX = 1024


def row_softmax(energy: torch.Tensor, negate: bool) -> torch.Tensor:
    """``softmax(±energy)`` over the last dim of a contiguous float32 (B, R, C) tensor (R = C for
    the channel attention map), one row per program."""
    batch, rows, n_ch = energy.shape
    attention = torch.empty_like(energy)
    block = min(SOFTMAX_BLOCK_MAX, max(16, triton.next_power_of_2(n_ch)))
    launch(_softmax_kernel)[(batch * rows,)](energy, attention, n_ch, NEGATE=negate, BLOCK=block)
    return attention


def _mix(w1, r1, w2, r2, out, *, o=None, gamma=None, residual=None, multiply=None,
         precision: str, cfg: ChannelConfig, symmetric: bool = False) -> None:
    batch, n_ch, n_pos = out.shape
    dummy = out
    grid = (triton.cdiv(n_ch, cfg.block_c), triton.cdiv(n_pos, cfg.block_n), batch)
    launch(_mix_kernel)[grid](
        w1, r1, w2 if w2 is not None else dummy, r2 if r2 is not None else dummy,
        o if o is not None else dummy, out, gamma if gamma is not None else dummy,
        residual if residual is not None else dummy, multiply if multiply is not None else dummy,
        *w1.stride(), *r1.stride(), *_strides(w2), *_strides(r2), *_strides(o), *out.stride(),
        *_strides(residual), *_strides(multiply), n_ch, n_pos,
        HAS_SECOND=w2 is not None, HAS_GAMMA=gamma is not None, HAS_RES=residual is not None,
        HAS_MUL=multiply is not None, STORE_O=o is not None, SYMMETRIC=symmetric,
        BLOCK_C=cfg.block_c, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PRECISION=precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def epilogue_backward(grad_out: torch.Tensor, o: Optional[torch.Tensor], *, gamma: Optional[torch.Tensor],
                      multiply: Optional[torch.Tensor], need_multiply_grad: bool, cfg: ChannelConfig
                      ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(g, dγ, df)`` of ``out = γ · (o ⊙ f) + x`` in one pass (``_epilogue_grad_kernel``):
    g = γ ∂L/∂out ⊙ f (float32), dγ = Σ ∂L/∂out ⊙ f ⊙ o (gamma's dtype and shape), df = γ ∂L/∂out ⊙ o
    (f's dtype; None unless ``need_multiply_grad``). Without γ and f: ``(grad_out, None, None)``."""
    if gamma is None and multiply is None:
        return grad_out, None, None
    batch, n_ch, n_pos = grad_out.shape
    need_mul = multiply is not None and need_multiply_grad
    g = torch.empty(batch, n_ch, n_pos, device=grad_out.device, dtype=torch.float32)
    d_mul = torch.empty(batch, n_ch, n_pos, device=grad_out.device, dtype=multiply.dtype) if need_mul else None
    grid = (triton.cdiv(n_ch, cfg.block_c), triton.cdiv(n_pos, cfg.block_n), batch)
    partials = torch.empty(grid[0] * grid[1] * grid[2] if gamma is not None else 1, device=grad_out.device,
                           dtype=torch.float32)
    dummy = g
    launch(_epilogue_grad_kernel)[grid](
        grad_out, o if o is not None else dummy, multiply if multiply is not None else dummy,
        gamma if gamma is not None else dummy, g, d_mul if d_mul is not None else dummy, partials,
        *grad_out.stride(), *_strides(o), *_strides(multiply), n_ch, n_pos,
        HAS_MUL=multiply is not None, NEED_DMUL=need_mul, HAS_GAMMA=gamma is not None,
        BLOCK_C=cfg.block_c, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps)
    d_gamma = partials.sum().reshape(gamma.shape).to(gamma.dtype) if gamma is not None else None
    return g, d_gamma, d_mul


def softmax_backward(attention: torch.Tensor, d_attention: torch.Tensor, negate: bool) -> torch.Tensor:
    """``dE = ±A ⊙ (dA − rowsum(dA ⊙ A))`` for contiguous float32 (B, C, C) ``attention`` = softmax(±E)
    and ``d_attention`` = ∂L/∂A, one row per program (``_softmax_backward_kernel``)."""
    batch, rows, n_ch = attention.shape
    d_energy = torch.empty_like(attention)
    block = min(SOFTMAX_BLOCK_MAX, max(16, triton.next_power_of_2(n_ch)))
    launch(_softmax_backward_kernel)[(batch * rows,)](attention, d_attention, d_energy, n_ch, NEGATE=negate,
                                                       BLOCK=block)
    return d_energy


def channel_forward(x: torch.Tensor, *, negate: bool, gamma: Optional[torch.Tensor] = None,
                    residual: Optional[torch.Tensor] = None, multiply: Optional[torch.Tensor] = None,
                    save_for_backward: bool = True, config: Optional[ChannelConfig] = None,
                    fp32_precision: Optional[str] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Fused forward on x (B, C, N) (any strides; residual/multiply (B, C, N) too).

    Returns ``(out, o, attention)``: out (B, C, N) contiguous in x's dtype; o = A X before the
    epilogue (float32, only when ``save_for_backward`` and an epilogue is present, else None); the
    float32 attention A (B, C, C), which is all the backward needs besides x.
    """
    batch, n_ch, n_pos = x.shape
    cfg = config if config is not None else default_config(n_ch, n_pos, x.dtype)
    energy = gram(x, x, cfg)
    attention = row_softmax(energy, negate)
    out = x.new_empty(batch, n_ch, n_pos)
    has_epilogue = gamma is not None or residual is not None or multiply is not None
    # float32 o: dγ = Σ ∂L/∂out ⊙ o ⊙ f is a long sum; a 16-bit o would add its rounding noise to it.
    o = x.new_empty(batch, n_ch, n_pos, dtype=torch.float32) if (save_for_backward and has_epilogue) else None
    _mix(attention, x, None, None, out, o=o, gamma=gamma, residual=residual, multiply=multiply,
         precision=_precision(x.dtype, forced=fp32_precision), cfg=cfg)
    return out, o, attention


def channel_backward(grad_out: torch.Tensor, x: torch.Tensor, o: torch.Tensor, attention: torch.Tensor,
                     *, negate: bool, gamma: Optional[torch.Tensor] = None,
                     multiply: Optional[torch.Tensor] = None, need_multiply_grad: bool = True,
                     config: Optional[ChannelConfig] = None, fp32_precision: Optional[str] = None
                     ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients ``(dx, dγ, df)`` (the residual's gradient is ``grad_out`` itself).

    ``o``: A X before the epilogue (the forward's ``out`` when there is none).
    """
    batch, n_ch, n_pos = x.shape
    cfg = config if config is not None else default_config(n_ch, n_pos, x.dtype)
    precision = _precision(x.dtype, forced=fp32_precision)
    g, d_gamma, d_mul = epilogue_backward(grad_out, o, gamma=gamma, multiply=multiply,
                                          need_multiply_grad=need_multiply_grad, cfg=cfg)
    d_attention = gram(g, x, cfg, precision)                                          # dA = g Xᵀ
    d_energy = softmax_backward(attention, d_attention, negate)                       # ±A ⊙ (dA − rowsum)
    dx = x.new_empty(batch, n_ch, n_pos)
    # dX = Aᵀ g + (dE + dEᵀ) X, Aᵀ through strides. 16-bit inputs: dE + dEᵀ formed as the mix loads
    # dE. float32: one (B, C, C) add first — the float32 mix (tf32x3 dots) with the second,
    # transposed load spills 16 B per thread at one tile of the sm_90 sweep (0 without it).
    symmetric = x.dtype != torch.float32
    if not symmetric:
        d_energy = d_energy + d_energy.transpose(1, 2)
    _mix(attention.transpose(1, 2), g, d_energy, x, dx, precision=precision, cfg=cfg, symmetric=symmetric)
    return dx, d_gamma, d_mul
