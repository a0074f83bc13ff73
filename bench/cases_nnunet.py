"""Benchmark cases: one nnU-Net v2 training iteration, the stock 3-D U-Net against the same
network with an attention gate on every skip (``medattn_fast.integrations.nnunet``).

One call is what nnU-Net's trainer does per iteration but the optimizer step (the same for both and
small): the network's forward in train mode with deep supervision, nnU-Net's own loss (its
``DC_and_CE_loss`` under ``DeepSupervisionWrapper``, weights 1/2^i with the lowest output dropped,
as its trainer builds it) against labels downsampled to each output; the ``fwd+bwd`` mode adds the
backward. Two networks, as nnU-Net plans them for a Hippocampus-like dataset (3d_fullres,
PlainConvUNet, features 32…256, kernels 3, strides 2):

* ``InstanceNorm`` (nnU-Net's default): the gates' InstanceNorm runs unfused (the module's own
  layers) — providers ``stock``, ``gated``;
* ``BatchNorm`` (nnU-Net's BN variants): the gates can be fused — ``stock``, ``gated reference``
  (the unfused module math), ``gated torch`` (vectorised, BN folded where it can be), ``gated cpp``
  (fused C++), ``gated auto``.

The error column is the loss's difference from ``gated reference`` / ``gated`` (the stock network
is another network: its row's error is not a precision figure). Needs nnU-Net (``pip install
"medattn-fast[nnunet]"``); without it this file has no case.
"""
from __future__ import annotations

import importlib.util
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from bench.harness import Case

# (B, patch) on a CPU / on a GPU (nnU-Net's Hippocampus 3d_fullres: batch 9, 40x56x40)
SHAPES = {"cpu": (2, (32, 48, 32)), "cuda": (9, (40, 56, 40))}
NUM_CLASSES = 3
NORMS = {"InstanceNorm": "torch.nn.modules.instancenorm.InstanceNorm3d",
         "BatchNorm": "torch.nn.modules.batchnorm.BatchNorm3d"}


def _architecture(norm: str) -> dict:
    stages = 4
    return {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": stages, "features_per_stage": [32, 64, 128, 256],
                            "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * stages,
                            "strides": [[1, 1, 1]] + [[2, 2, 2]] * (stages - 1), "n_conv_per_stage": [2] * stages,
                            "n_conv_per_stage_decoder": [2] * (stages - 1), "conv_bias": True,
                            "norm_op": NORMS[norm], "norm_op_kwargs": {"eps": 1e-5, "affine": True},
                            "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                            "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def _network(architecture: dict) -> torch.nn.Module:
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    return get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                  architecture["_kw_requires_import"], 1, NUM_CLASSES, allow_init=True,
                                  deep_supervision=True)


def _loss(outputs: int) -> torch.nn.Module:
    import numpy as np
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    loss = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    weights = np.array([1 / 2 ** i for i in range(outputs)])
    weights[-1] = 0
    return DeepSupervisionWrapper(loss, weights / weights.sum())


def _setup(norm: str, batch: int, patch) -> Callable:
    def setup(device: torch.device, dtype: torch.dtype):
        import medattn_fast
        from medattn_fast.integrations.nnunet.plans import gated_architecture

        torch.manual_seed(0)
        architecture = _architecture(norm)
        stock = _network(architecture).to(device=device, dtype=dtype).train()
        gated = _network(gated_architecture(architecture)).to(device=device, dtype=dtype).train()
        x = torch.randn(batch, 1, *patch, device=device, dtype=dtype)
        label = torch.randint(0, NUM_CLASSES, (batch, 1, *patch), device=device).to(dtype)
        outputs = len(architecture["arch_kwargs"]["strides"]) - 1
        targets = [label] + [F.interpolate(label, scale_factor=0.5 ** i, mode="nearest") for i in range(1, outputs)]
        loss = _loss(outputs)

        def iteration(network, backend=None):
            # train mode normalises by the batch's statistics: the running ones the calls update
            # change neither the loss nor the time
            def call(image):
                if backend is None:
                    return loss(network(image), targets)
                with medattn_fast.use_backend(backend):
                    return loss(network(image), targets)
            call.__self__ = network   # the harness frees the parameters' .grad between modes
            return call

        providers: Dict[str, Callable] = {"stock": iteration(stock)}
        if norm == "InstanceNorm":
            providers["gated"] = iteration(gated)
        else:
            for backend in ("reference", "torch", "cpp", "auto"):
                providers[f"gated {backend}"] = iteration(gated, backend)
        return (x,), providers
    return setup


def cases(device: torch.device) -> List[Case]:
    if importlib.util.find_spec("nnunetv2") is None:
        return []
    batch, patch = SHAPES["cuda" if device.type == "cuda" else "cpu"]
    shape = f"B={batch} 1x{'x'.join(map(str, patch))} train iteration"
    return [Case(op=f"nnU-Net 3d_fullres {norm}", shape=shape, setup=_setup(norm, batch, patch),
                 modes=("fwd+bwd",), reference="gated" if norm == "InstanceNorm" else "gated reference",
                 devices=(device.type,), note="loss (DC+CE, deep supervision) of one training iteration")
            for norm in NORMS]
