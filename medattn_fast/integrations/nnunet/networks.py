r"""Attention-gated nnU-Net networks: ``PlainConvUNet`` and ``ResidualEncoderUNet`` of
``dynamic_network_architectures`` (the networks nnU-Net v2 trains) with an Attention U-Net gate
(:class:`medattn_fast.nn.AttentionGate`) on every skip connection.

Per decoder stage (coarsest first), with ``skip`` the encoder feature at the stage's resolution
S (B, Cs, *S) and ``below`` the feature one level coarser (B, Cb, *S_b)::

    up      = ConvTranspose(below)                       (B, Cs, *S)   the stock upsampling
    g       = below           (gate_from="coarse":    Oktay et al., the gating signal one level down)
            | up              (gate_from="upsampled": MONAI's AttentionUnet)
    α       = σ(N_ψ(w_ψ·relu(N_x(W_x·skip) + up(N_g(W_g·g)))))        (B, 1, *S)
    x       = stock_stage(cat(up, α ⊙ skip))             the stock conv blocks
    logits  = seg_layer(x)                                (deep supervision: one per stage)

``up(·)`` is (bi|tri)linear interpolation to S (anisotropic strides such as (1, 2, 2) included);
the norms N follow the network's ``norm_op``: BatchNorm (fused gate), InstanceNorm (nnU-Net's
default; the gate's own modules, unfused and exact) or none (fused). ``W_x``, ``W_g``: 1×1 convs
to ``C_int`` channels (default Cs // 2), ``w_ψ``: 1×1 conv to one channel.

The networks take the stock constructor's arguments plus the gate's (keyword, JSON-serialisable,
so a plans file can carry them), keep the stock state_dict keys (``decoder.gates.<i>.*`` is
added, ``i`` in decoder order), return what the stock network returns (deep supervision: a
list of logits, highest resolution first; ``decoder.deep_supervision`` switches it as nnU-Net's
trainer does) and are built by nnU-Net's ``get_network_from_plans`` from their dotted class path.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

try:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
    from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
    from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("medattn_fast.integrations.nnunet needs nnU-Net's networks "
                      "(dynamic_network_architectures): pip install \"medattn-fast[nnunet]\" beside your torch "
                      "(see the README's nnU-Net section)") from exc

from ...nn.attention_gate import AttentionGate

__all__ = ["GATE_FROM", "AttentionGatedPlainConvUNet", "AttentionGatedResidualEncoderUNet", "GatedUNetDecoder",
           "gate_norm_of"]

GATE_FROM = ("coarse", "upsampled")


def gate_norm_of(norm_op: Optional[type]) -> Optional[str]:
    """The :class:`AttentionGate` ``norm`` that follows a network's ``norm_op``: ``"batch"`` for a
    BatchNorm class, ``"instance"`` for an InstanceNorm class, None for None; ValueError otherwise."""
    if norm_op is None:
        return None
    if isinstance(norm_op, type) and issubclass(norm_op, nn.modules.batchnorm._BatchNorm):
        return "batch"
    if isinstance(norm_op, type) and issubclass(norm_op, nn.modules.instancenorm._InstanceNorm):
        return "instance"
    raise ValueError(f"attention-gated nnU-Net: the gate's normalisation follows the network's norm_op, which must "
                     f"be a BatchNorm or InstanceNorm class or None, got {norm_op!r}")


def _per_stage(name: str, value, count: int) -> List[Optional[int]]:
    if value is None or isinstance(value, int):
        return [value] * count
    values = list(value)
    if len(values) != count or not all(isinstance(v, int) and v > 0 for v in values):
        raise ValueError(f"attention-gated nnU-Net: {name} must be None, a positive int or {count} positive ints "
                         f"(one per decoder stage, coarsest first), got {value!r}")
    return values


class GatedUNetDecoder(UNetDecoder):
    """nnU-Net's ``UNetDecoder`` with an :class:`AttentionGate` on each skip (see the module
    docstring). Built like ``UNetDecoder`` (its arguments are passed through), plus:

    Args:
        gate_from: ``"coarse"`` (gating signal: the feature one level coarser, before the
            transposed conv, as Oktay et al.) or ``"upsampled"`` (the transposed conv's output,
            as MONAI's AttentionUnet).
        gate_inter_channels: C_int of each gate: None (half the skip's channels, at least 1), an
            int, or one int per decoder stage (coarsest first).
        gate_backend: force a medattn-fast backend for the gates (default: the global choice).

    ``forward(skips, return_attention=False)``: ``skips`` as the encoder returns them (the
    bottleneck last); returns the logits (a tensor, or a list highest resolution first when
    ``self.deep_supervision``), and with ``return_attention`` also the gates' α maps, (B, 1, *S)
    each, highest resolution first.
    """

    def __init__(self, encoder, num_classes: int, n_conv_per_stage, deep_supervision: bool, *,
                 gate_from: str = "coarse", gate_inter_channels: Union[None, int, Sequence[int]] = None,
                 gate_backend: Optional[str] = None, **decoder_kwargs):
        super().__init__(encoder, num_classes, n_conv_per_stage, deep_supervision, **decoder_kwargs)
        if gate_from not in GATE_FROM:
            raise ValueError(f"attention-gated nnU-Net: gate_from must be one of {GATE_FROM}, got {gate_from!r}")
        self.gate_from = gate_from
        norm_op = decoder_kwargs.get("norm_op") or encoder.norm_op
        norm_kwargs = decoder_kwargs.get("norm_op_kwargs") or encoder.norm_op_kwargs or {}
        norm = gate_norm_of(norm_op)
        spatial_dims = convert_conv_op_to_dim(encoder.conv_op)
        channels = list(encoder.output_channels)
        stages = len(channels) - 1
        inter = _per_stage("gate_inter_channels", gate_inter_channels, stages)
        gates = []
        for s in range(stages):
            skip_channels, below_channels = channels[-(s + 2)], channels[-(s + 1)]
            g_channels = below_channels if gate_from == "coarse" else skip_channels
            gates.append(AttentionGate(skip_channels, g_channels, inter[s] or max(skip_channels // 2, 1),
                                       spatial_dims=spatial_dims, norm=norm,
                                       norm_kwargs=dict(norm_kwargs) if norm is not None else None,
                                       backend=gate_backend))
        self.gates = nn.ModuleList(gates)

    def forward(self, skips, return_attention: bool = False):
        below = skips[-1]
        logits, alphas = [], []
        last = len(self.stages) - 1
        for s, (upsample, gate, stage) in enumerate(zip(self.transpconvs, self.gates, self.stages)):
            up = upsample(below)
            gated, alpha = gate(skips[-(s + 2)], below if self.gate_from == "coarse" else up, return_alpha=True)
            below = stage(torch.cat((up, gated), dim=1))
            if self.deep_supervision or s == last:
                logits.append(self.seg_layers[s](below))
            alphas.append(alpha)
        logits.reverse()
        alphas.reverse()
        out = logits if self.deep_supervision else logits[0]
        return (out, alphas) if return_attention else out


_GATE_DOC = """

    Attention-gated (medattn-fast): the stock network's arguments, plus ``gate_from``
    (``"coarse"``: Oktay; ``"upsampled"``: MONAI), ``gate_inter_channels`` and ``gate_backend``
    (see :class:`GatedUNetDecoder`); the gates' normalisation follows ``norm_op``.
    ``forward(x, return_attention=False)``; with ``return_attention`` also the α maps, highest
    resolution first."""


def _gated_decoder(network, num_classes, n_conv_per_stage_decoder, deep_supervision, gate_kwargs, **decoder_kwargs):
    return GatedUNetDecoder(network.encoder, num_classes, n_conv_per_stage_decoder, deep_supervision,
                            **gate_kwargs, **decoder_kwargs)


class _GatedForward:
    def forward(self, x, return_attention: bool = False):
        return self.decoder(self.encoder(x), return_attention=return_attention)


class AttentionGatedPlainConvUNet(_GatedForward, PlainConvUNet):
    __doc__ = "nnU-Net's ``PlainConvUNet`` with an attention gate on each skip." + _GATE_DOC

    def __init__(self, input_channels: int, n_stages: int, features_per_stage, conv_op, kernel_sizes, strides,
                 n_conv_per_stage, num_classes: int, n_conv_per_stage_decoder, conv_bias: bool = False,
                 norm_op=None, norm_op_kwargs: dict = None, dropout_op=None, dropout_op_kwargs: dict = None,
                 nonlin=None, nonlin_kwargs: dict = None, deep_supervision: bool = False, nonlin_first: bool = False,
                 *, gate_from: str = "coarse", gate_inter_channels: Union[None, int, Sequence[int]] = None,
                 gate_backend: Optional[str] = None):
        super().__init__(input_channels, n_stages, features_per_stage, conv_op, kernel_sizes, strides,
                         n_conv_per_stage, num_classes, n_conv_per_stage_decoder, conv_bias, norm_op, norm_op_kwargs,
                         dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs, deep_supervision, nonlin_first)
        # the stock decoder, rebuilt with the gates (same submodules and keys, gates added)
        self.decoder = _gated_decoder(self, num_classes, n_conv_per_stage_decoder, deep_supervision,
                                      dict(gate_from=gate_from, gate_inter_channels=gate_inter_channels,
                                           gate_backend=gate_backend), nonlin_first=nonlin_first)


class AttentionGatedResidualEncoderUNet(_GatedForward, ResidualEncoderUNet):
    __doc__ = "nnU-Net's ``ResidualEncoderUNet`` (ResEnc) with an attention gate on each skip." + _GATE_DOC

    def __init__(self, input_channels: int, n_stages: int, features_per_stage, conv_op, kernel_sizes, strides,
                 n_blocks_per_stage, num_classes: int, n_conv_per_stage_decoder, conv_bias: bool = False,
                 norm_op=None, norm_op_kwargs: dict = None, dropout_op=None, dropout_op_kwargs: dict = None,
                 nonlin=None, nonlin_kwargs: dict = None, deep_supervision: bool = False, block=None,
                 bottleneck_channels=None, stem_channels: int = None,
                 *, gate_from: str = "coarse", gate_inter_channels: Union[None, int, Sequence[int]] = None,
                 gate_backend: Optional[str] = None):
        stock = dict(deep_supervision=deep_supervision, bottleneck_channels=bottleneck_channels,
                     stem_channels=stem_channels)
        if block is not None:   # the stock default (BasicBlockD) otherwise
            stock["block"] = block
        super().__init__(input_channels, n_stages, features_per_stage, conv_op, kernel_sizes, strides,
                         n_blocks_per_stage, num_classes, n_conv_per_stage_decoder, conv_bias, norm_op, norm_op_kwargs,
                         dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs, **stock)
        self.decoder = _gated_decoder(self, num_classes, n_conv_per_stage_decoder, deep_supervision,
                                      dict(gate_from=gate_from, gate_inter_channels=gate_inter_channels,
                                           gate_backend=gate_backend))


#: stock class name -> the gated class (what ``add-config`` and the trainer map)
GATED_CLASSES = {"PlainConvUNet": AttentionGatedPlainConvUNet,
                 "ResidualEncoderUNet": AttentionGatedResidualEncoderUNet}


def gated_class_for(stock_class: type) -> type:
    """The gated counterpart of a stock nnU-Net network class (ValueError for any other class)."""
    for stock, gated in ((PlainConvUNet, AttentionGatedPlainConvUNet),
                         (ResidualEncoderUNet, AttentionGatedResidualEncoderUNet)):
        if isinstance(stock_class, type) and issubclass(stock_class, gated):
            return stock_class
        if stock_class is stock:
            return gated
    raise ValueError(f"attention-gated nnU-Net: no gated variant of {stock_class!r}; supported: "
                     f"dynamic_network_architectures' PlainConvUNet and ResidualEncoderUNet")


def dotted_name(cls: type) -> str:
    """``module.Class`` as nnU-Net's plans name a network (resolved there by ``pydoc.locate``)."""
    module = cls.__module__
    if module.startswith(__package__ + "."):
        module = __package__   # the public path: medattn_fast.integrations.nnunet.<Class>
    return f"{module}.{cls.__name__}"


def gates_of(network: nn.Module) -> List[Tuple[str, AttentionGate]]:
    """(name, gate) of every AttentionGate in ``network`` (unwraps DDP / torch.compile)."""
    return [(name, m) for name, m in unwrap(network).named_modules() if isinstance(m, AttentionGate)]


def unwrap(network: nn.Module) -> nn.Module:
    """The module under DDP's ``.module`` and torch.compile's ``._orig_mod`` wrappers."""
    while True:
        if isinstance(network, nn.parallel.DistributedDataParallel):
            network = network.module
        elif hasattr(network, "_orig_mod") and isinstance(network._orig_mod, nn.Module):
            network = network._orig_mod
        else:
            return network
