r"""Position attention: softmax attention over tokens without the N×N matrix.

    o_i = Σ_j softmax_j(s · q_i·k_j) v_j                (transpose=False: DANet's PAM, Fu et al., CVPR 2019)
    o_j = Σ_i A_ij v_i,   A_ij = softmax_j(s · q_i·k_j)  (transpose=True: the V @ A of Multi-Scale Guided
                                                         Attention, Sinha & Dolz 2020)

then the optional epilogue ``out = γ · (o ⊙ f) + x`` (``gamma``, ``multiply`` = f, ``residual`` = x;
each part is skipped when its argument is None).

Layouts. ``layout="tokens"``: q (B, Nq, dk), k (B, Nk, dk), v (B, Nk, dv) -> (B, Nq, dv).
``layout="channels"``: channel-first conv outputs q (B, dk, Nq), k (B, dk, Nk), v (B, dv, Nk)
-> (B, dv, Nq); they are read through transposed *views* (strides), never permuted into copies,
and the output is written channel-first directly. ``residual``/``multiply`` have the output's
shape in the chosen layout. With ``transpose=True`` the roles of the token counts swap: v has Nq
rows and the output Nk (Nq == Nk for the guided self-attention's V @ A). Heads go into the batch dim.

Backends (``medattn_fast.backend``): ``reference`` materialises the (B, Nq, Nk) softmax in the
input dtype, exactly like the originals; ``torch`` is chunked over queries, flash-attention style:
a custom autograd function saves only q, k, v, the output and each query row's log-sum-exp, and
recomputes a chunk's probabilities in backward, so the peak extra memory is O(B · chunk · Nk) in
forward *and* backward. fp16/bf16 inputs are computed in float32 and returned in their dtype.
Fused ``triton``/``cuda``/``cpp`` backends plug in by registering on ``_op`` with the same
keyword signature (token-major strided views in, token-major view of the output out).
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor

from .. import backend as B
from . import _validate as V
from ._custom_op import accumulation_dtype
from ._epilogue import epilogue
from ._families import dispatcher

__all__ = ["position_attention", "default_chunk_size"]

_OP = "position_attention"
_op = dispatcher(_OP)   # its row in ops/_families.py: auto orders, export backend, limits

# Budget, in elements, of one (B, chunk, Nk) score block of the torch backend: 4 Mi elements
# (16 MiB in float32). Backward holds about three such blocks at once.
_CHUNK_ELEMENTS = 1 << 22
_MIN_CHUNK = 16


def default_chunk_size(batch: int, n_rows: int, n_keys: int) -> int:
    """Query rows per chunk so that one (batch, chunk, n_keys) block stays within the budget."""
    chunk = _CHUNK_ELEMENTS // max(1, batch * n_keys)
    return max(1, min(n_rows, max(_MIN_CHUNK, chunk)))


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
def _check(q, k, v, scale, transpose, layout, gamma, residual, multiply, chunk_size):
    V.choice(_OP, "layout", layout, ("tokens", "channels"))
    V.choice(_OP, "transpose", transpose, (False, True))
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{_OP}: argument 'scale' must be a real number, got {type(scale).__name__}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"{_OP}: argument 'chunk_size' must be a positive int or None, got {chunk_size!r}")
    V.tensor(_OP, "q", q, 3)
    V.tensor(_OP, "k", k, 3)
    V.tensor(_OP, "v", v, 3)
    V.same_device_dtype(_OP, q=q, k=k, v=v)
    # token-major (B, N, d) or channel-first (B, d, N): the dims of tokens and features
    channels = layout == "channels"
    tok, feat = (2, 1) if channels else (1, 2)

    def shaped(tokens, features):
        dims = [batch, None, None]
        dims[tok], dims[feat] = tokens, features
        return tuple(dims)

    def names(tokens: str, features: str) -> str:
        return f"(B, {features}, {tokens})" if channels else f"(B, {tokens}, {features})"

    batch, nq, dk = q.shape[0], q.shape[tok], q.shape[feat]
    V.shape(_OP, "k", k, shaped(None, dk), names("Nk", "dk"))
    nk = k.shape[tok]
    V.shape(_OP, "v", v, shaped(nq if transpose else nk, None), names("Nq" if transpose else "Nk", "dv"))
    out_shape = shaped(nk if transpose else nq, v.shape[feat])
    out_names = names("Nk" if transpose else "Nq", "dv")
    for name, t in (("residual", residual), ("multiply", multiply)):
        if t is not None:
            V.tensor(_OP, name, t)
            V.shape(_OP, name, t, out_shape, out_names)
            V.same_device_dtype(_OP, q=q, **{name: t})
    if gamma is not None:
        V.scalar_param(_OP, "gamma", gamma, dtype_like=q)


# ---------------------------------------------------------------------------------------------
# reference backend: the N×N softmax materialised, in the input dtype (like the originals)
# ---------------------------------------------------------------------------------------------
@_op.register("reference")
def _reference(q, k, v, *, scale, transpose, gamma, residual, multiply, chunk_size, channels_first):
    attention = torch.softmax(scale * torch.bmm(q, k.transpose(1, 2)), dim=-1)   # (B, Nq, Nk)
    o = torch.bmm(attention.transpose(1, 2) if transpose else attention, v)
    return epilogue(o, gamma, residual, multiply)


# ---------------------------------------------------------------------------------------------
# torch backend: chunked over query rows, probabilities recomputed in backward
# ---------------------------------------------------------------------------------------------
def _scores(q_rows: torch.Tensor, k: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``scale · q_rows kᵀ`` (B, c, Nk) in ``dtype`` (k is already in ``dtype``)."""
    s = torch.bmm(q_rows.to(dtype), k.transpose(1, 2))
    return s.mul_(scale) if scale != 1.0 else s


