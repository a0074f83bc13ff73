"""Benchmark cases of the whole Attention U-Net (:class:`medattn_fast.models.AttentionUNet`), the
training step: forward in ``train()`` mode (batch-statistics BN, running-stat updates) and
forward+backward.

Providers share one model (one set of weights) and differ only in the backend of the attention
gates: ``reference`` (the seed math, forced with ``use_backend("reference")``), ``torch`` (the
vectorised composite) and ``auto`` (the default choice: fused kernels where they exist). The rest
of the network (convolutions, norms) is plain PyTorch in every provider, so the differences are
the gates' share of a real training step.

Rows: CPU 2-D B=2 channels (16, 32, 64, 128) strides (2, 2, 2) at 128²; CUDA 2-D B=8 at 224² and
3-D B=2 at 64³ with the same channels and strides. FLOPs count the convolutions and the gates'
1×1 projections (multiply-add = 2), not norms or activations.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from bench.harness import Case, with_backend
from medattn_fast.models import AttentionUNet

CHANNELS = (16, 32, 64, 128)
STRIDES = (2, 2, 2)
IN_CHANNELS, OUT_CHANNELS = 1, 3


def _forward_flops(batch: int, size: Tuple[int, ...], channels: Sequence[int] = CHANNELS,
                   strides: Sequence[int] = STRIDES, kernel: int = 3) -> float:
    """Forward FLOPs of the convolutions and gate projections of ``AttentionUNet`` (2 per MAC)."""
    taps = kernel ** len(size)
    tokens = [batch * math.prod(size)]
    for s in strides[: len(channels) - 1]:
        tokens.append(tokens[-1] // s ** len(size))
    c = channels
    macs = tokens[0] * taps * (IN_CHANNELS * c[0] + c[0] * c[0])  # stem
    for level in range(len(c) - 1):
        n, n_low, ci = tokens[level], tokens[level + 1], c[level] // 2
        macs += n_low * taps * (c[level] * c[level + 1] + c[level + 1] * c[level + 1])  # encoder block
        macs += n_low * taps * c[level + 1] * c[level]  # transposed conv (each low-res input scatters)
        macs += n * (2 * c[level] * ci + ci)  # gate: W_x, W_g, ψ
        macs += n * taps * 2 * c[level] * c[level]  # merge
    macs += tokens[0] * c[0] * OUT_CHANNELS  # 1×1 output conv
    return 2.0 * macs


def _setup(batch: int, size: Tuple[int, ...]):
    def setup(device: torch.device, dtype: torch.dtype):
        model = AttentionUNet(len(size), IN_CHANNELS, OUT_CHANNELS, channels=CHANNELS, strides=STRIDES)
        model = model.to(device=device, dtype=dtype).train()
        x = torch.randn(batch, IN_CHANNELS, *size, device=device, dtype=dtype, requires_grad=True)
        providers: Dict[str, Callable] = {
            "reference": with_backend(model, "reference"),
            "torch": with_backend(model, "torch"),
            "auto": model.forward,
        }
        return (x,), providers

    return setup


def _shape(batch: int, size: Tuple[int, ...]) -> str:
    dims = "x".join(str(s) for s in size)
    return f"{len(size)}D B={batch} C={','.join(map(str, CHANNELS))} {dims} train"


def cases(device: torch.device) -> List[Case]:
    rows: List[Tuple[int, Tuple[int, ...], Tuple[str, ...], Tuple[torch.dtype, ...]]] = [
        (2, (128, 128), ("cpu",), (torch.float32,)),
        (8, (224, 224), ("cuda",), (torch.float32, torch.bfloat16)),
        (2, (64, 64, 64), ("cuda",), (torch.float32, torch.bfloat16)),
    ]
    return [
        Case(op="attention_unet_model", shape=_shape(batch, size), setup=_setup(batch, size),
             flops=_forward_flops(batch, size), dtypes=dtypes, modes=("fwd", "fwd+bwd"), devices=devices,
             note="training step; providers differ only in the attention gates' backend")
        for batch, size, devices, dtypes in rows
    ]
