r"""Warm start of an attention-gated nnU-Net network from a stock one's weights.

nnU-Net's ``-pretrained_weights`` refuses a checkpoint that lacks any key of the new network,
so a stock checkpoint cannot seed the gated network directly. :func:`warm_start` loads every
stock key strictly (no key missing, none unexpected, every shape equal) and sets each gate so that
the gated network computes exactly the stock network's function at first:

* the gate's last normalisation outputs 0 (its affine weight and bias set to 0; without an
  affine norm, ``w_ψ`` and its bias set to 0), so ``α = σ(0) = ½`` everywhere, whatever the
  input — and the gate still learns: the gradient reaches the norm's weight through
  ``σ'(0) = ¼``, then every gate parameter (as nnU-Net's ResEnc zero-initialises the last norm
  of a residual block);
* the decoder's first convolution after each gate, whose input is ``cat(up, α ⊙ skip)``, has the
  weights of its skip half doubled: ``2W · (½ skip) = W · skip``, exactly (a product by a power
  of two is exact in floating point).

:func:`convert_checkpoint` writes such a network's weights as an nnU-Net checkpoint for
``nnUNetv2_train ... -pretrained_weights`` (which then leaves the segmentation heads at their
fresh initialisation, nnU-Net's own rule for pretrained weights).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping, Union

import torch
from torch import nn

from ...models._parts import state_dict_misfit
from .networks import unwrap

__all__ = ["GATE_KEY", "warm_start", "convert_checkpoint"]

GATE_KEY = ".gates."   # the gated network's keys beyond the stock ones: decoder.gates.<i>.*


def _is_gate_key(key: str) -> bool:
    return GATE_KEY in f".{key}"


@torch.no_grad()
def pass_skip_through(network: nn.Module) -> List[str]:
    """Set every gate of ``network`` to ``α ≡ ½`` and double the skip half of the decoder
    convolution that follows it (see the module docstring); returns what was changed."""
    network = unwrap(network)
    decoder = network.decoder
    changed = []
    for i, (gate, stage, upsample) in enumerate(zip(decoder.gates, decoder.stages, decoder.transpconvs)):
        name = f"decoder.gates.{i}"
        last_norm = gate.psi_norm
        if last_norm is not None and getattr(last_norm, "weight", None) is not None:
            last_norm.weight.zero_()
            last_norm.bias.zero_()
            changed.append(f"{name}.psi_norm: weight = bias = 0 (alpha = 1/2)")
        else:
            gate.psi_conv.weight.zero_()
            if gate.psi_conv.bias is not None:
                gate.psi_conv.bias.zero_()
            changed.append(f"{name}.psi_conv: weight = bias = 0 (alpha = 1/2)")
        skip_channels = upsample.out_channels
        conv = next(m for m in stage.modules() if isinstance(m, nn.modules.conv._ConvNd))
        if conv.in_channels != 2 * skip_channels:
            raise ValueError(f"warm_start: the first conv of a decoder stage should take cat(upsampled, skip) "
                             f"= {2 * skip_channels} channels, got {conv.in_channels} ({conv})")
        conv.weight[:, skip_channels:] *= 2
        changed.append(f"first conv after {name}: skip-channel weights x2")
    return changed


def warm_start(network: nn.Module, stock_state_dict: Mapping[str, torch.Tensor]) -> List[str]:
    """Load a stock nnU-Net network's ``state_dict`` into its attention-gated counterpart and set
    the gates to pass the skips through (the gated network then equals the stock one; module
    docstring). Every stock key must fit (ValueError naming the misfits otherwise); the gates'
    own parameters keep their initialisation but for the last norm. Returns what was changed."""
    target = unwrap(network)
    own = target.state_dict()
    stock_expected = {k: v for k, v in own.items() if not _is_gate_key(k)}
    misfit = state_dict_misfit(stock_expected, stock_state_dict)
    if misfit:
        raise ValueError(f"warm_start: the stock weights do not fit the gated network's stock part: {misfit}")
    merged = dict(stock_state_dict)
    merged.update({k: v for k, v in own.items() if _is_gate_key(k)})
    target.load_state_dict(merged, strict=True)
    return pass_skip_through(target)


def convert_checkpoint(stock_checkpoint: Union[str, Path], out: Union[str, Path], *, gate_from: str = "coarse",
                       gate_inter_channels=None) -> Dict[str, object]:
    """A stock nnU-Net checkpoint (``checkpoint_final.pth``) -> a checkpoint of the gated network
    of the same configuration, warm-started (:func:`warm_start`), written to ``out`` for
    ``nnUNetv2_train ... -pretrained_weights out``. The network is rebuilt from the checkpoint's
    own plans and configuration (``init_args``); the optimizer and grad-scaler states are left
    out (they belong to the stock parameters). Returns the written dict."""
    from .plans import build_network

    checkpoint = torch.load(stock_checkpoint, map_location="cpu", weights_only=False)
    try:
        init = checkpoint["init_args"]
        plans, configuration, dataset_json = init["plans"], init["configuration"], init["dataset_json"]
        weights = checkpoint["network_weights"]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"convert_checkpoint: {stock_checkpoint} is not an nnU-Net v2 checkpoint "
                         f"(needs init_args with plans, configuration and dataset_json, and network_weights): "
                         f"missing {exc}") from None
    network = build_network(plans, configuration, dataset_json, gated=True,
                            gate_kwargs=dict(gate_from=gate_from, gate_inter_channels=gate_inter_channels))
    warm_start(network, weights)
    converted = {k: v for k, v in checkpoint.items() if k not in ("optimizer_state", "grad_scaler_state")}
    converted["network_weights"] = network.state_dict()
    converted["medattn_warm_start"] = {"from": str(stock_checkpoint), "gate_from": gate_from}
    torch.save(converted, out)
    return converted