def _row_logsumexp(q, k, scale, chunk, dtype) -> torch.Tensor:
    """log Σ_j exp(s q_i·k_j) for every query row, (B, Nq), one chunk of rows at a time."""
    lse = torch.empty(q.shape[0], q.shape[1], dtype=dtype, device=q.device)
    for start in range(0, q.shape[1], chunk):
        stop = min(start + chunk, q.shape[1])
        lse[:, start:stop] = torch.logsumexp(_scores(q[:, start:stop], k, scale, dtype), dim=-1)
    return lse


class _ChunkedAttention(torch.autograd.Function):
    """Memory-lean softmax attention. Saves q, k, v, (out) and the row log-sum-exp only."""

    @staticmethod
    def forward(ctx, q, k, v, scale, transpose, chunk, channels_first):
        dtype = accumulation_dtype(q.dtype)
        batch, nq, _ = q.shape
        nk, dv = k.shape[1], v.shape[2]
        n_out = nk if transpose else nq
        k_c, v_c = k.to(dtype), v.to(dtype)  # no copy for float32/float64
        # Token-major, allocated in the caller's memory layout (channel-first storage when asked).
        out = q.new_empty(batch, dv, n_out).transpose(1, 2) if channels_first else q.new_empty(batch, n_out, dv)
        if transpose:
            # Column accumulation needs each row's normaliser first: pass 1 computes the LSE,
            # pass 2 adds every chunk's Pᵀ v into the (B, Nk, dv) accumulator.
            lse = _row_logsumexp(q, k_c, scale, chunk, dtype)
            # Accumulated transposed, (B, dv, Nk) += v_rowsᵀ P: a wide GEMM output instead of a
            # tall (Nk, dv) one, about twice as fast on CPU for small dv.
            acc_t = torch.zeros(batch, dv, nk, dtype=dtype, device=q.device)
            for start in range(0, nq, chunk):
                stop = min(start + chunk, nq)
                p = _scores(q[:, start:stop], k_c, scale, dtype).sub_(lse[:, start:stop, None]).exp_()
                acc_t.baddbmm_(v_c[:, start:stop].transpose(1, 2), p)
            out.copy_(acc_t.transpose(1, 2))
            ctx.save_for_backward(q, k, v, lse)
        else:
            lse = torch.empty(batch, nq, dtype=dtype, device=q.device)
            for start in range(0, nq, chunk):
                stop = min(start + chunk, nq)
                s = _scores(q[:, start:stop], k_c, scale, dtype)
                row_max = s.amax(dim=-1, keepdim=True)
                p = s.sub_(row_max).exp_()                      # in place: one block per chunk
                denom = p.sum(dim=-1, keepdim=True)
                out[:, start:stop] = torch.bmm(p, v_c).div_(denom)
                lse[:, start:stop] = (row_max + denom.log()).squeeze(-1)
            ctx.save_for_backward(q, k, v, lse, out)
        ctx.scale, ctx.transpose, ctx.chunk = scale, transpose, chunk
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        scale, transpose, chunk = ctx.scale, ctx.transpose, ctx.chunk
        if transpose:
            q, k, v, lse = ctx.saved_tensors
        else:
            q, k, v, lse, out = ctx.saved_tensors
        dtype = lse.dtype
        batch, nq, _ = q.shape
        k_c, v_c = k.to(dtype), v.to(dtype)
        g = grad_out.to(dtype)                                                  # (B, n_out, dv)
        grad_q = torch.empty(q.shape, dtype=dtype, device=q.device)
        # Key/value gradients sum over every chunk; they are accumulated transposed, (B, d, Nk),
        # so each GEMM writes a wide block (a tall (Nk, dk) output with dk = C/8 is slow).
        grad_k_t = torch.zeros(batch, k.shape[2], k.shape[1], dtype=dtype, device=q.device)
        if transpose:
            grad_v = torch.empty(v.shape, dtype=dtype, device=q.device)
        else:
            grad_v_t = torch.zeros(batch, v.shape[2], v.shape[1], dtype=dtype, device=q.device)
        if not transpose:
            # D_i = Σ_j P_ij dP_ij = g_i · o_i: the softmax-backward row term, without P.
            row_term = (g * out.to(dtype)).sum(dim=-1)                       # (B, Nq)
        for start in range(0, nq, chunk):
            stop = min(start + chunk, nq)
            q_rows = q[:, start:stop].to(dtype)
            p = _scores(q_rows, k_c, scale, dtype).sub_(lse[:, start:stop, None]).exp_()  # (B, c, Nk)
            if transpose:
                # out = Pᵀ v: dv_i = Σ_j P_ij g_j, dP_ij = v_i·g_j, D_i = v_i · dv_i.
                grad_v_rows = torch.bmm(p, g)
                grad_v[:, start:stop] = grad_v_rows
                dp = torch.bmm(v_c[:, start:stop], g.transpose(1, 2))
                row = (v_c[:, start:stop] * grad_v_rows).sum(dim=-1, keepdim=True)
            else:
                # out = P v: dvᵀ += gᵀ P, dP = g vᵀ.
                g_rows = g[:, start:stop]
                grad_v_t.baddbmm_(g_rows.transpose(1, 2), p)
                dp = torch.bmm(g_rows, v_c.transpose(1, 2))
                row = row_term[:, start:stop, None]
            ds = dp.sub_(row).mul_(p)                                           # dS = P ⊙ (dP − D)
            if scale != 1.0:
                ds.mul_(scale)
            grad_q[:, start:stop] = torch.bmm(ds, k_c)
            grad_k_t.baddbmm_(q_rows.transpose(1, 2), ds)
        grad_k = grad_k_t.transpose(1, 2)
        if not transpose:
            grad_v = grad_v_t.transpose(1, 2)
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        return (grad_q.to(q.dtype) if need_q else None, grad_k.to(k.dtype) if need_k else None,
                grad_v.to(v.dtype) if need_v else None, None, None, None, None)


