"""Benchmark cases of window attention (MT-UNet WinAttention).

Shapes are MT-UNet's mixed-transformer levels, 4×4 windows, 8 heads. At 224² input: 28² tokens
with C = 256 (encoder 0, no padding) and C = 512 (decoder 1), 14² with C = 512 (encoder 1 and
decoder 0: padded to 16², the original's zeros + copied corner), 7² with C = 1024 (bottleneck:
padded to 8²); the 56² map with C = 256 is the first level at 448² input (the stem maps an image to
side/8 with 256 channels). CUDA: the training batch B = 12, float32 and bfloat16; CPU: B = 2, the
two smallest rows. Every provider maps tokens (B, N, C) to the original's windowed output
(B, p, p, 16, C) with one shared set of weights (the reference module's).

Providers: ``reference`` (the seed-faithful ``WinAttention`` module), ``torch`` / ``triton`` /
``auto`` (:func:`medattn_fast.functional.window_attention` forced to the torch / triton backend, or
on the default choice; triton is reported unavailable on CPU), ``compile`` (``torch.compile`` of
the reference module), ``sdpa`` (a peer: pad, partition the grid into windows with a permute copy,
one q/k/v GEMM, ``F.scaled_dot_product_attention`` over (B·windows, heads, 16, d), heads merged
back with a copy, output GEMM — every copy inside the timed callable).

``gpu_check_cases(device, tiny)`` (``bench/gpu_check.sh``): MT-UNet's ``WinAttention`` at its B=12
levels (28² C=256, 14² C=512, 7² C=1024), the drop-in on ``triton`` vs the original
(``tiny``: B=1 4² C=16, the CPU dry run).
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn.functional as F

import medattn_fast.functional as MF
from bench.harness import Case, token_block_check_case
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

        def sdpa(x):
            grid = x.view(batch, side, side, dim)
            pad = (-side) % WINDOW
            if pad:   # the original's padding: [x | 0] over [0 | x's last pad×pad block]
                bottom = F.pad(grid[:, side - pad:, side - pad:], (0, 0, side, 0))
                grid = torch.cat((F.pad(grid, (0, 0, 0, pad)), bottom), dim=1)
            p = grid.shape[1] // WINDOW
            windows = (grid.view(batch, p, WINDOW, p, WINDOW, dim).permute(0, 1, 3, 2, 4, 5)
                       .reshape(batch * p * p, WINDOW * WINDOW, dim))                     # partition copy
            heads_dim = dim // HEADS
            qkv_weight = torch.cat((a.query_layer.weight, a.key_layer.weight, a.value_layer.weight))
            qkv_bias = torch.cat((a.query_layer.bias, a.key_layer.bias, a.value_layer.bias))
            qkv = F.linear(windows, qkv_weight, qkv_bias).view(-1, WINDOW * WINDOW, 3, HEADS, heads_dim)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                                 # (B·p², heads, L, d)
            o = F.scaled_dot_product_attention(q, k, v)
            o = o.transpose(1, 2).reshape(batch, p, p, WINDOW * WINDOW, dim)               # merge heads copy
            return F.linear(o, a.out.weight, a.out.bias)

        x = torch.randn(batch, side * side, dim, device=device, dtype=dtype, requires_grad=True)
        providers: Dict[str, Callable] = {
            "reference": ref.forward,
            "torch": functional("torch"),
            "compile": torch.compile(ref),
            "auto": functional(None),
            "triton": functional("triton"),
            "sdpa": sdpa,
        }
        return (x,), providers

    return setup


CPU_ROWS = ((2, 28, 256, "MT-UNet encoder 0"), (2, 14, 512, "MT-UNet encoder 1, padded to 16²"))
CUDA_ROWS = (
    (12, 56, 256, "MT-UNet level 0 at 448² input"),
    (12, 28, 256, "MT-UNet encoder 0 at 224²"),
    (12, 28, 512, "MT-UNet decoder 1 at 224²"),
    (12, 14, 512, "MT-UNet encoder 1 / decoder 0 at 224², padded to 16²"),
    (12, 7, 1024, "MT-UNet bottleneck at 224², padded to 8²"),
)


def cases(device: torch.device) -> list:
    on_cuda = device.type == "cuda"
    dtypes = (torch.float32, torch.bfloat16) if on_cuda else (torch.float32,)
    return [
        Case(op="window", shape=f"B={b} C={c} {s}x{s} ws={WINDOW} heads={HEADS}", setup=_setup(b, s, c),
             flops=_flops(b, s, c), dtypes=dtypes, devices=(device.type,), note=note)
        for b, s, c, note in (CUDA_ROWS if on_cuda else CPU_ROWS)
    ]


def gpu_check_cases(device: torch.device, tiny: bool = False) -> list:
    """The GPU check's window rows (``tiny``: toy shapes for the CPU dry run)."""
    def flops(b, side, c):   # q/k/v and output projections, q·kᵀ and p·v in each 16-token window
        tokens = b * (-(-side // WINDOW) * WINDOW) ** 2
        return tokens * (8.0 * c * c + 4.0 * WINDOW * WINDOW * c)

    shapes = [(1, 4, 16)] if tiny else [(12, 28, 256), (12, 14, 512), (12, 7, 1024)]   # (B, side, C)
    return [token_block_check_case(device, "window", f"window B={b} {side}x{side} C={c} ws=4 h=8",
                                   lambda c=c: WinAttention({"win_size": WINDOW, "head": HEADS}, c),
                                   b, side * side, c, flops(b, side, c), tiny)
            for b, side, c in shapes]
