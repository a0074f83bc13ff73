"""Reference twins of the full networks, built outside the networks by swapping their attention modules.

``reference_twin(model)`` deep-copies a network of :mod:`medattn_fast.models` (DAUNet, MSGANet,
CrossAttentionUNet) and replaces each of its fast attention modules by the slow, obvious module of
:mod:`medattn_fast.reference` that computes the same thing, holding the same weights:

============================== ===================================================================
fast (:mod:`medattn_fast.nn`)  reference (materialises the matrices)
============================== ===================================================================
``PositionAttention``          DANet's ``PAM_Module``: ``query.weight`` (i, C) becomes
                               ``query_conv.weight`` (i, C, 1, 1), likewise ``key``, ``value``
``ChannelAttention``           DANet's ``CAM_Module`` (``gamma``)
``SEChannelAttention``,        :mod:`medattn_fast.reference.cross_attention`'s classes of the same
``SelfAttentionLayer``,        names (the same parameter names and shapes)
``SkipCrossAttentionLayer``
============================== ===================================================================

DANet's modules are 2-D only; a 3-D map (B, C, D, H, W) enters them as the (B, C, D·H, W) view.
Both use only 1×1 convolutions and attention over all N positions, so folding two spatial axes
into one changes nothing in the math. Everything else (convs, norms, containers) is the copy's own.
Device, dtype, training flags and ``requires_grad`` follow the fast module. A module of the package
that has no reference counterpart here (an ``AttentionGate``, a compat module, a position attention
whose query width is not DANet's C // 8, a channel attention with ``negate=False``) raises
TypeError: a twin that silently kept a fast module would compare the fast path with itself.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, Tuple

import torch
from torch import nn

from medattn_fast import nn as fast
from medattn_fast.reference import cross_attention as reference_cross
from medattn_fast.reference import danet as reference_danet

__all__ = ["reference_twin"]


def _planar(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2, 3) if x.dim() == 5 else x


class PlanarPAM(reference_danet.PAM_Module):
    """DANet's ``PAM_Module`` applied to a 3-D map through its (B, C, D·H, W) view."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(_planar(x)).reshape(x.shape)


class PlanarCAM(reference_danet.CAM_Module):
    """DANet's ``CAM_Module`` applied to a 3-D map through its (B, C, D·H, W) view."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(_planar(x)).reshape(x.shape)


def _position(m: fast.PositionAttention) -> Tuple[nn.Module, Dict[str, str]]:
    if m.query.weight.shape[0] != m.channels // 8:
        raise TypeError(f"reference_twin: PositionAttention({m.channels}) has {m.query.weight.shape[0]} query "
                        f"channels; DANet's PAM_Module has channels // 8 = {m.channels // 8}")
    names = {"gamma": "gamma"}
    for proj in ("query", "key", "value"):
        names.update({f"{proj}_conv.weight": f"{proj}.weight", f"{proj}_conv.bias": f"{proj}.bias"})
    return PlanarPAM(m.channels), names


def _channel(m: fast.ChannelAttention) -> Tuple[nn.Module, Dict[str, str]]:
    if not m.negate:
        raise TypeError("reference_twin: ChannelAttention(negate=False) has no reference counterpart "
                        "(DANet's CAM_Module soft-maxes rowmax(E) - E)")
    # CAM_Module's in_dim only sets its unused ``chanel_in`` attribute; no parameter depends on it.
    return PlanarCAM(0), {"gamma": "gamma"}


def _same_names(reference_class: type, *arguments: Callable[[nn.Module], object]):
    def swap(m: nn.Module) -> Tuple[nn.Module, Dict[str, str]]:
        return reference_class(*(a(m) for a in arguments)), {n: n for n, _ in m.named_parameters()}
    return swap


# fast class -> m -> (the reference module, {reference parameter name: fast parameter name})
_SWAPS: Dict[type, Callable[[nn.Module], Tuple[nn.Module, Dict[str, str]]]] = {
    fast.PositionAttention: _position,
    fast.ChannelAttention: _channel,
    fast.SEChannelAttention: _same_names(reference_cross.SEChannelAttention, lambda m: m.fc1.in_features,
                                         lambda m: m.fc1.in_features // m.fc1.out_features),
    fast.SelfAttentionLayer: _same_names(reference_cross.SelfAttentionLayer, lambda m: m.to_q.in_features,
                                         lambda m: m.heads),
    fast.SkipCrossAttentionLayer: _same_names(reference_cross.SkipCrossAttentionLayer, lambda m: m.to_q.in_features,
                                              lambda m: m.to_k.in_features, lambda m: m.heads),
}


def reference_twin(model: nn.Module) -> Tuple[nn.Module, Dict[str, str]]:
    """A deep copy of ``model`` with every fast attention module replaced by its reference (see the
    module docstring), and ``{parameter name in model: parameter name in the twin}``. The twin's
    parameters hold the same values (a fast (i, C) matrix as the (i, C, 1, 1) conv weight)."""
    twin = copy.deepcopy(model)
    names = {n: n for n, _ in model.named_parameters()}
    swapped = []
    for path, module in list(twin.named_modules()):
        if any(path.startswith(prefix) for prefix in swapped):
            continue   # inside a module already replaced (e.g. PositionAttention's Pointwise)
        swap = _SWAPS.get(type(module))
        origin = type(module).__module__
        if swap is None:
            if origin.startswith("medattn_fast.") and not origin.startswith(("medattn_fast.models",
                                                                            "medattn_fast.reference")):
                raise TypeError(f"reference_twin: {path or 'the model'} ({origin}.{type(module).__qualname__}) "
                                f"has no reference counterpart here")
            continue
        reference, mapping = swap(module)
        own = dict(module.named_parameters())
        if set(mapping.values()) != set(own) or set(mapping) != {n for n, _ in reference.named_parameters()}:
            raise TypeError(f"reference_twin: the parameters of {path} ({sorted(own)}) do not map one to one "
                            f"onto {type(reference).__name__}'s")
        first = next(iter(own.values()))
        reference.to(device=first.device, dtype=first.dtype).train(module.training)
        with torch.no_grad():
            for ref_name, p in reference.named_parameters():
                src = own[mapping[ref_name]]
                p.copy_(src.reshape(p.shape))
                p.requires_grad_(src.requires_grad)
        if path:
            parent, _, child = path.rpartition(".")
            setattr(twin.get_submodule(parent), child, reference)
        else:
            twin = reference
        prefix = path + "." if path else ""
        swapped.append(prefix)
        names.update({prefix + fast_name: prefix + ref_name for ref_name, fast_name in mapping.items()})
    return twin, names
