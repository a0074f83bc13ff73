r"""Fused Triton kernels of the additive attention gate (Attention U-Net), 2-D/3-D.

The caller (``medattn_fast.ops.attention_gate.fused_gate``) folds the normalisations into the
projections and computes the coarse gating map ``G`` (B, Ci, *Sg) (float32, contiguous). Per
position p of x (B, Cx, *S), with ``up`` the bilinear/trilinear, ``align_corners=False`` sampling
of G at p (computed on the fly from p's coordinates, exactly as ATen's ``upsample_*``)::

    a[p] = W·x[:, p] + b + up(G)[p]        (Ci)     never stored
    q[p] = w·relu(a[p]) + c
    α[p] = σ(q[p])   (σ(σ(q[p])) with double_sigmoid)
    out[:, p] = α[p]·x[:, p]

Two variants of the two kernels below, chosen per call (``KernelConfig.gate_kernel``, :func:`uses_dot`):

* **dot** (``auto`` where Ci ≥ 16 and Cx ≤ 64): one program = BLOCK_P (128 forward, 64 backward)
  positions × all Cx channels, the x tile (positions × Cx) loaded once in x's dtype; ``a`` for 16
  intermediate channels at a time is ``x_tile·W_chunkᵀ`` on the tensor cores (wgmma on sm_90;
  16-bit x meets W as a hi + lo pair in its dtype, two dots with float32 accumulation; float32 x
  as the KernelConfig's ``fp32_precision`` says), plus b and up(G) sampled as a (16 × positions) tile,
  and ``ψ·relu(a)`` is reduced over the chunk's channel axis with ``tl.sum`` — no loop over Ci with
  a cross-warp reduction each. Backward: ``grad_x += da·W_chunk`` as a second dot.
  ``_forward_dot_kernel``, ``_backward_dot_kernel``.
* **loop** (the first kernels; Ci < 16, Cx > 64): one program = BLOCK_P consecutive positions × all
  Cx channels; the x tile is loaded once into registers, float32, and every channel of ``a`` is
  produced from it in turn — a loop over Ci of a (Cx × BLOCK_P) multiply-reduce — so ``a`` exists
  one channel at a time. ``_forward_kernel``, ``_backward_kernel``:

* ``_forward_kernel``  ``LOGITS=False``: out and α (eval pass: x read once, out written once);
                       ``LOGITS=True``: q only (training: ψ's batch statistics are taken outside).
* ``_backward_kernel`` recomputes q (first sweep over Ci), then dq — through the sigmoid(s) from
                       grad_out/grad_alpha, or given (backward of the logits pass) — and in a second
                       sweep da_i = dq·w_i·[a_i > 0], grad_x = α·grad_out + Σ_i W[i]·da_i, stores
                       da (B, Ci, *S) float32, and per-program partial sums of dq·relu(a_i) and dq
                       (the gradients of w and c; summed on the host in program order).

Grid mode (Oktay's gate: α computed on a strided grid by the kernels above run on θ·x, then
upsampled to x's resolution, α (B, 1, *S) float32) ends with an output transform, fused here::

    out[:, p] = α[p]·(W·x[:, p]) + b        W (Co, Cx): the ``W`` conv with its BN folded

* ``_project_kernel``          one program = BLOCK_O output channels × BLOCK_P positions; a ``tl.dot``
                               loop over Cx blocks, the α scale and bias as the epilogue (α⊙x is
                               never stored: W·(α⊙x) = α·(W·x), α being one value per position).
* ``_project_backward_kernel`` one program = BLOCK_P positions × all Cx channels, a Cx block at a
                               time: t = Wᵀ·grad_out (dot loop over Co blocks), grad_x = α·t and
                               ∂α = Σ_c t·x (complete per program, so no atomics).

x, grad_out and out may have any strides (channels-first or channels_last); float32, bfloat16 and
float16 in, float32 accumulation. Launch functions allocate their results and do no autograd.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._util import INTERPRETED, dot, dot_precision, launch, mma, pow2_at_least_16, to_storage


def _output_precision(dtype, fp32_precision: Optional[str]):
    """The output projection's float32 dots stay FMA-only ``ieee`` by default (PyTorch's TF32
    setting and an explicit ``fp32_precision`` still apply): with the three-TF32 split, the gradient of
    a conv bias that a training-mode BatchNorm cancels (exactly 0) came out at 2.5e-5 against the
    float32 bound of 2e-5 (Oktay's 3-D grid gate, tests/test_attention_gate_fused.py), and the
    pass is bandwidth-bound (a K of Cx per output), so tensor cores buy little there."""
    return dot_precision(dtype, split_default=False, forced=fp32_precision)

__all__ = ["gate_forward", "gate_logits", "gate_backward", "gate_project", "gate_project_backward",
           "default_block_p", "default_dot_block_p", "uses_dot", "MAX_CHANNELS"]

MAX_CHANNELS = 1024  # the x tile (Cx padded to a power of two × BLOCK_P) lives in registers


@triton.jit
def _positions(pid, S, H, W, BLOCK_P: tl.constexpr):
    """The program's BLOCK_P consecutive positions of the flattened (D, H, W) grid: flat index,
    in-range mask and (d, h, w)."""
    p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    return p, p < S, p // (W * H), (p // W) % H, p % W


@triton.jit
def _axis(pos, scale, size_in):
    """ATen's linear source index (align_corners=False): low index, high index, high weight."""
    src = scale * (pos.to(tl.float32) + 0.5) - 0.5
    src = tl.maximum(src, 0.0)
    lo = tl.minimum(src.to(tl.int32), size_in - 1)  # src >= 0: truncation is floor
    lam = tl.minimum(tl.maximum(src - lo.to(tl.float32), 0.0), 1.0)
    hi = lo + (lo < size_in - 1).to(tl.int32)
    return lo, hi, lam


@triton.jit
def _sample(plane, d0, d1, ld, h0, h1, lh, w0, w1, lw, Hg, Wg, mask, IS_3D: tl.constexpr):
    """up(G) of one channel at the tile's positions (plane: that channel's coarse map)."""
    v00 = tl.load(plane + (d0 * Hg + h0) * Wg + w0, mask=mask, other=0.0)
    v01 = tl.load(plane + (d0 * Hg + h0) * Wg + w1, mask=mask, other=0.0)
    v10 = tl.load(plane + (d0 * Hg + h1) * Wg + w0, mask=mask, other=0.0)
    v11 = tl.load(plane + (d0 * Hg + h1) * Wg + w1, mask=mask, other=0.0)
    val = (1.0 - lh) * ((1.0 - lw) * v00 + lw * v01) + lh * ((1.0 - lw) * v10 + lw * v11)
    if IS_3D:
        u00 = tl.load(plane + (d1 * Hg + h0) * Wg + w0, mask=mask, other=0.0)
        u01 = tl.load(plane + (d1 * Hg + h0) * Wg + w1, mask=mask, other=0.0)
        u10 = tl.load(plane + (d1 * Hg + h1) * Wg + w0, mask=mask, other=0.0)
        u11 = tl.load(plane + (d1 * Hg + h1) * Wg + w1, mask=mask, other=0.0)
        far = (1.0 - lh) * ((1.0 - lw) * u00 + lw * u01) + lh * ((1.0 - lw) * u10 + lw * u11)
        val = (1.0 - ld) * val + ld * far
    return val


@triton.jit
def _forward_kernel(x_ptr, g_ptr, w_ptr, b_ptr, psi_ptr, c_ptr, out_ptr, alpha_ptr, q_ptr,
                    Cx, Ci, D, H, W, Dg, Hg, Wg, scale_d, scale_h, scale_w,
                    sxb, sxc, sxd, sxh, sxw, sob, soc, sod, soh, sow,
                    IS_3D: tl.constexpr, LOGITS: tl.constexpr, DOUBLE_SIGMOID: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    S = D * H * W
    Sg = Dg * Hg * Wg
    p, pmask, d, h, w = _positions(pid, S, H, W, BLOCK_P)
    ch = tl.arange(0, BLOCK_C)
    cmask = ch < Cx
    tile_mask = cmask[:, None] & pmask[None, :]
    x_off = b * sxb + ch[:, None].to(tl.int64) * sxc + (d * sxd + h * sxh + w * sxw)[None, :].to(tl.int64)
    x_tile = tl.load(x_ptr + x_off, mask=tile_mask, other=0.0).to(tl.float32)

    d0, d1, ld = _axis(d, scale_d, Dg)
    h0, h1, lh = _axis(h, scale_h, Hg)
    w0, w1, lw = _axis(w, scale_w, Wg)
    q = tl.zeros((BLOCK_P,), dtype=tl.float32) + tl.load(c_ptr)
    for i in range(0, Ci):
        w_row = tl.load(w_ptr + i * Cx + ch, mask=cmask, other=0.0)
        a = tl.sum(w_row[:, None] * x_tile, axis=0) + tl.load(b_ptr + i)
        a += _sample(g_ptr + (b * Ci + i) * Sg, d0, d1, ld, h0, h1, lh, w0, w1, lw, Hg, Wg, pmask, IS_3D)
        q += tl.load(psi_ptr + i) * tl.maximum(a, 0.0)
    if LOGITS:
        tl.store(q_ptr + b * S + p, q, mask=pmask)
    else:
        alpha = tl.sigmoid(q)
        if DOUBLE_SIGMOID:
            alpha = tl.sigmoid(alpha)
        tl.store(alpha_ptr + b * S + p, to_storage(alpha, alpha_ptr.dtype.element_ty), mask=pmask)
        o_off = b * sob + ch[:, None].to(tl.int64) * soc + (d * sod + h * soh + w * sow)[None, :].to(tl.int64)
        tl.store(out_ptr + o_off, to_storage(x_tile * alpha[None, :], out_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _backward_kernel(x_ptr, g_ptr, w_ptr, b_ptr, psi_ptr, c_ptr, go_ptr, galpha_ptr, gq_ptr,
                     gx_ptr, ga_ptr, part_ptr,
                     Cx, Ci, D, H, W, Dg, Hg, Wg, scale_d, scale_h, scale_w,
                     sxb, sxc, sxd, sxh, sxw, sgb, sgc, sgd, sgh, sgw, sxgb, sxgc, sxgd, sxgh, sxgw,
                     IS_3D: tl.constexpr, FROM_LOGITS: tl.constexpr, HAS_GRAD_OUT: tl.constexpr,
                     HAS_GRAD_ALPHA: tl.constexpr, DOUBLE_SIGMOID: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    S = D * H * W
    Sg = Dg * Hg * Wg
    p, pmask, d, h, w = _positions(pid, S, H, W, BLOCK_P)
    ch = tl.arange(0, BLOCK_C)
    cmask = ch < Cx
    tile_mask = cmask[:, None] & pmask[None, :]
    spatial = d * sxd + h * sxh + w * sxw
    x_tile = tl.load(x_ptr + b * sxb + ch[:, None].to(tl.int64) * sxc + spatial[None, :].to(tl.int64),
                     mask=tile_mask, other=0.0).to(tl.float32)
    d0, d1, ld = _axis(d, scale_d, Dg)
    h0, h1, lh = _axis(h, scale_h, Hg)
    w0, w1, lw = _axis(w, scale_w, Wg)

    gx = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    if FROM_LOGITS:
        dq = tl.load(gq_ptr + b * S + p, mask=pmask, other=0.0).to(tl.float32)
    else:
        # sweep 1: q, α, then dq through the sigmoid(s)
        q = tl.zeros((BLOCK_P,), dtype=tl.float32) + tl.load(c_ptr)
        for i in range(0, Ci):
            w_row = tl.load(w_ptr + i * Cx + ch, mask=cmask, other=0.0)
            a = tl.sum(w_row[:, None] * x_tile, axis=0) + tl.load(b_ptr + i)
            a += _sample(g_ptr + (b * Ci + i) * Sg, d0, d1, ld, h0, h1, lh, w0, w1, lw, Hg, Wg, pmask, IS_3D)
            q += tl.load(psi_ptr + i) * tl.maximum(a, 0.0)
        first = tl.sigmoid(q)
        alpha = first
        if DOUBLE_SIGMOID:
            alpha = tl.sigmoid(first)
        d_alpha = tl.zeros((BLOCK_P,), dtype=tl.float32)
        if HAS_GRAD_ALPHA:
            d_alpha += tl.load(galpha_ptr + b * S + p, mask=pmask, other=0.0).to(tl.float32)
        if HAS_GRAD_OUT:
            go_off = b * sgb + ch[:, None].to(tl.int64) * sgc + (d * sgd + h * sgh + w * sgw)[None, :].to(tl.int64)
            go = tl.load(go_ptr + go_off, mask=tile_mask, other=0.0).to(tl.float32)
            d_alpha += tl.sum(go * x_tile, axis=0)
            gx = go * alpha[None, :]
        if DOUBLE_SIGMOID:
            d_alpha = d_alpha * alpha * (1.0 - alpha)
        dq = d_alpha * first * (1.0 - first)
    dq = tl.where(pmask, dq, 0.0)

    # sweep 2: da_i, grad_x, the partial sums of the w and c gradients
    n_prog = tl.num_programs(0)
    part = part_ptr + (b * n_prog + pid) * (Ci + 1)
    for i in range(0, Ci):
        w_row = tl.load(w_ptr + i * Cx + ch, mask=cmask, other=0.0)
        a = tl.sum(w_row[:, None] * x_tile, axis=0) + tl.load(b_ptr + i)
        a += _sample(g_ptr + (b * Ci + i) * Sg, d0, d1, ld, h0, h1, lh, w0, w1, lw, Hg, Wg, pmask, IS_3D)
        active = a > 0.0
        da = tl.where(active, dq * tl.load(psi_ptr + i), 0.0)
        tl.store(ga_ptr + (b * Ci + i) * S + p, da, mask=pmask)
        tl.store(part + i, tl.sum(tl.where(active, dq * a, 0.0), axis=0))
        gx += w_row[:, None] * da[None, :]
    tl.store(part + Ci, tl.sum(dq, axis=0))
    gx_off = b * sxgb + ch[:, None].to(tl.int64) * sxgc + (d * sxgd + h * sxgh + w * sxgw)[None, :].to(tl.int64)
    tl.store(gx_ptr + gx_off, to_storage(gx, gx_ptr.dtype.element_ty), mask=tile_mask)


# ---------------------------------------------------------------------------------------------
# the dot variant (Ci >= 16): a = x_tileᵀ·Wᵀ on the tensor cores, ψ·relu(a) reduced over the tile
# ---------------------------------------------------------------------------------------------

@triton.jit
def _spatial(p, d, h, w, sd, sh, sw, FLAT: tl.constexpr):
    """Offsets of the tile's positions within one (batch, channel) plane. ``FLAT``: the spatial
    dims are one run of stride ``sw`` (channels-first contiguous, or channels_last), so the
    offset is ``p·sw``: the compiler then sees consecutive positions as consecutive addresses
    (with ``sw`` = 1 specialised: vector loads and stores along the positions)."""
    if FLAT:
        return p * sw
    return d * sd + h * sh + w * sw


@triton.jit
def _interpolation(d, h, w, Dg, Hg, Wg, scale_d, scale_h, scale_w):
    """Per position of the tile: the coarse map's source indices and weights along each axis, laid
    out along a row (1, BLOCK_P) for :func:`_preactivation_chunk`'s (channels × positions) gather."""
    d0, d1, ld = _axis(d, scale_d, Dg)
    h0, h1, lh = _axis(h, scale_h, Hg)
    w0, w1, lw = _axis(w, scale_w, Wg)
    return (d0[None, :], d1[None, :], ld[None, :], h0[None, :], h1[None, :], lh[None, :],
            w0[None, :], w1[None, :], lw[None, :])


@triton.jit
def _preactivation_chunk(x_t, i0, w_ptr, whi_ptr, wlo_ptr, b_ptr, g_batch, Cx, Ci, Sg, interp, pmask, Hg, Wg,
                         IS_3D: tl.constexpr, PRECISION: tl.constexpr, BLOCK_C: tl.constexpr,
                         BLOCK_I: tl.constexpr):
    """``a`` (BLOCK_P, BLOCK_I) float32 for the intermediate channels i0 .. i0+BLOCK_I of a
    (BLOCK_P positions × BLOCK_C channels) x tile: ``a[p, i] = Σ_c x[p, c]·W[i, c] + b[i] +
    up(G)[i, p]``, the sum as a ``tl.dot`` (M = positions, N = BLOCK_I, K = Cx), then the bias and
    the sampled coarse map; channels past Ci are exactly 0. 16-bit x meets W as a hi/lo pair of
    x's dtype (two dots, float32 accumulation); float32 x multiplies as ``PRECISION`` says (the
    KernelConfig's fp32 policy). The callers form the chunk's channel indices themselves: an index
    returned from here and used in a store's address would make torch's mutation analysis of the
    launch (``wrap_triton``, which follows the address back through this call to all of its
    pointer arguments) count G and the weights as written, and clone them before each launch."""
    ch = tl.arange(0, BLOCK_C)
    ic = i0 + tl.arange(0, BLOCK_I)
    imask = ic < Ci
    # Wᵀ chunk (BLOCK_C, BLOCK_I): W is (Ci, Cx) row-major, float32
    w_off = ic[None, :] * Cx + ch[:, None]
    w_mask = (ch < Cx)[:, None] & imask[None, :]
    if x_t.dtype == tl.float32:
        a = dot(x_t, tl.load(w_ptr + w_off, mask=w_mask, other=0.0), PRECISION, INTERPRETED)
    else:
        # W = W_hi + W_lo, both in x's dtype (split on the host): two 16-bit dots carry W to ~16
        # significant bits. W is the folded weight (BN scale included), which no 16-bit convolution
        # rounds: one rounding to bfloat16 put the ψ-BN weight's gradient (batch statistics of q)
        # at 3x PyTorch's error. (Split in the kernel, it cost 36 more registers on sm_90.)
        w_lo = tl.load(wlo_ptr + w_off, mask=w_mask, other=0.0)
        w_hi = tl.load(whi_ptr + w_off, mask=w_mask, other=0.0)
        a = dot(x_t, w_lo, PRECISION, INTERPRETED) + dot(x_t, w_hi, PRECISION, INTERPRETED)
    a += tl.load(b_ptr + ic, mask=imask, other=0.0)[None, :]
    # up(G) sampled as a (BLOCK_I, BLOCK_P) tile, then transposed: with the positions along the
    # lanes each thread holds few positions, so their indices and weights take few registers
    # (sampled as (BLOCK_P, BLOCK_I), 16 positions per thread held 6 values each and the kernel
    # spilled on sm_90). 32-bit offsets within this batch element's maps (the launch checks).
    d0, d1, ld, h0, h1, lh, w0, w1, lw = interp
    up = _sample(g_batch + (ic * Sg)[:, None], d0, d1, ld, h0, h1, lh, w0, w1, lw, Hg, Wg,
                 imask[:, None] & pmask[None, :], IS_3D)
    a += tl.trans(up)
    return a


@triton.jit
def _logits_dot(x_t, w_ptr, whi_ptr, wlo_ptr, b_ptr, psi_ptr, c_ptr, g_batch, Cx, Ci, Sg, interp, pmask, Hg, Wg,
                IS_3D: tl.constexpr, PRECISION: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr,
                BLOCK_P: tl.constexpr):
    """``q[p] = Σ_i ψ_i·relu(a[p, i]) + c`` (BLOCK_P,): a chunk of BLOCK_I intermediate channels at a
    time, each reduced over its Ci axis within the program (``tl.sum`` of the 2-D tile)."""
    q = tl.zeros((BLOCK_P,), dtype=tl.float32) + tl.load(c_ptr)
    for i0 in range(0, Ci, BLOCK_I):
        ic = i0 + tl.arange(0, BLOCK_I)
        imask = ic < Ci
        a = _preactivation_chunk(x_t, i0, w_ptr, whi_ptr, wlo_ptr, b_ptr, g_batch, Cx, Ci, Sg, interp,
                                 pmask, Hg, Wg, IS_3D, PRECISION, BLOCK_C, BLOCK_I)
        psi = tl.load(psi_ptr + ic, mask=imask, other=0.0)
        q += tl.sum(tl.maximum(a, 0.0) * psi[None, :], axis=1)
    return q


@triton.jit
def _forward_dot_kernel(x_ptr, g_ptr, w_ptr, whi_ptr, wlo_ptr, b_ptr, psi_ptr, c_ptr, out_ptr, alpha_ptr, q_ptr,
                        Cx, Ci, D, H, W, Dg, Hg, Wg, scale_d, scale_h, scale_w,
                        sxb, sxc, sxd, sxh, sxw, sob, soc, sod, soh, sow,
                        IS_3D: tl.constexpr, FLAT: tl.constexpr, LOGITS: tl.constexpr,
                        DOUBLE_SIGMOID: tl.constexpr, PRECISION: tl.constexpr, BLOCK_C: tl.constexpr,
                        BLOCK_I: tl.constexpr, BLOCK_P: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    S = D * H * W
    Sg = Dg * Hg * Wg
    p, pmask, d, h, w = _positions(pid, S, H, W, BLOCK_P)
    ch = tl.arange(0, BLOCK_C)
    tile_mask = pmask[:, None] & (ch < Cx)[None, :]
    # the x tile, positions × channels, in x's dtype: read once, used by the dots and for out = α·x;
    # 32-bit offsets within x[b] (the launch checks)
    x_off = ch[None, :] * sxc + _spatial(p, d, h, w, sxd, sxh, sxw, FLAT)[:, None]
    x_t = tl.load(x_ptr + b * sxb + x_off, mask=tile_mask, other=0.0)
    interp = _interpolation(d, h, w, Dg, Hg, Wg, scale_d, scale_h, scale_w)
    q = _logits_dot(x_t, w_ptr, whi_ptr, wlo_ptr, b_ptr, psi_ptr, c_ptr, g_ptr + b * Ci * Sg, Cx, Ci, Sg, interp, pmask, Hg, Wg,
                    IS_3D, PRECISION, BLOCK_C, BLOCK_I, BLOCK_P)
    if LOGITS:
        tl.store(q_ptr + b * S + p, q, mask=pmask)
    else:
        alpha = tl.sigmoid(q)
        if DOUBLE_SIGMOID:
            alpha = tl.sigmoid(alpha)
        tl.store(alpha_ptr + b * S + p, to_storage(alpha, alpha_ptr.dtype.element_ty), mask=pmask)
        o_off = ch[None, :] * soc + _spatial(p, d, h, w, sod, soh, sow, FLAT)[:, None]
        tl.store(out_ptr + b * sob + o_off, to_storage(x_t.to(tl.float32) * alpha[:, None], out_ptr.dtype.element_ty),
                 mask=tile_mask)


@triton.jit
def _backward_dot_kernel(x_ptr, g_ptr, w_ptr, whi_ptr, wlo_ptr, b_ptr, psi_ptr, c_ptr, go_ptr, galpha_ptr, gq_ptr,
                         gx_ptr, ga_ptr, part_ptr,
                         Cx, Ci, D, H, W, Dg, Hg, Wg, scale_d, scale_h, scale_w,
                         sxb, sxc, sxd, sxh, sxw, sgb, sgc, sgd, sgh, sgw, sxgb, sxgc, sxgd, sxgh, sxgw,
                         IS_3D: tl.constexpr, FLAT: tl.constexpr, FROM_LOGITS: tl.constexpr,
                         HAS_GRAD_OUT: tl.constexpr, HAS_GRAD_ALPHA: tl.constexpr, DOUBLE_SIGMOID: tl.constexpr,
                         PRECISION: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr,
                         BLOCK_P: tl.constexpr):
    """One program: BLOCK_P positions. Sweep 1 (backward of the forward pass only): q as the
    forward computes it, then dq through the sigmoid(s). Sweep 2, a chunk of BLOCK_I intermediate
    channels at a time: ``a`` again (a dot), ``da = dq·ψ·[a > 0]`` (stored), the w partial sums
    (the tile's columns summed) and ``grad_x += da·W`` (a dot, K = BLOCK_I); grad_x starts at
    ``α·grad_out``."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    S = D * H * W
    Sg = Dg * Hg * Wg
    p, pmask, d, h, w = _positions(pid, S, H, W, BLOCK_P)
    ch = tl.arange(0, BLOCK_C)
    cmask = ch < Cx
    tile_mask = pmask[:, None] & cmask[None, :]
    x_off = ch[None, :] * sxc + _spatial(p, d, h, w, sxd, sxh, sxw, FLAT)[:, None]
    x_t = tl.load(x_ptr + b * sxb + x_off, mask=tile_mask, other=0.0)
    interp = _interpolation(d, h, w, Dg, Hg, Wg, scale_d, scale_h, scale_w)
    g_batch = g_ptr + b * Ci * Sg

    gx = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    if FROM_LOGITS:
        dq = tl.load(gq_ptr + b * S + p, mask=pmask, other=0.0).to(tl.float32)
    else:
        q = _logits_dot(x_t, w_ptr, whi_ptr, wlo_ptr, b_ptr, psi_ptr, c_ptr, g_batch, Cx, Ci, Sg, interp, pmask, Hg, Wg,
                        IS_3D, PRECISION, BLOCK_C, BLOCK_I, BLOCK_P)
        first = tl.sigmoid(q)
        alpha = first
        if DOUBLE_SIGMOID:
            alpha = tl.sigmoid(first)
        d_alpha = tl.zeros((BLOCK_P,), dtype=tl.float32)
        if HAS_GRAD_ALPHA:
            d_alpha += tl.load(galpha_ptr + b * S + p, mask=pmask, other=0.0).to(tl.float32)
        if HAS_GRAD_OUT:
            go_off = ch[None, :] * sgc + _spatial(p, d, h, w, sgd, sgh, sgw, FLAT)[:, None]
            go = tl.load(go_ptr + b * sgb + go_off, mask=tile_mask, other=0.0).to(tl.float32)
            d_alpha += tl.sum(go * x_t.to(tl.float32), axis=1)
            gx = go * alpha[:, None]
        if DOUBLE_SIGMOID:
            d_alpha = d_alpha * alpha * (1.0 - alpha)
        dq = d_alpha * first * (1.0 - first)
    dq = tl.where(pmask, dq, 0.0)

    part = part_ptr + (b * tl.num_programs(0) + pid) * (Ci + 1)
    ga_batch = ga_ptr + b * Ci * S
    for i0 in range(0, Ci, BLOCK_I):
        ic = i0 + tl.arange(0, BLOCK_I)
        imask = ic < Ci
        a = _preactivation_chunk(x_t, i0, w_ptr, whi_ptr, wlo_ptr, b_ptr, g_batch, Cx, Ci, Sg, interp,
                                 pmask, Hg, Wg, IS_3D, PRECISION, BLOCK_C, BLOCK_I)
        active = a > 0.0
        psi = tl.load(psi_ptr + ic, mask=imask, other=0.0)
        da = tl.where(active, dq[:, None] * psi[None, :], 0.0)      # (BLOCK_P, BLOCK_I), 0 past Ci
        tl.store(ga_batch + (ic[None, :] * S + p[:, None]), da, mask=pmask[:, None] & imask[None, :])
        tl.store(part + ic, tl.sum(tl.where(active, dq[:, None] * a, 0.0), axis=0), mask=imask)
        # grad_x += da·W: (BLOCK_P, BLOCK_I) × (BLOCK_I, BLOCK_C); da float32 (TF32 for 16-bit x)
        w_tile = tl.load(w_ptr + ic[:, None] * Cx + ch[None, :], mask=imask[:, None] & cmask[None, :], other=0.0)
        gx += mma(da, w_tile, PRECISION)
    tl.store(part + Ci, tl.sum(dq, axis=0))
    gx_off = ch[None, :] * sxgc + _spatial(p, d, h, w, sxgd, sxgh, sxgw, FLAT)[:, None]
    tl.store(gx_ptr + b * sxgb + gx_off, to_storage(gx, gx_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _project_kernel(x_ptr, w_ptr, b_ptr, alpha_ptr, out_ptr, Cx, Co, H, W, S,
                    sxb, sxc, sxd, sxh, sxw, sob, soc, sod, soh, sow,
                    PRECISION: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_P: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_o = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    p, pmask, d, h, w = _positions(pid_p, S, H, W, BLOCK_P)
    x_spatial = (d * sxd + h * sxh + w * sxw).to(tl.int64)
    o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    omask = o < Co
    acc = tl.zeros((BLOCK_O, BLOCK_P), dtype=tl.float32)
    for k0 in range(0, Cx, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < Cx
        x_tile = tl.load(x_ptr + b * sxb + k[:, None].to(tl.int64) * sxc + x_spatial[None, :],
                         mask=kmask[:, None] & pmask[None, :], other=0.0)
        w_tile = tl.load(w_ptr + o[:, None] * Cx + k[None, :], mask=omask[:, None] & kmask[None, :], other=0.0)
        # W is float32 (folded); it meets x in x's dtype, as a 16-bit convolution's weights do
        acc += dot(w_tile.to(x_tile.dtype), x_tile, PRECISION, INTERPRETED)
    alpha = tl.load(alpha_ptr + b * S + p, mask=pmask, other=0.0)
    bias = tl.load(b_ptr + o, mask=omask, other=0.0)
    out = acc * alpha[None, :] + bias[:, None]
    o_off = b * sob + o[:, None].to(tl.int64) * soc + (d * sod + h * soh + w * sow)[None, :].to(tl.int64)
    tl.store(out_ptr + o_off, to_storage(out, out_ptr.dtype.element_ty), mask=omask[:, None] & pmask[None, :])


@triton.jit
def _project_backward_kernel(x_ptr, w_ptr, alpha_ptr, go_ptr, gx_ptr, galpha_ptr, Cx, Co, H, W, S,
                             sxb, sxc, sxd, sxh, sxw, sgb, sgc, sgd, sgh, sgw, sxgb, sxgc, sxgd, sxgh, sxgw,
                             PRECISION: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
                             BLOCK_P: tl.constexpr):
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    p, pmask, d, h, w = _positions(pid_p, S, H, W, BLOCK_P)
    x_spatial = (d * sxd + h * sxh + w * sxw).to(tl.int64)
    go_spatial = (d * sgd + h * sgh + w * sgw).to(tl.int64)
    gx_spatial = (d * sxgd + h * sxgh + w * sxgw).to(tl.int64)
    alpha = tl.load(alpha_ptr + b * S + p, mask=pmask, other=0.0)
    grad_alpha = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for k0 in range(0, Cx, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < Cx
        t = tl.zeros((BLOCK_K, BLOCK_P), dtype=tl.float32)
        for o0 in range(0, Co, BLOCK_O):
            o = o0 + tl.arange(0, BLOCK_O)
            omask = o < Co
            go = tl.load(go_ptr + b * sgb + o[:, None].to(tl.int64) * sgc + go_spatial[None, :],
                         mask=omask[:, None] & pmask[None, :], other=0.0)
            # Wᵀ block (BLOCK_K, BLOCK_O)
            wt = tl.load(w_ptr + o[None, :] * Cx + k[:, None], mask=kmask[:, None] & omask[None, :], other=0.0)
            t += dot(wt.to(go.dtype), go, PRECISION, INTERPRETED)
        tile_mask = kmask[:, None] & pmask[None, :]
        x_tile = tl.load(x_ptr + b * sxb + k[:, None].to(tl.int64) * sxc + x_spatial[None, :],
                         mask=tile_mask, other=0.0).to(tl.float32)
        grad_alpha += tl.sum(t * x_tile, axis=0)
        tl.store(gx_ptr + b * sxgb + k[:, None].to(tl.int64) * sxgc + gx_spatial[None, :],
                 to_storage(t * alpha[None, :], gx_ptr.dtype.element_ty), mask=tile_mask)
    tl.store(galpha_ptr + b * S + p, grad_alpha, mask=pmask)


# ---------------------------------------------------------------------------------------------
# launches
# ---------------------------------------------------------------------------------------------

GATE_WARPS = 8
DOT_MIN_CHANNELS = 16     # tl.dot's smallest N: below it the dot would be mostly padding
DOT_MAX_CHANNELS = 64     # widest x tile (Cx) ``auto`` gives the dot variant: 0 spills on sm_90 up to here
DOT_BLOCK_I = 16          # intermediate channels per chunk of the dot variant (the dot's N)
DOT_STAGES = 1            # no software pipelining of the chunk loop (see default_dot_block_p)


def default_block_p(channels: int) -> int:
    """Positions per program of the ``loop`` variant: about 1024 tile elements (Cx padded) per
    program, 16..128, on ``GATE_WARPS`` warps. Chosen from ptxas's report on sm_90
    (tests/_sm90_compile.py) at the benchmarks' widths (Cx = 64 in 2-D, 32 in 3-D): with 4096
    elements on 4 warps, triton 3.6 (the GPU machine's version) spilled 1.6-5.4 KB per thread in
    both kernels (triton 3.9: none); with 1024 on 8 warps, at most 8 B under 3.6 and none under 3.9.
    Not yet timed on a GPU."""
    return max(16, min(128, 1024 // triton.next_power_of_2(channels)))


def default_dot_block_p(channels: int, backward: bool, dtype: torch.dtype = torch.bfloat16,
                        spatial_dims: int = 2) -> int:
    """Positions per program of the ``dot`` variant, on ``GATE_WARPS`` warps: for 16-bit inputs 128
    forward (64 in 3-D) and 64 backward up to Cx = 64 (8192 / 4096 x-tile elements), fewer past it
    (a forced ``dot`` only); float32 holds half the elements (its three-TF32 dots keep hi and lo
    copies of each tile).

    From ptxas's report on sm_90 (tests/_sm90_compile.py, triton 3.9 and 3.6) at Cx 16..64, Ci
    16..64, 2-D and 3-D, float32/bfloat16: 0 spills. With 16-bit sizes for float32, triton 3.6
    spilled 80-160 B in the Cx = 64 backward and 16 B in the 3-D forward; the 16-bit 3-D forward
    (trilinear sampling) at 128 positions spilled 8 B at Cx = 32 and 40 B at Cx = 64 (3.6). The
    bfloat16 forward at Cx = 64, Ci = 32 takes 130 registers under 3.9 (one 8-warp program per SM
    by registers; capping it at 128 with ``maxnreg`` spilled 16 B). 256 positions forward took
    186-212 registers; 128 positions backward 176-235 and spilled at Cx = 35 (grid gate, float32).
    The chunk loop runs unpipelined (``DOT_STAGES``): 3 stages tripled the backward's shared memory
    (49 → 154 KB) and raised its registers. Past Cx = 64 the kernels spilled (56 B at Cx = 128, KBs
    at 512-1024), hence ``DOT_MAX_CHANNELS``. Not yet timed on a GPU."""
    elements = 4096 if backward else 8192
    if dtype == torch.float32:
        elements //= 2
    cap = 64 if (backward or spatial_dims == 3) else 128
    return max(16, min(cap, elements // pow2_at_least_16(channels)))


def uses_dot(kernel: str, intermediate_channels: int, channels: int) -> bool:
    """Whether the ``dot`` variant runs: ``kernel`` is the KernelConfig's ``gate_kernel``
    (``"auto"``: where DOT_MIN_CHANNELS ≤ Ci and Cx ≤ DOT_MAX_CHANNELS)."""
    if kernel not in ("auto", "dot", "loop"):
        raise ValueError(f"triton attention_gate: kernel must be 'auto', 'dot' or 'loop', got {kernel!r}")
    return kernel == "dot" or (kernel == "auto" and intermediate_channels >= DOT_MIN_CHANNELS
                               and channels <= DOT_MAX_CHANNELS)


def _strides5(t: torch.Tensor) -> Tuple[int, int, int, int, int]:
    if t.dim() == 5:
        return tuple(t.stride())
    return (t.stride(0), t.stride(1), 0, t.stride(2), t.stride(3))


def _geometry(x: torch.Tensor, G: torch.Tensor):
    three_d = x.dim() == 5
    fine = tuple(x.shape[2:]) if three_d else (1, *x.shape[2:])
    coarse = tuple(G.shape[2:]) if three_d else (1, *G.shape[2:])
    scales = [float(c) / float(f) for c, f in zip(coarse, fine)]
    return three_d, fine, coarse, scales


def _check(x: torch.Tensor, G: torch.Tensor, weight: torch.Tensor) -> None:
    if x.shape[1] > MAX_CHANNELS:
        raise ValueError(f"triton attention_gate: at most {MAX_CHANNELS} x channels, got {x.shape[1]}")
    if G.dtype != torch.float32 or weight.dtype != torch.float32:
        raise TypeError(f"triton attention_gate: G and the folded parameters must be float32, got "
                        f"{G.dtype} and {weight.dtype}")


def _params(G, weight, bias, psi, psi_bias):
    return (G.contiguous(), weight.contiguous(), bias.contiguous(), psi.reshape(-1).contiguous(),
            psi_bias.reshape(-1).contiguous())


def _batch_extent(t: torch.Tensor) -> int:
    """Elements one batch element of ``t`` spans in memory (the largest offset within it + 1)."""
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:]))


def _flat(t: torch.Tensor) -> bool:
    """Whether ``t``'s spatial dims (2: on) are one run of its last spatial stride, so that a
    position's offset is its flat index times that stride (channels-first contiguous, channels_last)."""
    sizes, strides = t.shape[2:], t.stride()[2:]
    return all(sizes[i] == 1 or strides[i] == strides[i + 1] * sizes[i + 1] for i in range(len(sizes) - 1))


def _variant(x, ci, block_p, fp32_precision, kernel, addressed, per_batch_extents, backward) -> dict:
    """The launch's kernels, positions per program and constexprs for the chosen variant.

    ``addressed``: the tensors with x's geometry the kernels read or write (x, out, grad_out,
    grad_x); ``per_batch_extents``: the elements per batch element of the others (G, grad_a). The
    dot kernels address within a batch element with 32-bit offsets (64-bit ones widen every
    pointer tile); past 2³¹ elements per batch element the loop kernels (64-bit offsets
    throughout) run the call: the same result, slower."""
    cx = x.shape[1]
    extents = [_batch_extent(t) for t in addressed] + list(per_batch_extents)
    if uses_dot(kernel, ci, cx) and max(extents) < 2 ** 31:
        return dict(kernels=(_forward_dot_kernel, _backward_dot_kernel),
                    block_p=block_p or default_dot_block_p(cx, backward, x.dtype, x.dim() - 2),
                    meta=dict(PRECISION=dot_precision(x.dtype, forced=fp32_precision), BLOCK_C=pow2_at_least_16(cx),
                              BLOCK_I=min(DOT_BLOCK_I, pow2_at_least_16(ci)), FLAT=all(_flat(t) for t in addressed),
                              num_stages=DOT_STAGES))
    return dict(kernels=(_forward_kernel, _backward_kernel), block_p=block_p or default_block_p(cx),
                meta=dict(BLOCK_C=triton.next_power_of_2(cx)))


def _weights(variant: dict, weight: torch.Tensor, dtype: torch.dtype) -> tuple:
    """The weight arguments of the variant's kernels: W (float32) for the loop kernels; for the dot
    kernels W and its split ``W = W_hi + W_lo`` in x's dtype (16-bit x; float32 x: W twice, unused)."""
    if variant["kernels"][0] is _forward_kernel:
        return (weight,)
    if dtype == torch.float32:
        return (weight, weight, weight)
    high = weight.to(dtype)
    return (weight, high, (weight - high.to(torch.float32)).to(dtype))


def _launch_forward(x, G, weight, bias, psi, psi_bias, double_sigmoid, logits, block_p, fp32_precision, kernel):
    _check(x, G, weight)
    G, weight, bias, psi, psi_bias = _params(G, weight, bias, psi, psi_bias)
    three_d, fine, coarse, scales = _geometry(x, G)
    batch, cx, ci = x.shape[0], x.shape[1], G.shape[1]
    S = fine[0] * fine[1] * fine[2]
    alpha_shape = (batch, 1, *x.shape[2:])
    if logits:
        q = torch.empty(alpha_shape, device=x.device, dtype=torch.float32)
        out, alpha = x, x  # unused pointers
    else:
        out = torch.empty_like(x)
        alpha = torch.empty(alpha_shape, device=x.device, dtype=x.dtype)
        q = alpha
    variant = _variant(x, ci, block_p, fp32_precision, kernel, (x, out), (G[0].numel(),), False)
    block_p = variant["block_p"]
    grid = (triton.cdiv(S, block_p), batch)
    launch(variant["kernels"][0])[grid](x, G, *_weights(variant, weight, x.dtype), bias, psi, psi_bias, out, alpha, q,
                                cx, ci, *fine, *coarse, *scales, *_strides5(x), *_strides5(out),
                                IS_3D=three_d, LOGITS=logits, DOUBLE_SIGMOID=bool(double_sigmoid),
                                BLOCK_P=block_p, num_warps=GATE_WARPS, **variant["meta"])
    return q if logits else (out, alpha)


def gate_forward(x, G, weight, bias, psi, psi_bias, double_sigmoid: bool, *, block_p: Optional[int] = None,
                 fp32_precision: Optional[str] = None, kernel: str = "auto"):
    """Eval pass: ``(out like x, alpha (B, 1, *S) in x's dtype)``; parameters folded, float32.
    ``kernel``: ``"dot"``, ``"loop"`` or ``"auto"`` (:func:`uses_dot`); ``fp32_precision``: the dot
    variant's float32 products (``triton_kernels._util.fp32_precision``)."""
    return _launch_forward(x, G, weight, bias, psi, psi_bias, double_sigmoid, False, block_p, fp32_precision,
                           kernel)


def gate_logits(x, G, weight, bias, psi, psi_bias, *, block_p: Optional[int] = None,
                fp32_precision: Optional[str] = None, kernel: str = "auto"):
    """The ψ pre-activation ``q`` (B, 1, *S) float32."""
    return _launch_forward(x, G, weight, bias, psi, psi_bias, False, True, block_p, fp32_precision, kernel)


def gate_backward(x, G, weight, bias, psi, psi_bias, grad_q, grad_out, grad_alpha, double_sigmoid: bool, *,
                  block_p: Optional[int] = None, fp32_precision: Optional[str] = None, kernel: str = "auto"):
    """``(grad_x like x, grad_a (B, Ci, *S) float32, grad_psi (Ci,), grad_psi_bias (1,))``.

    ``grad_q`` given: backward of :func:`gate_logits`; else of :func:`gate_forward` with
    ``grad_out`` and/or ``grad_alpha``.
    """
    _check(x, G, weight)
    G, weight, bias, psi, psi_bias = _params(G, weight, bias, psi, psi_bias)
    three_d, fine, coarse, scales = _geometry(x, G)
    batch, cx, ci = x.shape[0], x.shape[1], G.shape[1]
    S = fine[0] * fine[1] * fine[2]
    from_logits = grad_q is not None
    if from_logits:
        grad_q = grad_q.to(torch.float32).contiguous()
    if grad_alpha is not None:
        grad_alpha = grad_alpha.contiguous()
    grad_x = torch.empty_like(x)
    grad_a = torch.empty((batch, ci, *x.shape[2:]), device=x.device, dtype=torch.float32)
    go = grad_out if grad_out is not None else x
    variant = _variant(x, ci, block_p, fp32_precision, kernel, (x, go, grad_x), (G[0].numel(), ci * S), True)
    block_p = variant["block_p"]
    n_prog = triton.cdiv(S, block_p)
    partials = torch.empty((batch * n_prog, ci + 1), device=x.device, dtype=torch.float32)
    launch(variant["kernels"][1])[(n_prog, batch)](
        x, G, *_weights(variant, weight, x.dtype), bias, psi, psi_bias, go,
        grad_alpha if grad_alpha is not None else x, grad_q if from_logits else x,
        grad_x, grad_a, partials,
        cx, ci, *fine, *coarse, *scales, *_strides5(x), *_strides5(go), *_strides5(grad_x),
        IS_3D=three_d, FROM_LOGITS=from_logits, HAS_GRAD_OUT=grad_out is not None,
        HAS_GRAD_ALPHA=grad_alpha is not None, DOUBLE_SIGMOID=bool(double_sigmoid),
        BLOCK_P=block_p, num_warps=GATE_WARPS, **variant["meta"])
    sums = partials.sum(0)
    return grad_x, grad_a, sums[:ci].clone(), sums[ci:].clone()


# ---------------------------------------------------------------------------------------------
# grid mode's output transform
# ---------------------------------------------------------------------------------------------

def _projection_geometry(x: torch.Tensor, alpha: torch.Tensor, weight: torch.Tensor):
    if weight.dtype != torch.float32 or alpha.dtype != torch.float32:
        raise TypeError(f"triton attention_gate project: weight and alpha must be float32, got "
                        f"{weight.dtype} and {alpha.dtype}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"triton attention_gate project: weight must be (Co, {x.shape[1]}), got "
                         f"{tuple(weight.shape)}")
    expected = (x.shape[0], 1, *x.shape[2:])
    if tuple(alpha.shape) != expected:
        raise ValueError(f"triton attention_gate project: alpha must be {expected}, got {tuple(alpha.shape)}")
    fine = tuple(x.shape[2:]) if x.dim() == 5 else (1, *x.shape[2:])
    return fine[1], fine[2], fine[0] * fine[1] * fine[2]


def _projection_config(cx: int, co: int, dtype: torch.dtype, block_p: Optional[int], backward: bool):
    """(BLOCK_O, BLOCK_K, BLOCK_P, num_warps). float32 dots run on the FMA units with their operand
    tiles in registers: 32-wide K blocks in float32, and 32-wide blocks in the backward's
    three-tile loop; 8 warps. On sm_90 (tests/_sm90_compile.py) 64-wide blocks on 4 warps spilled
    168 B (forward) and 992 B (backward) per thread in float32 and 224 B in the 16-bit backward
    (triton 3.9); 64-wide 16-bit backward blocks on 8 warps still spilled 72 B under triton 3.6."""
    block_o = min(32 if backward else 64, pow2_at_least_16(co))
    block_k = min(32 if backward or dtype == torch.float32 else 64, pow2_at_least_16(cx))
    return block_o, block_k, block_p or 64, 8


def gate_project(x, alpha, weight, bias, *, block_p: Optional[int] = None, fp32_precision: Optional[str] = None):
    """``out[:, p] = alpha[p]·(weight·x[:, p]) + bias`` (B, Co, *S) in x's dtype (x's memory format
    when Co == Cx); alpha (B, 1, *S), weight (Co, Cx), bias (Co,) or None, float32."""
    H, W, S = _projection_geometry(x, alpha, weight)
    batch, cx, co = x.shape[0], x.shape[1], weight.shape[0]
    weight, alpha = weight.contiguous(), alpha.contiguous()
    bias = weight.new_zeros(co) if bias is None else bias.reshape(co).to(torch.float32).contiguous()
    out = torch.empty_like(x) if co == cx else x.new_empty((batch, co, *x.shape[2:]))
    block_o, block_k, block_p, warps = _projection_config(cx, co, x.dtype, block_p, backward=False)
    grid = (triton.cdiv(S, block_p), triton.cdiv(co, block_o), batch)
    launch(_project_kernel)[grid](x, weight, bias, alpha, out, cx, co, H, W, S, *_strides5(x), *_strides5(out),
                                  PRECISION=_output_precision(x.dtype, fp32_precision), BLOCK_O=block_o,
                                  BLOCK_K=block_k, BLOCK_P=block_p, num_warps=warps)
    return out


def gate_project_backward(x, alpha, weight, grad_out, *, block_p: Optional[int] = None,
                          fp32_precision: Optional[str] = None):
    """``(grad_x like x, grad_alpha (B, 1, *S) float32)`` of :func:`gate_project`."""
    H, W, S = _projection_geometry(x, alpha, weight)
    batch, cx, co = x.shape[0], x.shape[1], weight.shape[0]
    if tuple(grad_out.shape) != (batch, co, *x.shape[2:]) or grad_out.dtype != x.dtype:
        raise ValueError(f"triton attention_gate project: grad_out must be {(batch, co, *x.shape[2:])} of "
                         f"{x.dtype}, got {tuple(grad_out.shape)} of {grad_out.dtype}")
    weight, alpha = weight.contiguous(), alpha.contiguous()
    grad_x = torch.empty_like(x)
    grad_alpha = torch.empty(alpha.shape, device=x.device, dtype=torch.float32)
    block_o, block_k, block_p, warps = _projection_config(cx, co, x.dtype, block_p, backward=True)
    launch(_project_backward_kernel)[(triton.cdiv(S, block_p), batch)](
        x, weight, alpha, grad_out, grad_x, grad_alpha, cx, co, H, W, S,
        *_strides5(x), *_strides5(grad_out), *_strides5(grad_x),
        PRECISION=_output_precision(x.dtype, fp32_precision), BLOCK_O=block_o, BLOCK_K=block_k, BLOCK_P=block_p, num_warps=warps)
    return grad_x, grad_alpha
