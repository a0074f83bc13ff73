"""Benchmark cases of Gaussian-weighted axial attention (DESIGN.md op 4, MT-UNet GaussianTrans).

* The issue's acceptance row: ``GaussianTrans`` at B=2 on a 14×14 grid with D=512, fwd+bwd,
  through ``medattn_fast.compat.mtunet.GaussianTrans`` (auto backend). Target: auto/cpp fwd+bwd
  ≥ 75× faster than the original's per-pixel loop and faster than ``torch.compile`` of the
  vectorised PyTorch version.
* MT-UNet's own grid at a 224² input: after WinAttention (window 4) and DlightConv the 28×28 tokens
  of the first transformer stage become a 7×7 grid with D=256 (B=1: also the cheap smoke row).
* The fused from-q,k,v entry point (scores never stored) at 14×14, D=512 and at 28×28, D=256.

Providers: ``reference`` (the seed loop: ``reference.gaussian_trans.GaussianTrans`` /
``gaussian_axial_from_qkv_reference``), ``torch`` (the vectorised backend), ``compile``
(``torch.compile`` of the vectorised backend), ``cpp`` (the fused C++ kernels), ``auto`` (the
compat module / the functional on the default backend). All share one ``shift``/``bias`` pair.
"""
from __future__ import annotations

from typing import Callable, Dict, List

import torch

import medattn_fast.functional as MF
from bench.harness import Case
from medattn_fast.compat.mtunet import GaussianTrans as FastGaussianTrans
from medattn_fast.reference.gaussian_trans import GaussianTrans, gaussian_axial_from_qkv_reference


def _flops(batch: int, h: int, w: int, d: int, from_qkv: bool) -> float:
    """Forward FLOPs: P·V along rows and columns (+ the q·k scores), plus ~5 per softmax entry."""
    pairs = batch * h * w * (h + w)  # (pixel, key) pairs over both axes
    return pairs * (2.0 * d + 5.0) + (pairs * 2.0 * d if from_qkv else 0.0)


def _setup_scores(batch: int, h: int, w: int, d: int):
    def setup(device: torch.device, dtype: torch.dtype):
        ref = GaussianTrans().to(device=device, dtype=dtype)
        fast = FastGaussianTrans().to(device=device, dtype=dtype)
        fast.shift, fast.bias = ref.shift, ref.bias  # one set of parameters

        grid = torch.randn(batch, h, w, 1, device=device, dtype=dtype)  # x: only its shape is used
        atten_x = torch.randn(batch, h, w, w, device=device, dtype=dtype, requires_grad=True)
        atten_y = torch.randn(batch, w, h, h, device=device, dtype=dtype, requires_grad=True)
        value = torch.randn(batch, h, w, d, device=device, dtype=dtype, requires_grad=True)

        def vectorised(ax, ay, v):
            return MF.gaussian_axial_from_scores(ax, ay, v, ref.shift, bias=ref.bias, backend="torch")

        compiled = torch.compile(vectorised)
        providers: Dict[str, Callable] = {
            "reference": lambda ax, ay, v: ref((grid, ax, ay, v)),
            "torch": vectorised,
            "compile": compiled,
            "cpp": lambda ax, ay, v: MF.gaussian_axial_from_scores(ax, ay, v, ref.shift, bias=ref.bias,
                                                                   backend="cpp"),
            "auto": lambda ax, ay, v: fast((grid, ax, ay, v)),
        }
        return (atten_x, atten_y, value), providers

    return setup


def _setup_qkv(batch: int, h: int, w: int, d: int):
    def setup(device: torch.device, dtype: torch.dtype):
        shift = torch.nn.Parameter(torch.randn(1, device=device, dtype=dtype).abs())
        # Scores of unit-variance q, k grow like √D; scale them as a trained block would.
        q = (torch.randn(batch, h, w, d, device=device, dtype=dtype) / d ** 0.5).requires_grad_()
        k = torch.randn(batch, h, w, d, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(batch, h, w, d, device=device, dtype=dtype, requires_grad=True)

        def vectorised(q, k, v):
            return MF.gaussian_axial_attention(q, k, v, shift, backend="torch")

        providers: Dict[str, Callable] = {
            "reference": lambda q, k, v: gaussian_axial_from_qkv_reference(q, k, v, shift),
            "torch": vectorised,
            "compile": torch.compile(vectorised),
            "cpp": lambda q, k, v: MF.gaussian_axial_attention(q, k, v, shift, backend="cpp"),
            "auto": lambda q, k, v: MF.gaussian_axial_attention(q, k, v, shift),
        }
        return (q, k, v), providers

    return setup


def cases(device: torch.device) -> List[Case]:
    dtypes = (torch.float32,) if device.type == "cpu" else (torch.float32, torch.bfloat16)
    return [
        Case(op="gaussian_axial", shape="GaussianTrans B=2 14x14 D=512", setup=_setup_scores(2, 14, 14, 512),
             flops=_flops(2, 14, 14, 512, from_qkv=False), dtypes=dtypes,
             note="acceptance: compat.mtunet.GaussianTrans (auto) fwd+bwd >= 75x the original loop, "
                  "and faster than torch.compile of the vectorised version"),
        Case(op="gaussian_axial", shape="GaussianTrans B=1 7x7 D=256", setup=_setup_scores(1, 7, 7, 256),
             flops=_flops(1, 7, 7, 256, from_qkv=False), dtypes=dtypes,
             note="MT-UNet at 224x224, first transformer stage"),
        Case(op="gaussian_axial", shape="qkv B=2 14x14 D=512", setup=_setup_qkv(2, 14, 14, 512),
             flops=_flops(2, 14, 14, 512, from_qkv=True), dtypes=dtypes),
        Case(op="gaussian_axial", shape="qkv B=2 28x28 D=256", setup=_setup_qkv(2, 28, 28, 256),
             flops=_flops(2, 28, 28, 256, from_qkv=True), dtypes=dtypes),
    ]