@_op.register("torch")
def _torch(q, k, v, *, scale, transpose, gamma, residual, multiply, chunk_size, channels_first):
    n_keys = k.shape[1]
    chunk = chunk_size or default_chunk_size(q.shape[0], q.shape[1], n_keys)
    o = _ChunkedAttention.apply(q, k, v, float(scale), transpose, chunk, channels_first)
    return epilogue(o, gamma, residual, multiply)


# ---------------------------------------------------------------------------------------------
# public entry point
# ---------------------------------------------------------------------------------------------
@B.autocast_entry()
def position_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float = 1.0, transpose: bool = False,
                       layout: str = "tokens", gamma: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                       multiply: Optional[Tensor] = None, chunk_size: Optional[int] = None,
                       backend: Optional[str] = None) -> Tensor:
    r"""Softmax attention over tokens, never storing the N×N matrix (except on ``reference``).

    ``o_i = Σ_j softmax_j(scale · q_i·k_j) v_j`` — DANet's position attention module (PAM, Fu et
    al., CVPR 2019), non-local blocks, cross-attention. With ``transpose=True``,
    ``o_j = Σ_i A_ij v_i`` with ``A_ij = softmax_j(scale · q_i·k_j)``: the ``V @ A`` of the
    position attention of Multi-Scale Guided Attention (Sinha & Dolz 2020), which multiplies by the
    row-normalised A without transposing it. Then the optional epilogue
    ``out = gamma · (o ⊙ multiply) + residual``: DANet's ``γ·o + x`` and the guided attention's
    multiplicative ``o ⊙ f``.

    Args:
        q, k, v: ``layout="tokens"``: (B, Nq, dk), (B, Nk, dk), (B, Nk, dv) [transpose: v (B, Nq, dv)];
            ``layout="channels"``: (B, dk, Nq), (B, dk, Nk), (B, dv, Nk) [transpose: v (B, dv, Nq)].
            One floating dtype and device, any strides. Heads go into B; dk ≠ dv and Nq ≠ Nk
            are allowed.
        scale: multiplies the scores (1 for DANet, 1/√dk for transformer attention).
        transpose: ``o = Aᵀ v`` instead of ``A v`` (see above).
        layout: ``"tokens"`` (token-major) or ``"channels"`` (channel-first, as 1×1 conv outputs
            come, read through strides, never copied; the output is written channel-first).
        gamma: 0-dim or (1,) tensor, DANet's learnable output scale, or None.
        residual, multiply: tensors with the output's shape in the chosen layout, or None.
        chunk_size: query rows per block on the ``torch`` and ``cpp`` backends (default: a
            16 MiB score block on ``torch``, 64 rows on ``cpp``).
        backend: force a backend for this call (``"reference"``, ``"torch"``, ``"cpp"``,
            ``"triton"``); default: the one in force (see :mod:`medattn_fast.backend`).

    Returns:
        (B, Nq, dv) for tokens [(B, Nk, dv) with transpose], (B, dv, Nq) for channels
        [(B, dv, Nk) with transpose], in the input dtype (float16/bfloat16 accumulate in float32).
    """
    _check(q, k, v, scale, transpose, layout, gamma, residual, multiply, chunk_size)
    channels_first = layout == "channels"
    if channels_first:
        # Token-major *views* of channel-first tensors: strides, not copies.
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        residual = residual.transpose(1, 2) if residual is not None else None
        multiply = multiply.transpose(1, 2) if multiply is not None else None
    out = _op(q, k, v, scale=scale, transpose=transpose, gamma=gamma, residual=residual,
              multiply=multiply, chunk_size=chunk_size, channels_first=channels_first, backend=backend)
    return out.transpose(1, 2) if channels_first else out
