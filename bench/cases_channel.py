"""Benchmark cases of channel attention: DANet's ``CAM_Module`` (B=2, C=256,
48×48; the DANet head's inter width at 1/8 of a 384² image) and the ``ChannelAttentionModule`` of
Multi-Scale Guided Attention (Sinha & Dolz 2020) at the same size.

Providers: ``reference`` (the original module), ``torch`` / ``auto`` (the compat module forced to
the torch backend / on the default choice), ``compile`` (``torch.compile`` of the reference),
``triton`` (the compat module forced to the fused kernels; CUDA), ``cpp`` (forced to the C++ CPU
kernels).

``gpu_check_cases(device, tiny)`` (``bench/gpu_check.sh``): DANet's CAM at B=8 C=512 64², bf16 and
fp32, the drop-in on ``triton``, on ``torch`` (and in bf16 its cuBLAS path, ``channel_gemm="16bit"``)
and on ``auto`` vs the original (``tiny``: B=1 C=16 8×8, the CPU dry run).
"""
from __future__ import annotations

from typing import Callable, Dict, List

import torch

from bench.harness import Case, auto_provider, fast_twin, with_backend, with_kernel_config
from medattn_fast import KernelConfig
from medattn_fast.compat.danet import CAM_Module as FastCAM
from medattn_fast.compat.guided_attention import ChannelAttentionModule as FastChannel
from medattn_fast.reference.danet import CAM_Module
from medattn_fast.reference.guided_attention import ChannelAttentionModule


def _flops(batch: int, channels: int, n: int) -> float:
    return batch * (2.0 * channels * channels * n * 2 + 5.0 * channels * channels)   # X Xᵀ, A X, softmax


def _dtypes(device: torch.device):
    return (torch.float32,) if device.type == "cpu" else (torch.float32, torch.bfloat16, torch.float16)


def _setup_cam(batch: int, channels: int, size):
    def setup(device: torch.device, dtype: torch.dtype):
        ref = CAM_Module(channels).to(device=device, dtype=dtype)
        with torch.no_grad():
            ref.gamma.fill_(0.5)
        fast = FastCAM(channels)
        fast.gamma = ref.gamma   # one set of weights
        # unit-variance inputs scaled down so that float32 softmax(−E) is not a hard one-hot
        x = (0.1 * torch.randn(batch, channels, *size, device=device, dtype=dtype)).requires_grad_(True)
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


def _setup_seed001(batch: int, channels: int, size):
    def setup(device: torch.device, dtype: torch.dtype):
        ref = ChannelAttentionModule(channels).to(device=device, dtype=dtype)
        fast = FastChannel(channels)
        fast.output_conv = ref.output_conv
        x = (0.1 * torch.randn(batch, channels, *size, device=device, dtype=dtype)).requires_grad_(True)
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
    return [
        Case(op="channel_attention", shape="CAM B=2 C=256 48x48", setup=_setup_cam(2, 256, (48, 48)),
             flops=_flops(2, 256, 48 * 48), dtypes=_dtypes(device)),
        Case(op="channel_attention", shape="seed001 B=2 C=256 48x48", setup=_setup_seed001(2, 256, (48, 48)),
             flops=_flops(2, 256, 48 * 48), dtypes=_dtypes(device)),
    ]


def _check_setup(batch: int, channels: int, side: int):
    def setup(device: torch.device, dtype: torch.dtype):
        original = CAM_Module(channels).to(device=device, dtype=dtype)
        with torch.no_grad():
            original.gamma.fill_(0.5)
        fast = fast_twin(original)
        # scaled so that softmax(-E) is not one-hot in float32
        x = (0.1 * torch.randn(batch, channels, side, side, device=device, dtype=dtype)).requires_grad_(True)
        providers: Dict[str, Callable] = {"triton": with_backend(fast, "triton")}
        torch_backend = with_backend(fast, "torch")
        providers["torch"] = torch_backend
        if dtype != torch.float32:   # the cuBLAS path: 16-bit GEMMs with float32 output
            providers["torch 16bit"] = with_kernel_config(torch_backend, KernelConfig(channel_gemm="16bit"))
        providers["auto"] = auto_provider(fast)
        providers["original"] = original.forward
        return (x,), providers
    return setup


def gpu_check_cases(device: torch.device, tiny: bool = False) -> List[Case]:
    """The GPU check's CAM row (``tiny``: toy shapes for the CPU dry run)."""
    batch, channels, side = (1, 16, 8) if tiny else (8, 512, 64)
    return [Case(op="channel", shape=f"CAM B={batch} C={channels} {side}x{side}", setup=_check_setup(batch, channels, side),
                 flops=batch * 4.0 * channels * channels * side * side, dtypes=(torch.bfloat16, torch.float32),
                 modes=("no-grad", "fwd+bwd"), estimate_s=2 if tiny else 10, warm=("triton",))]
