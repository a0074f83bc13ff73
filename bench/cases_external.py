"""Benchmark cases of external attention (DESIGN.md op 6; MT-UNet MEAttention).

Shapes are MT-UNet's mixed-transformer levels at 224² input: B = 2, N = 784 tokens (28²) with
C = 256 and N = 196 (14²) with C = 512; 32 heads (4 · 8), memories of 64 slots, expansion 4.

Providers: ``reference`` (the seed-faithful ``MEAttention`` module), ``torch`` / ``auto``
(:func:`medattn_fast.functional.external_attention` forced to the torch backend / on the default
choice), ``compile`` (``torch.compile`` of the reference module). One shared set of weights.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch

import medattn_fast.functional as MF
from bench.harness import Case
from medattn_fast.reference.mtunet import MTUNET_CONFIGS, MEAttention


def _flops(batch: int, tokens: int, dim: int, slots: int = 64, expansion: int = 4) -> float:
    inner = expansion * dim
    # query projection, both memories (per head d·S, heads·d = inner), output projection
    return 2.0 * batch * tokens * (dim * inner + 2 * inner * slots + inner * dim)


def _setup(batch: int, tokens: int, dim: int):
    def setup(device: torch.device, dtype: torch.dtype):
        ref = MEAttention(dim, MTUNET_CONFIGS).to(device=device, dtype=dtype)
        weights = (ref.query_liner.weight, ref.query_liner.bias, ref.linear_0.weight, ref.linear_0.bias,
                   ref.linear_1.weight, ref.linear_1.bias, ref.proj.weight, ref.proj.bias)

        def functional(backend):
            def run(x):
                return MF.external_attention(x, *weights, num_heads=ref.num_heads, backend=backend)
            return run

        x = torch.randn(batch, tokens, dim, device=device, dtype=dtype, requires_grad=True)
        providers: Dict[str, Callable] = {
            "reference": ref.forward,
            "torch": functional("torch"),
            "compile": torch.compile(ref),
            "auto": functional(None),
        }
        return (x,), providers

    return setup


def cases(device: torch.device) -> list:
    return [
        Case(op="external", shape=f"B={b} N={n} C={c} heads=32 S=64", setup=_setup(b, n, c), flops=_flops(b, n, c),
             note=note)
        for b, n, c, note in ((2, 784, 256, "MT-UNet encoder 0 (28²)"), (2, 196, 512, "MT-UNet encoder 1 (14²)"))
    ]
