"""Benchmark cases of window attention (DESIGN.md op 5; MT-UNet WinAttention).

Shapes are MT-UNet's mixed-transformer levels at 224² input: 4×4 windows, 8 heads, on the 28² map
with C = 256 (encoder 0, no padding) and on the 14² map with C = 512 (encoder 1: padded to 16², the
original's zeros + copied corner). Every provider maps tokens (B, N, C) to the original's windowed
output (B, p, p, 16, C) with one shared set of weights (the reference module's).

Providers: ``reference`` (the seed-faithful ``WinAttention`` module), ``torch`` / ``auto``
(:func:`medattn_fast.functional.window_attention` forced to the torch backend / on the default
choice), ``compile`` (``torch.compile`` of the reference module).
"""
from __future__ import annotations

from typing import Callable, Dict

import torch

import medattn_fast.functional as MF
from bench.harness import Case
from medattn_fast.ops.window import padded_size
from medattn_fast.reference.mtunet import WinAttention

WINDOW, HEADS = 4, 8


def _flops(batch: int, side: int, dim: int) -> float:
    tokens = batch * padded_size(side, WINDOW) ** 2
    window_tokens = WINDOW * WINDOW
    # q/k/v projections, q·kᵀ and p·v inside each window, output projection
    return 2.0 * tokens * dim * 3 * dim + 2.0 * 2 * tokens * window_tokens * dim + 2.0 * tokens * dim * dim


def _setup(batch: int, side: int, dim: int):
    def setup(device: torch.device, dtype: torch.dtype):
        ref = WinAttention({"win_size": WINDOW, "head": HEADS}, dim).to(device=device, dtype=dtype)
        a = ref.attention
        weights = (a.query_layer.weight, a.query_layer.bias, a.key_layer.weight, a.key_layer.bias,
                   a.value_layer.weight, a.value_layer.bias, a.out.weight, a.out.bias)

        def functional(backend):
            def run(x):
                return MF.window_attention(x.view(batch, side, side, dim), *weights, window_size=WINDOW,
                                           num_heads=HEADS, pad_mode="mtunet", layout="windows", backend=backend)
            return run

        x = torch.randn(batch, side * side, dim, device=device, dtype=dtype, requires_grad=True)
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
        Case(op="window", shape=f"B={b} C={c} {s}x{s} ws={WINDOW} heads={HEADS}", setup=_setup(b, s, c),
             flops=_flops(b, s, c), note=note)
        for b, s, c, note in ((2, 28, 256, "MT-UNet encoder 0"), (2, 14, 512, "MT-UNet encoder 1, padded to 16²"))
    ]
