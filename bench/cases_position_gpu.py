"""GPU benchmark cases of position attention at DANet head sizes, with the peers.

B=8, C=512 (dk = C/8 = 64, dv = 512), feature maps 32², 64², 128² and 32³ (N = 1024 … 32768);
float32 and bfloat16; CUDA only (``python -m bench.run --op position_gpu``).

Every provider computes DANet's PAM from the same x and the same 1×1 projections (written as
Conv1d over the flattened positions, so 2-D and 3-D maps share one code path):
``out = γ · softmax(q kᵀ) v + x`` with channel-first q, k, v.

Providers: ``reference`` (the materialising op backend: the original's arithmetic; it runs out of
memory at 128²/32³ in fwd+bwd, recorded as an error row), ``compile`` (``torch.compile`` of it),
``torch`` (chunked, recomputing backward), ``sdpa`` (``F.scaled_dot_product_attention`` restricted
to the memory-efficient backend, which accepts dk ≠ dv), ``flex`` (``flex_attention`` compiled),
``triton`` (the fused kernels, epilogue included).
"""
from __future__ import annotations

from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from bench.harness import Case
from medattn_fast.ops.position import position_attention

BATCH, CHANNELS = 8, 512
SIZES = [(32, 32), (64, 64), (128, 128), (32, 32, 32)]


def _flops(batch: int, channels: int, n: int) -> float:
    dk, dv = channels // 8, channels
    projections = 2.0 * n * channels * (2 * dk + dv)
    return batch * (projections + 2.0 * n * n * dk + 2.0 * n * n * dv + 5.0 * n * n)


def _setup(size):
    def setup(device: torch.device, dtype: torch.dtype):
        n = 1
        for s in size:
            n *= s
        dk = CHANNELS // 8
        proj_q = torch.nn.Conv1d(CHANNELS, dk, 1).to(device=device, dtype=dtype)
        proj_k = torch.nn.Conv1d(CHANNELS, dk, 1).to(device=device, dtype=dtype)
        proj_v = torch.nn.Conv1d(CHANNELS, CHANNELS, 1).to(device=device, dtype=dtype)
        gamma = torch.full((1,), 0.5, device=device, dtype=dtype, requires_grad=True)
        x = torch.randn(BATCH, CHANNELS, n, device=device, dtype=dtype, requires_grad=True)

        def projections(x):
            return proj_q(x), proj_k(x), proj_v(x)           # (B, dk, N), (B, dk, N), (B, C, N)

        def with_backend(backend: str) -> Callable:
            def run(x):
                q, k, v = projections(x)
                return position_attention(q, k, v, layout="channels", gamma=gamma, residual=x, backend=backend)
            return run

        def sdpa(x):
            from torch.nn.attention import SDPBackend, sdpa_kernel

            q, k, v = (t.transpose(1, 2).unsqueeze(1) for t in projections(x))   # (B, 1, N, d)
            with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                o = F.scaled_dot_product_attention(q, k, v, scale=1.0)
            return gamma * o.squeeze(1).transpose(1, 2) + x

        from torch.nn.attention.flex_attention import flex_attention

        flex_compiled = torch.compile(flex_attention)

        def flex(x):
            q, k, v = (t.transpose(1, 2).unsqueeze(1) for t in projections(x))
            o = flex_compiled(q, k, v, scale=1.0)
            return gamma * o.squeeze(1).transpose(1, 2) + x

        reference = with_backend("reference")
        providers: Dict[str, Callable] = {
            "reference": reference,
            "compile": torch.compile(reference),
            "torch": with_backend("torch"),
            "sdpa": sdpa,
            "flex": flex,
            "triton": with_backend("triton"),
        }
        return (x,), providers

    return setup


def cases(device: torch.device) -> List[Case]:
    rows = []
    for size in SIZES:
        n = 1
        for s in size:
            n *= s
        rows.append(Case(op="position_attention", shape=f"PAM B={BATCH} C={CHANNELS} " + "x".join(map(str, size)),
                         setup=_setup(size), flops=_flops(BATCH, CHANNELS, n),
                         dtypes=(torch.float32, torch.bfloat16), devices=("cuda",),
                         note="N x N reference/compile rows run out of memory at the large maps"))
    return rows

