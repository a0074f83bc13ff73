"""Shared test fixtures for modules with batch norms."""
from __future__ import annotations

from typing import Optional

import torch


def randomize_batch_norms(module: torch.nn.Module, *, batches_tracked: Optional[int] = 3) -> torch.nn.Module:
    """Give every BatchNorm in ``module`` a non-trivial state, in place: γ, β and the running mean
    drawn from N(0, 1), the running variance from U(0.5, 1.5) (one draw each, in that order, from
    the default generator), the batch counter set to ``batches_tracked`` (None: left alone). The
    defaults (γ=1, β=0, μ=0, σ²=1) would hide a wrong fold or a missing running-stat update."""
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.weight.normal_()
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 1.5)
                if batches_tracked is not None:
                    m.num_batches_tracked.fill_(batches_tracked)
    return module


def grads_or_zeros(out, tensors, cotangent):
    """``torch.autograd.grad`` of ``out`` against ``tensors`` with ``cotangent``; zeros for an unused input."""
    grads = torch.autograd.grad(out, tensors, cotangent, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, tensors)]


def window_params(C, heads, head_dim, Co, *, biases=True, dtype=torch.float64):
    """Random window-attention weights (float64, requiring grad): the q/k/v projections (A, C) with
    their biases (A,), the output projection (Co, A) and its bias; biases None when ``biases=False``."""
    A = heads * head_dim

    def p(*shape):
        return torch.randn(*shape, dtype=dtype, requires_grad=True)

    return [p(A, C), p(A) if biases else None, p(A, C), p(A) if biases else None, p(A, C),
            p(A) if biases else None, p(Co, A), p(Co) if biases else None]


def external_params(C, heads, head_dim, S, Co, dtype=torch.float64):
    """Random external-attention weights (requiring grad): the query projection (A, C) and bias, the
    key memory (S, head_dim) and bias (S,), the value memory (head_dim, S) and bias, the output
    projection (Co, A) and bias."""
    A = heads * head_dim

    def p(*shape):
        return torch.randn(*shape, dtype=dtype, requires_grad=True)

    return [p(A, C), p(A), p(S, head_dim), p(S), p(head_dim, S), p(head_dim), p(Co, A), p(Co)]
