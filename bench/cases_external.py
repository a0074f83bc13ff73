"""Benchmark cases of external attention (MT-UNet MEAttention).

Shapes are MT-UNet's mixed-transformer levels; 32 heads (4 · 8), memories of 64 slots, expansion 4
(head dim = C/8). At 224² input: N = 784 tokens (28²) with C = 256 (encoder 0) and C = 512
(decoder 1), N = 196 (14²) with C = 512, N = 49 (7²) with C = 1024 (bottleneck); N = 3136 (56²)
with C = 256 is the first level at 448² input. CUDA: the training batch B = 12, float32 and
bfloat16; CPU: B = 2, the 28²/C=256 and 14²/C=512 rows.

Providers: ``reference`` (the seed-faithful ``MEAttention`` module), ``torch`` / ``triton`` /
``auto`` (:func:`medattn_fast.functional.external_attention` forced to the torch / triton backend,
or on the default choice; triton is reported unavailable on CPU), ``compile`` (``torch.compile`` of
the reference module). One shared set of weights.

``gpu_check_cases(device, tiny)`` (``bench/gpu_check.sh``): MT-UNet's ``MEAttention`` at its B=12
levels (N=784 C=256, N=196 C=512, N=49 C=1024), the drop-in on ``triton`` vs the original
(``tiny``: B=1 N=4 C=16, the CPU dry run).
"""
from __future__ import annotations

from typing import Callable, Dict

import torch

import medattn_fast.functional as MF
from bench.harness import Case, token_block_check_case
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
            "triton": functional("triton"),
        }
        return (x,), providers

    return setup


CPU_ROWS = ((2, 784, 256, "MT-UNet encoder 0 (28²)"), (2, 196, 512, "MT-UNet encoder 1 (14²)"))
CUDA_ROWS = (
    (12, 3136, 256, "MT-UNet level 0 at 448² input (56²)"),
    (12, 784, 256, "MT-UNet encoder 0 at 224² (28²)"),
    (12, 784, 512, "MT-UNet decoder 1 at 224² (28²)"),
    (12, 196, 512, "MT-UNet encoder 1 / decoder 0 at 224² (14²)"),
    (12, 49, 1024, "MT-UNet bottleneck at 224² (7²)"),
)


def cases(device: torch.device) -> list:
    on_cuda = device.type == "cuda"
    dtypes = (torch.float32, torch.bfloat16) if on_cuda else (torch.float32,)
    return [
        Case(op="external", shape=f"B={b} N={n} C={c} heads=32 S=64", setup=_setup(b, n, c), flops=_flops(b, n, c),
             dtypes=dtypes, devices=(device.type,), note=note)
        for b, n, c, note in (CUDA_ROWS if on_cuda else CPU_ROWS)
    ]


def gpu_check_cases(device: torch.device, tiny: bool = False) -> list:
    """The GPU check's external-attention rows (``tiny``: toy shapes for the CPU dry run)."""
    def flops(b, n, c, slots=64, inner_per_channel=4):   # MEAttention: in/out Linear, x·M_kᵀ, a·M_vᵀ
        inner = inner_per_channel * c
        return 2.0 * b * n * (c * inner + 2 * inner * slots + inner * c)

    shapes = [(1, 4, 16)] if tiny else [(12, 784, 256), (12, 196, 512), (12, 49, 1024)]   # (B, N, C)
    return [token_block_check_case(device, "external", f"external B={b} N={n} C={c}",
                                   lambda c=c: MEAttention(c, MTUNET_CONFIGS), b, n, c, flops(b, n, c), tiny)
            for b, n, c in shapes]
