"""The public functional API: one function per op, with its math and shapes.

Every function accepts float32, float16, bfloat16 (and float64 on the ``reference``, ``torch``
and ``cpp`` backends), accumulates in float32 and returns the input dtype. Bad input raises
``ValueError``/``TypeError`` naming the argument, the expected and the received shape, before any
kernel launch. The backend is chosen per call (see :mod:`medattn_fast.backend`); pass
``backend=`` to force one for a single call.

Each function forwards to its op family in :mod:`medattn_fast.ops`, where the backends live.
"""
from __future__ import annotations

from .ops import attention_gate as _gate
from .ops import channel as _channel
from .ops import external as _external
from .ops import gaussian_axial as _gaussian
from .ops import position as _position
from .ops import window as _window
from .ops.attention_gate import BatchNormParams  # noqa: F401  (the BN state attention_gate takes)

__all__ = [
    "position_attention",
    "channel_attention",
    "gaussian_axial_attention",
    "gaussian_axial_from_scores",
    "window_attention",
    "external_attention",
    "attention_gate",
    "BatchNormParams",
]


# ---------------------------------------------------------------------------------------------
# position attention (DANet PAM, non-local, cross-attention)
# ---------------------------------------------------------------------------------------------
def position_attention(q, k, v, *, scale=1.0, transpose=False, **kwargs):
    r"""Softmax attention over tokens without the N×N matrix (DESIGN.md op 2).

    ``o_i = Σ_j softmax_j(scale · q_i·k_j) v_j``

    Shapes: q (B, Nq, dk), k (B, Nk, dk), v (B, Nk, dv) -> (B, Nq, dv). dk ≠ dv and Nq ≠ Nk are
    allowed; heads go into the batch dimension. ``transpose=True`` is seed 001's ``V @ A``:
    ``o_j = Σ_i A_ij v_i`` with A row-softmaxed (needs Nq == Nk).
    See :func:`medattn_fast.ops.position.position_attention` for the layout and epilogue keywords.
    """
    return _position.position_attention(q, k, v, scale=scale, transpose=transpose, **kwargs)


# ---------------------------------------------------------------------------------------------
# channel attention (DANet CAM)
# ---------------------------------------------------------------------------------------------
def channel_attention(x, *, negate=True, **kwargs):
    r"""C×C channel attention (DESIGN.md op 3).

    ``E = X Xᵀ`` (C×C, contraction over the N = prod(S) positions, accumulated in float32),
    ``A = softmax(−E)`` (``negate=True``, DANet: equals ``softmax(rowmax(E) − E)``) or
    ``softmax(E)`` (``negate=False``, seed 001), ``o = A X``.

    Shapes: x (B, C, *S) -> (B, C, *S). Epilogue keywords: see
    :func:`medattn_fast.ops.channel.channel_attention`.
    """
    return _channel.channel_attention(x, negate=negate, **kwargs)


# ---------------------------------------------------------------------------------------------
# Gaussian-weighted axial attention (MT-UNet GaussianTrans)
# ---------------------------------------------------------------------------------------------
def gaussian_axial_attention(q, k, v, shift, **kwargs):
    r"""Gaussian-weighted axial attention from q, k, v (DESIGN.md op 4).

    ``o[r,c] = Σ_j softmax_j(q[r,c]·k[r,j] − θ(j−c)²) v[r,j]
             + Σ_i softmax_i(q[r,c]·k[i,c] − θ(i−r)²) v[i,c]``,  θ = ``shift``.

    Shapes: q, k, v (B, H, W, D); shift 0-dim or (1,) -> (B, H, W, D). H ≠ W allowed.
    """
    return _gaussian.gaussian_axial_attention(q, k, v, shift, **kwargs)


def gaussian_axial_from_scores(atten_x, atten_y, v, shift, **kwargs):
    r"""Gaussian-weighted axial attention from precomputed scores (GaussianTrans's interface).

    ``o[r,c] = Σ_j softmax_j(atten_x[r,c,j] − θ(j−c)²) v[r,j]
             + Σ_i softmax_i(atten_y[c,r,i] − θ(i−r)²) v[i,c]``

    Shapes: atten_x (B, H, W, W), atten_y (B, W, H, H), v (B, H, W, D); shift 0-dim or (1,)
    -> (B, H, W, D).
    """
    return _gaussian.gaussian_axial_from_scores(atten_x, atten_y, v, shift, **kwargs)


# ---------------------------------------------------------------------------------------------
# window attention (MT-UNet WinAttention, Swin-like)
# ---------------------------------------------------------------------------------------------
def window_attention(x, *args, **kwargs):
    r"""Multi-head attention inside ws×ws windows, then the output projection (DESIGN.md op 5).

    See :func:`medattn_fast.ops.window.window_attention` for the full signature and shapes.
    """
    return _window.window_attention(x, *args, **kwargs)


# ---------------------------------------------------------------------------------------------
# external attention (MT-UNet MEAttention, EANet)
# ---------------------------------------------------------------------------------------------
def external_attention(x, *args, **kwargs):
    r"""External attention with two memory units, softmax over tokens, then slot normalisation
    (DESIGN.md op 6). See :func:`medattn_fast.ops.external.external_attention`.
    """
    return _external.external_attention(x, *args, **kwargs)


# ---------------------------------------------------------------------------------------------
# attention gate (Attention U-Net)
# ---------------------------------------------------------------------------------------------
def attention_gate(x, g, *args, **kwargs):
    r"""Additive attention gate (DESIGN.md op 1):
    ``α = σ(BN_ψ(w_ψ·relu(BN_x(W_x·x) + up(BN_g(W_g·g)))))``, ``out = α ⊙ x``.

    See :func:`medattn_fast.ops.attention_gate.attention_gate` for the full signature.
    """
    return _gate.attention_gate(x, g, *args, **kwargs)
