"""Benchmark cases of the whole MT-UNet (Synapse model, ``MTUNet(9)``, 79M parameters) at 224².

* GPU: a training step, B = 12 (the original's training batch size): forward + backward of the
  logits in train mode (batch-statistics BatchNorm), and eval inference (no-grad).
* CPU: B = 1, inference (no-grad) and forward + backward. The original cannot run on a CPU at all
  (``.cuda()`` calls); its device-agnostic reference still evaluates GaussianTrans as a Python loop
  over the pixels of every Gaussian grid, which is what this row shows.

Providers, all sharing the reference's weights (one state_dict):

* ``reference``: the seed-faithful ``medattn_fast.reference.mtunet.MTUNet`` (loop GaussianTrans,
  permute copies, padding buffer, per-head linears);
* ``auto``: ``medattn_fast.compat.mtunet.MTUNet`` (the drop-in: same keys) on the default backend;
* ``torch``: the same compat model with every fused op forced to the vectorised torch backend;
* ``models``: the clean ``medattn_fast.models.MTUNet`` loaded with ``from_original_state_dict``;
* ``reference-vec``: the reference model with only its ``GaussianTrans`` blocks replaced by the
  vectorised ``torch`` implementation (no loop over pixels; every other block stays the seed's):
  the issue's second baseline ("the reference with a vectorised GaussianTrans").

AMP rows (shape suffix ``AMP``) run every provider under ``torch.autocast`` in bfloat16 with
float32 weights, as a mixed-precision training step would (bfloat16 needs no loss scaling).

The output compared (error column) is the logits, (B, 9, 224, 224). FLOPs: 80.75 GFLOP per image
forward (convolutions and matmuls of the reference, counted with ``torch.utils.flop_counter`` on
the meta device; the Gaussian softmaxes are not counted).
"""
from __future__ import annotations

import copy
from typing import Callable, Dict

import torch

import medattn_fast
from bench.harness import Case, with_backend, within
from medattn_fast.compat.mtunet import GaussianTrans as CompatGaussianTrans
from medattn_fast.compat.mtunet import MTUNet as CompatMTUNet
from medattn_fast.models import MTUNet as CleanMTUNet
from medattn_fast.reference.mtunet import MTUNet as ReferenceMTUNet

SIDE, CLASSES = 224, 9
FLOPS_PER_IMAGE = 80.75e9


class _VectorisedGaussianTrans(CompatGaussianTrans):
    """GaussianTrans on the vectorised ``torch`` backend, whatever the default choice is."""

    def forward(self, inputs):
        with medattn_fast.use_backend("torch"):
            return super().forward(inputs)


def _with_vectorised_gaussian(ref: torch.nn.Module) -> torch.nn.Module:
    """A copy of the reference model whose GaussianTrans blocks are the vectorised ones."""
    model = copy.deepcopy(ref)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ == "GaussianTrans":
                fast = _VectorisedGaussianTrans()
                fast.load_state_dict(child.state_dict())
                setattr(parent, name, fast.to(child.shift.device))
    return model


def _setup(batch: int, train: bool, amp: bool = False):
    def setup(device: torch.device, dtype: torch.dtype):
        torch.manual_seed(0)
        ref = ReferenceMTUNet(CLASSES).to(device=device, dtype=dtype)
        with torch.no_grad():  # the original initialises it to zeros: give it content
            ref.stem.position_embedding.normal_(0.0, 0.02)
        compat = CompatMTUNet.from_original(ref)
        clean = CleanMTUNet.from_original_state_dict(ref.state_dict())
        vectorised = _with_vectorised_gaussian(ref)
        for model in (ref, compat, clean, vectorised):
            model.train(train)
        x = torch.randn(batch, 3, SIDE, SIDE, device=device, dtype=dtype, requires_grad=False)
        providers: Dict[str, Callable] = {
            "reference": ref.forward,
            "auto": compat.forward,
            "torch": with_backend(compat, "torch"),
            "models": clean.forward,
            "reference-vec": vectorised.forward,
        }
        if amp:
            # bfloat16 autocast (float32 weights), as a mixed-precision training step runs
            providers = {name: within(fn, lambda: torch.autocast(device.type, dtype=torch.bfloat16))
                         for name, fn in providers.items()}
        return (x,), providers

    return setup


def cases(device: torch.device) -> list:
    out = []
    for batch, devices, label in ((12, ("cuda",), "GPU training batch"), (1, ("cpu",), "CPU, one image")):
        out.append(Case(op="mtunet_model", shape=f"B={batch} 3x{SIDE}x{SIDE} train step", setup=_setup(batch, True),
                        flops=FLOPS_PER_IMAGE * batch, modes=("fwd+bwd",), devices=devices,
                        note=f"{label}: MTUNet(9) forward+backward of the logits, train-mode BN"))
        if batch > 1:
            out.append(Case(op="mtunet_model", shape=f"B={batch} 3x{SIDE}x{SIDE} train step AMP",
                            setup=_setup(batch, True, amp=True), flops=FLOPS_PER_IMAGE * batch, modes=("fwd+bwd",),
                            devices=devices, note=f"{label}: as the train step, under bfloat16 autocast"))
        out.append(Case(op="mtunet_model", shape=f"B={batch} 3x{SIDE}x{SIDE} eval", setup=_setup(batch, False),
                        flops=FLOPS_PER_IMAGE * batch, modes=("no-grad",), devices=devices,
                        note=f"{label}: MTUNet(9) inference"))
    return out
