"""Benchmark cases of our whole networks (:mod:`medattn_fast.models`): DAUNet, CrossAttentionUNet and
MSGANet against their reference twins (op ``models``), AttentionUNet per gate backend (op
``attention_unet_model``). The originals' networks are ``bench/cases_networks.py``.

**DAUNet, CrossAttentionUNet, MSGANet.**

One training step (mode ``fwd+bwd``: forward, backward of a random cotangent through every
parameter) and inference (``no-grad``, eval mode) per network, the reference twin against the fast
one with the same weights: ``reference`` is :func:`medattn_fast.testing.twins.reference_twin` of the model (its
attention modules swapped for the faithful ones, N×N / C×C matrices materialised), ``fast`` the
network (memory-lean attention on the default backend choice), ``torch`` the fast network forced
to the ``torch`` backend. The error column is the max abs difference of the logits vs the reference twin.

MSGANet's training step times its full objective (:func:`medattn_fast.models.msganet_loss`: the
8 deep-supervision cross-entropies, the guided and the reconstruction MSEs), so its ``fwd+bwd``
row is a real training step and its output is the scalar loss.

CPU rows are small (B=2, 64²; 3-D 32³); CUDA rows are the networks' working sizes: DAUNet at 128²
B=8 (the issue's target there: >= 2x faster with >= 3x less memory than the reference twin on an
H100), with attention at the bottleneck only and at the bottleneck and the two deepest skips
(where the N×N matrices are large; shape label ``DAUNet+s1,2``), DAUNet 3-D 64³ B=2, CrossAttentionUNet 128² B=8, MSGANet 256² B=8.

**AttentionUNet, the gates' backends** (op ``attention_unet_model``; ``--op attention_unet_model``
selects these rows): the whole Attention U-Net (:class:`medattn_fast.models.AttentionUNet`), the
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
from medattn_fast.testing.twins import reference_twin
from medattn_fast.models import AttentionUNet, CrossAttentionUNet, DAUNet, MSGANet, msganet_loss

MODES = ("fwd+bwd", "no-grad")


def _randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Nonzero attention gammas, so that PAM/CAM do their work (0 at init makes them the identity)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(0.5)
    return model


def _providers(fast: torch.nn.Module, output: Callable) -> Dict[str, Callable]:
    reference, _ = reference_twin(fast)
    return {
        "reference": lambda *a: output(reference, *a),
        "fast": lambda *a: output(fast, *a),
        "torch": with_backend(lambda *a: output(fast, *a), "torch"),
    }


def _segmentation_setup(build: Callable[[], torch.nn.Module], batch: int, in_channels: int, size, training: bool):
    def setup(device: torch.device, dtype: torch.dtype):
        fast = _randomise(build()).to(device=device, dtype=dtype).train(training)
        x = torch.randn(batch, in_channels, *size, device=device, dtype=dtype, requires_grad=training)
        return (x,), _providers(fast, lambda model, x: model(x))
    return setup


def _msganet_setup(build: Callable[[], MSGANet], batch: int, size, training: bool):
    def setup(device: torch.device, dtype: torch.dtype):
        fast = _randomise(build()).to(device=device, dtype=dtype).train(training)
        x = torch.randn(batch, fast.in_channels, *size, device=device, dtype=dtype, requires_grad=training)
        classes = fast.predict1[0].out_channels
        target = torch.randint(0, classes, (batch, *size), device=device)

        def output(model, x):
            out = model(x)
            return msganet_loss(out, target)["total"] if model.training else out
        return (x,), _providers(fast, output)
    return setup


def _shape(name: str, batch: int, size, extra: str, training: bool) -> str:
    return f"{name}{extra} B={batch} {'x'.join(map(str, size))} {'train' if training else 'eval'}"


def twin_cases(device: torch.device) -> List[Case]:
    """DAUNet, CrossAttentionUNet, MSGANet against their reference twins (op ``models``)."""
    cuda = device.type == "cuda"
    skips = ("bottleneck", "skip-1", "skip-2")
    specs = []  # (label, build, batch, in_channels, size, extra, kind)
    if cuda:
        specs += [
            ("DAUNet", lambda: DAUNet(2, 1, 2), 8, 1, (128, 128), "", "seg"),
            ("DAUNet", lambda: DAUNet(2, 1, 2, attention_at=skips), 8, 1, (128, 128), "+s1,2", "seg"),
            ("DAUNet", lambda: DAUNet(3, 1, 2, channels=(16, 32, 64, 128)), 2, 1, (64, 64, 64), "", "seg"),
            ("CrossAttentionUNet", lambda: CrossAttentionUNet(2, 1, 2), 8, 1, (128, 128), "", "seg"),
            ("MSGANet", lambda: MSGANet(1, 5), 8, 1, (256, 256), "", "msga"),
        ]
    else:
        specs += [
            ("DAUNet", lambda: DAUNet(2, 1, 2, channels=(16, 32, 64, 128), attention_at=skips),
             2, 1, (64, 64), "+s1,2", "seg"),
            ("DAUNet", lambda: DAUNet(3, 1, 2, channels=(8, 16, 32, 64)), 1, 1, (32, 32, 32), "", "seg"),
            ("CrossAttentionUNet", lambda: CrossAttentionUNet(2, 1, 2, channels=(16, 32, 64, 128)),
             2, 1, (64, 64), "", "seg"),
            ("MSGANet", lambda: MSGANet(1, 5, 32), 2, 1, (64, 64), "(F=32)", "msga"),
        ]
    out: List[Case] = []
    dtypes = (torch.float32, torch.bfloat16) if cuda else (torch.float32,)
    for label, build, batch, cin, size, extra, kind in specs:
        for training, modes in ((True, ("fwd+bwd",)), (False, ("no-grad",))):
            setup = (_segmentation_setup(build, batch, cin, size, training) if kind == "seg"
                     else _msganet_setup(build, batch, size, training))
            out.append(Case(op="models", shape=_shape(label, batch, size, extra, training), setup=setup,
                            dtypes=dtypes, modes=modes, devices=(device.type,)))
    return out


# ------------------------------------------------------------------------------------------------
# AttentionUNet, the gates' backends (op attention_unet_model)
# ------------------------------------------------------------------------------------------------

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


def _attention_unet_setup(batch: int, size: Tuple[int, ...]):
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


def _attention_unet_shape(batch: int, size: Tuple[int, ...]) -> str:
    dims = "x".join(str(s) for s in size)
    return f"{len(size)}D B={batch} C={','.join(map(str, CHANNELS))} {dims} train"


def attention_unet_cases(device: torch.device) -> List[Case]:
    """AttentionUNet's training step per gate backend (op ``attention_unet_model``)."""
    rows: List[Tuple[int, Tuple[int, ...], Tuple[str, ...], Tuple[torch.dtype, ...]]] = [
        (2, (128, 128), ("cpu",), (torch.float32,)),
        (8, (224, 224), ("cuda",), (torch.float32, torch.bfloat16)),
        (2, (64, 64, 64), ("cuda",), (torch.float32, torch.bfloat16)),
    ]
    return [
        Case(op="attention_unet_model", shape=_attention_unet_shape(batch, size), setup=_attention_unet_setup(batch, size),
             flops=_forward_flops(batch, size), dtypes=dtypes, modes=("fwd", "fwd+bwd"), devices=devices,
             note="training step; providers differ only in the attention gates' backend")
        for batch, size, devices, dtypes in rows
    ]


def cases(device: torch.device) -> List[Case]:
    return twin_cases(device) + attention_unet_cases(device)
