"""Benchmark cases of position attention.

* DANet's ``PAM_Module`` at the head of DANet on a 96×96 feature map (B=2, C=64, N=9216; the
  issue's acceptance row: fwd+bwd peak memory of the fast module under 25% of the original's).
* Multi-Scale Guided Attention's ``PositionAttentionModule`` (the ``V @ A`` variant, transpose=True) at 64×64.

Providers: ``reference`` (the original module), ``torch`` / ``auto`` (the compat module forced to
the torch backend / on the default choice), ``compile`` (``torch.compile`` of the reference),
``sdpa`` (the same convs + ``F.scaled_dot_product_attention``, a peer; DANet layout only), ``triton``
(the compat module forced to the fused kernels; CUDA), ``cpp`` (forced to the C++ CPU kernels). All share
the reference module's parameter objects.
"""
from __future__ import annotations

from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from bench.harness import Case, with_backend
from medattn_fast.compat.danet import PAM_Module as FastPAM
from medattn_fast.compat.guided_attention import PositionAttentionModule as FastPosition
from medattn_fast.reference.danet import PAM_Module
from medattn_fast.reference.guided_attention import PositionAttentionModule


def _attention_flops(batch: int, channels: int, n: int) -> float:
    dk, dv = channels // 8, channels
    projections = 2.0 * n * channels * (2 * dk + dv)
    scores_and_mix = 2.0 * n * n * dk + 2.0 * n * n * dv + 5.0 * n * n   # QKᵀ, A·V, softmax
    return batch * (projections + scores_and_mix)


def _dtypes(device: torch.device):
    return (torch.float32,) if device.type == "cpu" else (torch.float32, torch.bfloat16, torch.float16)


def _setup_pam(batch: int, channels: int, size):
    def setup(device: torch.device, dtype: torch.dtype):
        ref = PAM_Module(channels).to(device=device, dtype=dtype)
        with torch.no_grad():
            ref.gamma.fill_(0.5)   # gamma = 0 (its init) would hide the attention from the error column
        fast = FastPAM(channels)
        # one set of weights: the compat module holds the reference's parameter objects
        fast.query_conv, fast.key_conv, fast.value_conv, fast.gamma = (
            ref.query_conv, ref.key_conv, ref.value_conv, ref.gamma)
        fast = fast.to(device=device, dtype=dtype)

        def sdpa(x):
            b, c = x.shape[:2]
            q = ref.query_conv(x).flatten(2).transpose(1, 2)
            k = ref.key_conv(x).flatten(2).transpose(1, 2)
            v = ref.value_conv(x).flatten(2).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, k, v, scale=1.0)
            return (ref.gamma * o.transpose(1, 2) + x.flatten(2)).reshape(x.shape)

        x = torch.randn(batch, channels, *size, device=device, dtype=dtype, requires_grad=True)
        providers: Dict[str, Callable] = {
            "reference": ref.forward,
            "torch": with_backend(fast.forward, "torch"),
            "compile": torch.compile(ref),
            "auto": fast.forward,
            "triton": with_backend(fast.forward, "triton"),
            "cpp": with_backend(fast.forward, "cpp"),
            "sdpa": sdpa,
        }
        return (x,), providers

    return setup


def _setup_seed001(batch: int, channels: int, size):
    def setup(device: torch.device, dtype: torch.dtype):
        ref = PositionAttentionModule(channels).to(device=device, dtype=dtype)
        fast = FastPosition(channels)
        fast.first_branch_conv, fast.second_branch_conv, fast.third_branch_conv, fast.output_conv = (
            ref.first_branch_conv, ref.second_branch_conv, ref.third_branch_conv, ref.output_conv)
        fast = fast.to(device=device, dtype=dtype)
        x = torch.randn(batch, channels, *size, device=device, dtype=dtype, requires_grad=True)
        providers: Dict[str, Callable] = {
            "reference": ref.forward,
            "torch": with_backend(fast.forward, "torch"),
            "compile": torch.compile(ref),
            "auto": fast.forward,
            "triton": with_backend(fast.forward, "triton"),
            "cpp": with_backend(fast.forward, "cpp"),
        }
        return (x,), providers

    return setup


def cases(device: torch.device) -> List[Case]:
    rows = [
        Case(op="position_attention", shape="PAM B=2 C=64 96x96", setup=_setup_pam(2, 64, (96, 96)),
             flops=_attention_flops(2, 64, 96 * 96), dtypes=_dtypes(device),
             note="acceptance: compat.danet.PAM_Module fwd+bwd peak memory < 25% of the original's"),
        Case(op="position_attention", shape="PAM B=2 C=64 48x48", setup=_setup_pam(2, 64, (48, 48)),
             flops=_attention_flops(2, 64, 48 * 48), dtypes=_dtypes(device),
             note="cpp target: fwd+bwd >= 1.5x the compiled reference with O(N) memory"),
        Case(op="position_attention", shape="seed001 B=2 C=64 64x64", setup=_setup_seed001(2, 64, (64, 64)),
             flops=_attention_flops(2, 64, 64 * 64), dtypes=_dtypes(device)),
    ]
    # more map sizes for the memory-vs-resolution figure (bench/plot.py): one training-step row each
    for side in (32, 64):
        rows.append(Case(op="position_attention", shape=f"PAM B=2 C=64 {side}x{side}",
                         setup=_setup_pam(2, 64, (side, side)), flops=_attention_flops(2, 64, side * side),
                         dtypes=(torch.float32,), modes=("fwd+bwd",)))
    if device.type == "cuda":
        rows.append(Case(op="position_attention", shape="PAM B=1 C=512 128x128",
                         setup=_setup_pam(1, 512, (128, 128)), flops=_attention_flops(1, 512, 128 * 128),
                         dtypes=_dtypes(device)))
    return rows
