r"""External attention (MT-UNet ``MEAttention``, EANet).

Two learnable memories shared by every token replace the keys and values of self-attention, so the
cost is linear in the number of tokens N. Per head h (width d, memory of S slots)::

    q_h = (x W_qᵀ + b_q)[..., h·d:(h+1)·d]                     (B, N, d)
    a   = q_h M_kᵀ + b_k                                        (B, N, S)
    a   = softmax over the TOKENS (dim N)                       ("double normalisation", step 1)
    a   = a / (1e-9 + Σ_S a)                                    (step 2, over the memory slots)
    y_h = a M_vᵀ + b_v                                          (B, N, d)
    out = concat_h(y_h) W_oᵀ + b_o                              (B, N, Co)

M_k, M_v are shared across heads (MT-UNet: d = dim/head, S = 64). ``b_q`` and ``b_k`` have no
effect on the output (each adds a per-slot constant over the tokens the softmax runs over); they are
accepted so checkpoints' parameters keep their places, and their gradients are 0.

Backends: ``reference`` (a loop over heads, the original's math), ``torch`` (vectorised: heads stay a
dimension of the (B, N, heads, d) view of the projection — no permute copies — and every step is
one batched op), ``triton`` (``_external_triton.py``: the Linear GEMMs around fused kernels
that never store the N × S matrix; preferred by ``auto`` on CUDA).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import backend as B
from . import _validate as V
from ._families import dispatcher

__all__ = ["external_attention"]

_OP = "external_attention"
_op = dispatcher(_OP)   # its row in ops/_families.py: auto orders, export backend, limits

# The original's guard against a memory slot column that sums to zero.
SLOT_EPS = 1e-9


def _check(x, query_weight, query_bias, key_memory, key_bias, value_memory, value_bias, proj_weight,
           proj_bias, num_heads):
    V.tensor(_OP, "x", x, 3)
    V.positive_int(_OP, "num_heads", num_heads)
    # each matrix, then its bias
    A = V.head_projection(_OP, "query_weight", query_weight, x.shape[2], num_heads)
    V.optional_vectors(_OP, ("query_bias", query_bias, A))
    d = A // num_heads
    V.tensor(_OP, "key_memory", key_memory, 2)
    V.shape(_OP, "key_memory", key_memory, ("S", d), names="(S, d)")
    S = key_memory.shape[0]
    V.optional_vectors(_OP, ("key_bias", key_bias, S))
    V.tensor(_OP, "value_memory", value_memory, 2)
    V.shape(_OP, "value_memory", value_memory, (d, S), names="(d, S)")
    V.optional_vectors(_OP, ("value_bias", value_bias, d))
    V.optional_vectors(_OP, ("proj_bias", proj_bias, V.head_output(_OP, "proj_weight", proj_weight, A)))
    V.same_device_dtype(_OP, x=x, query_weight=query_weight, query_bias=query_bias, key_memory=key_memory,
                        key_bias=key_bias, value_memory=value_memory, value_bias=value_bias,
                        proj_weight=proj_weight, proj_bias=proj_bias)


@_op.register("reference")
def _reference(x, query_weight, query_bias, key_memory, key_bias, value_memory, value_bias, proj_weight,
               proj_bias, *, num_heads):
    """The original's math, one head at a time."""
    q = F.linear(x, query_weight, query_bias)  # (B, N, heads·d)
    d = q.shape[-1] // num_heads
    heads = []
    for h in range(num_heads):
        a = torch.matmul(q[..., h * d:(h + 1) * d], key_memory.t())  # (B, N, S)
        if key_bias is not None:
            a = a + key_bias
        a = torch.softmax(a, dim=-2)  # over the tokens
        a = a / (SLOT_EPS + a.sum(dim=-1, keepdim=True))  # over the memory slots
        y = torch.matmul(a, value_memory.t())  # (B, N, d)
        if value_bias is not None:
            y = y + value_bias
        heads.append(y)
    return F.linear(torch.cat(heads, dim=-1), proj_weight, proj_bias)


@_op.register("torch")
def _torch(x, query_weight, query_bias, key_memory, key_bias, value_memory, value_bias, proj_weight,
           proj_bias, *, num_heads):
    """Vectorised: the (B, N, heads, d) view of the projection is contracted with the shared
    memories directly, so heads never leave their place in memory."""
    Bn, N, _ = x.shape
    q = F.linear(x, query_weight, query_bias).unflatten(-1, (num_heads, -1))  # (B, N, heads, d) view
    a = F.linear(q, key_memory, key_bias)  # (B, N, heads, S)
    # Both normalisations accumulate in float32 for half inputs (a sum over N = 784+ tokens).
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    a = torch.softmax(a, dim=1, dtype=acc)  # over the tokens
    a = (a / (SLOT_EPS + a.sum(dim=-1, keepdim=True))).to(x.dtype)
    y = F.linear(a, value_memory, value_bias)  # (B, N, heads, d)
    return F.linear(y.reshape(Bn, N, -1), proj_weight, proj_bias)


@B.autocast_entry()
def external_attention(x: torch.Tensor, query_weight: torch.Tensor, query_bias: Optional[torch.Tensor],
                       key_memory: torch.Tensor, key_bias: Optional[torch.Tensor], value_memory: torch.Tensor,
                       value_bias: Optional[torch.Tensor], proj_weight: torch.Tensor,
                       proj_bias: Optional[torch.Tensor], *, num_heads: int,
                       backend: Optional[str] = None) -> torch.Tensor:
    r"""Multi-head external attention with double normalisation: MT-UNet's ``MEAttention`` (Wang et
    al., ICASSP 2022), after EANet's external attention (Guo et al., "Beyond Self-attention:
    External Attention using Two Linear Layers", 2021). Linear in the number of tokens N.

    Per head h: ``a = softmax_N(q_h M_kᵀ + b_k)``, ``a ← a / (1e-9 + Σ_S a)``,
    ``y_h = a M_vᵀ + b_v``; ``out = concat_h(y_h) W_oᵀ + b_o`` with ``q = x W_qᵀ + b_q`` split
    into ``num_heads`` heads of width d. Every weight is in ``nn.Linear`` layout (out, in).

    Args:
        x: tokens (B, N, C).
        query_weight, query_bias: (heads·d, C), (heads·d,) or None — ``MEAttention.query_liner``.
        key_memory, key_bias: (S, d), (S,) or None — ``MEAttention.linear_0`` (shared by all heads).
        value_memory, value_bias: (d, S), (d,) or None — ``MEAttention.linear_1``.
        proj_weight, proj_bias: (Co, heads·d), (Co,) or None — ``MEAttention.proj``.
        num_heads: number of heads (MT-UNet: 4 · configs["head"] = 32).
        backend: force a backend for this call (``"reference"``, ``"torch"``, ``"triton"``); default: the
            one in force.

    Returns:
        (B, N, Co), dtype of x.

    ``query_bias`` and ``key_bias`` cannot change the output (their gradients are 0).
    """
    _check(x, query_weight, query_bias, key_memory, key_bias, value_memory, value_bias, proj_weight, proj_bias,
           num_heads)
    return _op(x, query_weight, query_bias, key_memory, key_bias, value_memory, value_bias, proj_weight,
               proj_bias, num_heads=num_heads, backend=backend)
