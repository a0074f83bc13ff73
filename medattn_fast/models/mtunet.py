"""MT-UNet (Wang et al., ICASSP 2022) as a clean model: any input size the strides allow, H ≠ W,
1- or 3-channel input, CPU or CUDA, fp32/fp16/bf16 and autocast; loads the original checkpoints.

Architecture (``b = base_channels``; the original is b = 64, 8 heads, 4×4 windows)::

    x (B, in_channels, H, W)                                  H, W multiples of 32
    encoder_convs   3 × ResidualDoubleConv (b, 2b, 4b), 2×2 max-pool after each  -> skips f1, f2, f3
    token_projection 1×1 ConvNormAct, + position embedding   -> tokens (B, H/8, W/8, 4b)
    encoder[0]      2 × MixedTransformerBlock(4b), 2×2 stride-2 ConvNormAct  -> (B, 8b, H/16, W/16)
    encoder[1]      2 × MixedTransformerBlock(8b), 2×2 stride-2 ConvNormAct  -> (B, 16b, H/32, W/32)
    bottleneck      2 × MixedTransformerBlock(16b)
    decoder[0]      ConvTranspose 16b -> 8b, project([x, skip]) -> 8b, 2 × MixedTransformerBlock(8b)
    decoder[1]      ConvTranspose 8b -> 4b, [x, skip] (8b),         2 × MixedTransformerBlock(8b)
    decoder_convs   3 × (ConvTranspose, ResidualDoubleConv([skip, x]))   with f3, f2, f1
    head            1×1 conv -> (B, num_classes, H, W)

The transformer part runs on channel-last token grids (B, h, w, C) (:mod:`medattn_fast.nn.mtunet`),
so no square grid is assumed anywhere.

**Position embedding.** It is stored on the token grid it is learned at, ``embedding_grid``
(28×28: the original's 784 tokens for 224² inputs), channel-last (1, gh, gw, 4b). For an input
whose token grid (H/8, W/8) differs it is resampled bicubically (align_corners=False), as ViT/DeiT
checkpoints are for new resolutions; at the stored grid it is used as is, so a loaded checkpoint
reproduces the original exactly at 224². Chosen over a size-agnostic embedding because it keeps
the original's learned embedding and its outputs.

**Original checkpoints.** :meth:`MTUNet.from_original_state_dict` builds the model from an
original ``MTUNet(out_ch)`` state_dict (487 keys for the Synapse model) through
:func:`convert_original_state_dict`; its tables (``_CNN_MODULES``, ``_ENCODER_BLOCK``,
``_DECODER_BLOCK``, ``_CONV_BN``, ``_DOUBLE_CONV``, ``_MIXED_BLOCK``) rename the original's modules
to the ones above and drop :data:`DROPPED_ORIGINAL_PARAMETERS` (they cannot change the output).
"""
from __future__ import annotations

import math
import re
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .._shapes import statically_true
from ..nn.mtunet import PAD_MODES, MixedTransformerBlock
from ._parts import check_positive_int, state_dict_misfit

__all__ = [
    "MTUNet",
    "ConvNormAct",
    "ResidualDoubleConv",
    "TransformerEncoderStage",
    "TransformerDecoderStage",
    "ConvDecoderStage",
    "convert_original_state_dict",
    "DROPPED_ORIGINAL_PARAMETERS",
]

# 3 max-pools then 2 stride-2 convs: every side must be a multiple of 2**5.
INPUT_STRIDE = 32


class ConvNormAct(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> ReLU (no ReLU when ``activation=False``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 activation: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.norm = nn.BatchNorm2d(out_channels)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(x))
        return torch.relu(x) if self.activation else x


class ResidualDoubleConv(nn.Module):
    r"""(B, in, H, W) -> (B, out, H, W): ``h = BN(conv3(ReLU(BN(conv3(x)))))``, then
    ``ReLU(h + BN(conv1x1(h)))`` (MT-UNet's DoubleConv: the residual branch refines h itself)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = ConvNormAct(in_channels, out_channels, 3, padding=1)
        self.conv2 = ConvNormAct(out_channels, out_channels, 3, padding=1, activation=False)
        self.pointwise = nn.Conv2d(out_channels, out_channels, 1)
        self.pointwise_norm = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(self.conv1(x))
        return torch.relu(h + self.pointwise_norm(self.pointwise(h)))


class TransformerEncoderStage(nn.Module):
    r"""Tokens (B, h, w, dim) -> (down (B, 2·dim, h/2, w/2), skip (B, dim, h, w)).

    Two :class:`~medattn_fast.nn.mtunet.MixedTransformerBlock`, then a 2×2 stride-2 ConvNormAct.
    The skip is a channel-first view of the blocks' output (no copy)."""

    def __init__(self, dim: int, num_heads: int, window_size: int, pad_mode: str):
        super().__init__()
        self.blocks = nn.ModuleList([MixedTransformerBlock(dim, num_heads, window_size, pad_mode=pad_mode)
                                     for _ in range(2)])
        self.downsample = ConvNormAct(dim, 2 * dim, 2, stride=2)

    def forward(self, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        for block in self.blocks:
            tokens = block(tokens)
        skip = tokens.permute(0, 3, 1, 2)
        return self.downsample(skip), skip


class TransformerDecoderStage(nn.Module):
    r"""(B, in_dim, h, w), skip (B, skip_dim, 2h, 2w) -> tokens (B, 2h, 2w, dim).

    ``up`` = ConvTranspose2d(in_dim -> in_dim/2, k2, s2); the join ``[up, skip]`` (up first, as in
    the original) goes through ``project`` (Linear in_dim/2 + skip_dim -> dim) when ``project`` is
    true, else it must already have ``dim`` channels; then two MixedTransformerBlock(dim). The join
    is never materialised when projected: two GEMMs on the halves of the projection weight.
    """

    def __init__(self, in_dim: int, skip_dim: int, dim: int, num_heads: int, window_size: int, pad_mode: str,
                 *, project: bool):
        super().__init__()
        joined = in_dim // 2 + skip_dim
        if not project and joined != dim:
            raise ValueError(f"TransformerDecoderStage: without projection the join must have dim={dim} channels, "
                             f"got in_dim/2 + skip_dim = {joined}")
        self.upsample = nn.ConvTranspose2d(in_dim, in_dim // 2, 2, stride=2)
        self.project = nn.Linear(joined, dim) if project else None
        self.blocks = nn.ModuleList([MixedTransformerBlock(dim, num_heads, window_size, pad_mode=pad_mode)
                                     for _ in range(2)])

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.upsample(x).permute(0, 2, 3, 1)  # channel-last views
        skip = skip.permute(0, 2, 3, 1)
        if self.project is not None:
            w_up, w_skip = self.project.weight.split((up.shape[-1], skip.shape[-1]), dim=1)
            tokens = F.linear(up, w_up) + F.linear(skip, w_skip, self.project.bias)
        else:
            tokens = torch.cat((up, skip), dim=-1)
        for block in self.blocks:
            tokens = block(tokens)
        return tokens


class ConvDecoderStage(nn.Module):
    """(B, in, h, w), skip (B, skip, 2h, 2w) -> (B, out, 2h, 2w): ConvTranspose2d (in -> out, k2, s2),
    then ResidualDoubleConv of ``[skip, x]`` (the skip first, as in the original)."""

    def __init__(self, in_channels: int, out_channels: int, skip_channels: int):
        super().__init__()
        self.upsample = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        self.conv = ResidualDoubleConv(skip_channels + out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat((skip, self.upsample(x)), dim=1))


class MTUNet(nn.Module):
    r"""MT-UNet for 2-D segmentation: x (B, in_channels, H, W) -> logits (B, num_classes, H, W).

    H and W: any multiples of 32 (224², 256², 192×256, ...). See the module docstring for the
    architecture, the position embedding and the original checkpoints.

    Args:
        in_channels: input channels (1 for CT/MRI slices; the original takes 3 and repeats 1).
        num_classes: output channels (logits).
        base_channels: b, the width of the first CNN stage; the transformer widths are 4b, 8b, 16b
            (the original: 64).
        num_heads: heads of the window attention (external attention uses 4× as many); must divide 4b.
        window_size: side of the attention windows (4 in the original).
        embedding_grid: (gh, gw), the token grid the position embedding is stored at (28×28: 224²).
        pad_mode: window padding of token grids that are not multiples of ``window_size``:
            "mtunet" (the original's: zeros and a copied corner, unmasked) or "mask".
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 9, *, base_channels: int = 64, num_heads: int = 8,
                 window_size: int = 4, embedding_grid: Sequence[int] = (28, 28), pad_mode: str = "mtunet"):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes),
                            ("base_channels", base_channels), ("num_heads", num_heads), ("window_size", window_size)):
            check_positive_int("MTUNet", name, value)
        if (4 * base_channels) % num_heads != 0:
            raise ValueError(f"MTUNet: num_heads={num_heads} must divide the first transformer width "
                             f"4·base_channels={4 * base_channels}")
        grid = tuple(embedding_grid) if isinstance(embedding_grid, (tuple, list)) else None
        if grid is None or len(grid) != 2 or not all(isinstance(g, int) and g >= 1 for g in grid):
            raise ValueError(f"MTUNet: argument 'embedding_grid' must be two positive ints (gh, gw), got {embedding_grid!r}")
        if pad_mode not in PAD_MODES:
            raise ValueError(f"MTUNet: argument 'pad_mode' must be one of {PAD_MODES}, got {pad_mode!r}")
        self.in_channels, self.num_classes, self.base_channels = in_channels, num_classes, base_channels
        self.num_heads, self.window_size, self.pad_mode = num_heads, window_size, pad_mode
        b = base_channels
        d = 4 * b  # the first transformer width
        stage = dict(num_heads=num_heads, window_size=window_size, pad_mode=pad_mode)

        self.encoder_convs = nn.ModuleList([ResidualDoubleConv(in_channels, b), ResidualDoubleConv(b, 2 * b),
                                            ResidualDoubleConv(2 * b, d)])
        self.token_projection = ConvNormAct(d, d, 1)
        # zeros, as in the original
        self.position_embedding = nn.Parameter(torch.zeros(1, grid[0], grid[1], d))
        self.encoder = nn.ModuleList([TransformerEncoderStage(d, **stage), TransformerEncoderStage(2 * d, **stage)])
        self.bottleneck = nn.Sequential(*(MixedTransformerBlock(4 * d, num_heads, window_size, pad_mode=pad_mode)
                                          for _ in range(2)))
        self.decoder = nn.ModuleList([
            TransformerDecoderStage(4 * d, 2 * d, 2 * d, **stage, project=True),
            TransformerDecoderStage(2 * d, d, 2 * d, **stage, project=False),
        ])
        self.decoder_convs = nn.ModuleList([ConvDecoderStage(2 * d, d, d), ConvDecoderStage(d, 2 * b, 2 * b),
                                            ConvDecoderStage(2 * b, b, b)])
        self.head = nn.Conv2d(b, num_classes, 1)

    @property
    def embedding_grid(self) -> Tuple[int, int]:
        return tuple(self.position_embedding.shape[1:3])

    def position_embedding_for(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """The position embedding on a (grid_h, grid_w) token grid, (1, grid_h, grid_w, 4b):
        the stored one at its own grid, else resampled bicubically (align_corners=False)."""
        pe = self.position_embedding
        # An exported or traced graph always resamples (statically_true): at the stored grid bicubic
        # resampling is the identity, exactly.
        if statically_true(grid_h == pe.shape[1]) and statically_true(grid_w == pe.shape[2]):
            return pe
        pe = F.interpolate(pe.permute(0, 3, 1, 2), size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        return pe.permute(0, 2, 3, 1)

    def _check_input(self, x) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"MTUNet: argument 'x' must be a Tensor, got {type(x).__name__}")
        if (x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[2] % INPUT_STRIDE or x.shape[3] % INPUT_STRIDE
                or x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0):
            raise ValueError(f"MTUNet: argument 'x' must have shape (B, {self.in_channels}, H, W) with B ≥ 1 and H, W "
                             f"positive multiples of {INPUT_STRIDE}, got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        features = []
        h = x
        for conv in self.encoder_convs:
            h = conv(h)
            features.append(h)
            h = F.max_pool2d(h, 2)
        h = self.token_projection(h)  # (B, 4b, H/8, W/8)
        tokens = h.permute(0, 2, 3, 1) + self.position_embedding_for(h.shape[2], h.shape[3])
        skips = []
        for stage in self.encoder:
            h, skip = stage(tokens)
            skips.append(skip)
            tokens = h.permute(0, 2, 3, 1)
        tokens = self.bottleneck(tokens)
        for stage, skip in zip(self.decoder, reversed(skips)):
            tokens = stage(tokens.permute(0, 3, 1, 2), skip)
        h = tokens.permute(0, 3, 1, 2)
        for stage, skip in zip(self.decoder_convs, reversed(features)):
            h = stage(h, skip)
        return self.head(h)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, num_classes={self.num_classes}, base_channels={self.base_channels}, "
                f"num_heads={self.num_heads}, window_size={self.window_size}, embedding_grid={self.embedding_grid}, "
                f"pad_mode={self.pad_mode!r}")

    # -- original checkpoints ------------------------------------------------------------------

    @classmethod
    def from_original_state_dict(cls, state_dict: Mapping[str, torch.Tensor], *, in_channels: int = 3,
                                 pad_mode: str = "mtunet") -> "MTUNet":
        """A model holding the weights of an original ``MTUNet(out_ch)`` state_dict.

        num_classes, base_channels, num_heads, window_size and the embedding grid are read from the
        tensors' shapes; ``in_channels`` is 3 (the original's) or 1 (see :func:`convert_original_state_dict`).
        With the default ``pad_mode`` the model gives the original's outputs on the original's inputs.
        The model is on the state_dict's device and dtype (parameters), in training mode as a new module is.
        """
        hp = _original_hyperparameters(state_dict)
        # built on the meta device and then given copies of the checkpoint's tensors: no random
        # initialisation of ~75M parameters that would be overwritten at once
        with torch.device("meta"):
            model = cls(in_channels, hp["num_classes"], base_channels=hp["base_channels"], num_heads=hp["num_heads"],
                        window_size=hp["window_size"], embedding_grid=hp["embedding_grid"], pad_mode=pad_mode)
        model.load_original_state_dict(state_dict, assign=True)
        return model

    def load_original_state_dict(self, state_dict: Mapping[str, torch.Tensor], *, assign: bool = False) -> None:
        """Load an original ``MTUNet`` state_dict into this model (strict: every key of the original
        is mapped or one of :data:`DROPPED_ORIGINAL_PARAMETERS`, every key here is filled).
        ``assign=True`` gives the model copies of the checkpoint's tensors (their device and dtype)
        instead of copying into its own (as ``nn.Module.load_state_dict(assign=True)``)."""
        mapped = convert_original_state_dict(state_dict, in_channels=self.in_channels)
        misfit = state_dict_misfit(self.state_dict(), mapped)
        if misfit:
            raise ValueError(f"MTUNet.load_original_state_dict: the state_dict does not fit this model: {misfit}")
        if assign:  # own storage: the mapped tensors may be views of the caller's
            mapped = {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in mapped.items()}
        self.load_state_dict(mapped, strict=True, assign=assign)


# ---------------------------------------------------------------------------------------------
# Key map: original MTUNet state_dict -> this model
# ---------------------------------------------------------------------------------------------

_ORIGINAL_FIRST_CONV = "stem.model.res1.conv.0.conv.weight"

# Original parameters (suffixes inside each mixed-transformer module) with no effect on the output.
DROPPED_ORIGINAL_PARAMETERS: Tuple[str, ...] = (
    "ElayerNorm.bias",                                # constant over tokens after query_liner -> softmax over tokens
    "CSAttention.win_atten.attention.key_layer.bias",  # q·b_k is constant over the keys of a softmax
    "CSAttention.global_atten.key_layer.bias",         # idem (axial scores)
    "CSAttention.global_atten.out.weight",            # built, never called
    "CSAttention.global_atten.out.bias",
    "CSAttention.gaussiantrans.bias",                 # constant inside both softmaxes
    "EAttention.query_liner.bias",                    # constant over the tokens the softmax runs over
    "EAttention.linear_0.bias",                       # idem
)

_WEIGHT, _WEIGHT_BIAS = ("weight",), ("weight", "bias")
_BATCH_NORM = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _renames(*modules: Tuple[str, str, Tuple[str, ...]]) -> Dict[str, str]:
    """{original key: key here} from rows (original module, module here, its parameter names)."""
    return {f"{old}.{name}": f"{new}.{name}" for old, new, names in modules for name in names}


# Inside one original module: the rest of its keys -> the rest of ours (None: dropped). Only the
# modules are renamed; the parameter names stay.
_WHOLE = {"weight": "weight", "bias": "bias"}  # a Conv2d / ConvTranspose2d kept as it is
_CONV_BN = _renames(("conv", "conv", _WEIGHT), ("bn", "norm", _BATCH_NORM))  # ConvBNReLU -> ConvNormAct
_DOUBLE_CONV = _renames(  # DoubleConv -> ResidualDoubleConv
    ("conv.0.conv", "conv1.conv", _WEIGHT), ("conv.0.bn", "conv1.norm", _BATCH_NORM),
    ("conv.1.conv", "conv2.conv", _WEIGHT), ("conv.1.bn", "conv2.norm", _BATCH_NORM),
    ("conv1", "pointwise", _WEIGHT_BIAS), ("bn", "pointwise_norm", _BATCH_NORM))
_MIXED_BLOCK = {**dict.fromkeys(DROPPED_ORIGINAL_PARAMETERS), **_renames(  # EAmodule -> MixedTransformerBlock
    ("SlayerNorm", "norm_attention", _WEIGHT_BIAS),
    ("ElayerNorm", "norm_external", _WEIGHT),
    ("CSAttention.win_atten.attention.query_layer", "attention.local.query", _WEIGHT_BIAS),
    ("CSAttention.win_atten.attention.key_layer", "attention.local.key", _WEIGHT),
    ("CSAttention.win_atten.attention.value_layer", "attention.local.value", _WEIGHT_BIAS),
    ("CSAttention.win_atten.attention.out", "attention.local.proj", _WEIGHT_BIAS),
    ("CSAttention.dlightconv.linear", "attention.aggregate.score", _WEIGHT_BIAS),
    ("CSAttention.global_atten.query_layer", "attention.global_attention.query", _WEIGHT_BIAS),
    ("CSAttention.global_atten.key_layer", "attention.global_attention.key", _WEIGHT),
    ("CSAttention.global_atten.value_layer", "attention.global_attention.value", _WEIGHT_BIAS),
    ("CSAttention.gaussiantrans", "attention.global_attention", ("shift",)),
    ("CSAttention.queeze", "attention.fuse", _WEIGHT_BIAS),
    ("EAttention.query_liner", "external.query", _WEIGHT),
    ("EAttention.linear_0", "external.memory_key", _WEIGHT),
    ("EAttention.linear_1", "external.memory_value", _WEIGHT_BIAS),
    ("EAttention.proj", "external.proj", _WEIGHT_BIAS))}

# The CNN parts (fixed in the original): original module -> (module here, the renames inside).
_CNN_MODULES = {
    "stem.trans_dim.": ("token_projection.", _CONV_BN),
    "SegmentationHead.": ("head.", _WHOLE),
    **{f"stem.model.res{i + 1}.": (f"encoder_convs.{i}.", _DOUBLE_CONV) for i in range(3)},
    **{f"decoder_stem.block.trans{i + 1}.": (f"decoder_convs.{i}.upsample.", _WHOLE) for i in range(3)},
    **{f"decoder_stem.block.res{i + 1}.": (f"decoder_convs.{i}.conv.", _DOUBLE_CONV) for i in range(3)},
}
# The transformer stages (as many as the original's configs say): the modules of an original
# ``encoder.{s}.block`` / ``decoder.{s}.block`` list, index by index, here.
_ENCODER_BLOCK = (("blocks.0.", _MIXED_BLOCK), ("blocks.1.", _MIXED_BLOCK), ("downsample.", _CONV_BN))
_DECODER_BLOCK = (("upsample.", _WHOLE), ("blocks.0.", _MIXED_BLOCK), ("blocks.1.", _MIXED_BLOCK))
_PROJECTED_DECODER_BLOCK = _DECODER_BLOCK[:1] + (("project.", _WHOLE),) + _DECODER_BLOCK[1:]


def _locate(key: str, projected_stages) -> Tuple[str, Mapping[str, Optional[str]], str]:
    """An original key as (its module's prefix here, the renames inside that module, the rest of the key)."""
    for old, (new, renames) in _CNN_MODULES.items():
        if key.startswith(old):
            return new, renames, key[len(old):]
    m = re.fullmatch(r"bottleneck\.([01])\.(.+)", key)
    if m:
        return f"bottleneck.{m[1]}.", _MIXED_BLOCK, m[2]
    m = re.fullmatch(r"(encoder|decoder)\.(\d+)\.block\.(\d+)\.(.+)", key)
    if m:
        block = (_ENCODER_BLOCK if m[1] == "encoder" else
                 _PROJECTED_DECODER_BLOCK if int(m[2]) in projected_stages else _DECODER_BLOCK)
        if int(m[3]) < len(block):
            module, renames = block[int(m[3])]
            return f"{m[1]}.{m[2]}.{module}", renames, m[4]
    return "", {}, key


def _map_key(key: str, projected_stages) -> Optional[str]:
    """Where the original's ``key`` goes here (None: a parameter without effect, dropped)."""
    if key == "stem.position_embedding":
        return "position_embedding"
    prefix, renames, rest = _locate(key, projected_stages)
    if rest not in renames:
        raise ValueError(f"convert_original_state_dict: unexpected key {key!r} (not a key of MT-UNet's MTUNet)")
    return None if renames[rest] is None else prefix + renames[rest]


def _original_hyperparameters(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, object]:
    needed = (_ORIGINAL_FIRST_CONV, "SegmentationHead.weight", "stem.position_embedding",
              "encoder.0.block.0.EAttention.linear_0.weight", "encoder.0.block.0.CSAttention.dlightconv.linear.weight")
    missing = [k for k in needed if k not in state_dict]
    if missing:
        raise ValueError(f"MTUNet.from_original_state_dict: not an MT-UNet MTUNet state_dict, missing keys {missing}")
    first = state_dict[_ORIGINAL_FIRST_CONV]
    if first.dim() != 4 or first.shape[1] != 3:
        raise ValueError(f"MTUNet.from_original_state_dict: '{_ORIGINAL_FIRST_CONV}' must have shape (b, 3, 3, 3), "
                         f"got {tuple(first.shape)}")
    pe = state_dict["stem.position_embedding"]
    side = math.isqrt(pe.shape[1]) if pe.dim() == 3 else 0
    if pe.dim() != 3 or side * side != pe.shape[1]:
        raise ValueError(f"MTUNet.from_original_state_dict: 'stem.position_embedding' must have shape (1, s·s, C), "
                         f"got {tuple(pe.shape)}")
    head_dim = state_dict["encoder.0.block.0.EAttention.linear_0.weight"].shape[1]  # dim / head
    window = math.isqrt(state_dict["encoder.0.block.0.CSAttention.dlightconv.linear.weight"].shape[0])
    return {"num_classes": state_dict["SegmentationHead.weight"].shape[0], "base_channels": first.shape[0],
            "num_heads": pe.shape[2] // head_dim, "window_size": window, "embedding_grid": (side, side)}


def convert_original_state_dict(state_dict: Mapping[str, torch.Tensor], *, in_channels: int = 3
                                ) -> Dict[str, torch.Tensor]:
    """Map an original ``MTUNet`` state_dict to this module's keys (the tables above).

    Drops :data:`DROPPED_ORIGINAL_PARAMETERS`, stores the position embedding (1, N, C) on its grid
    (1, √N, √N, C) and turns the 1×1 convs that became Linear layers from (o, i, 1, 1) to (o, i).
    The original repeats a 1-channel input to 3 channels; with ``in_channels=1`` the first conv's
    kernel is summed over its 3 input channels, which is exactly that (a conv of 3 copies of x is
    the conv of x with the summed kernel). Raises ValueError on a key the original does not have.
    """
    if in_channels not in (1, 3):
        raise ValueError(f"convert_original_state_dict: argument 'in_channels' must be 1 or 3 (the original takes 3 "
                         f"and repeats 1), got {in_channels!r}")
    projected = {int(m[1]) for k in state_dict for m in [re.fullmatch(r"decoder\.(\d+)\.block\.1\.weight", k)] if m}
    out: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new = _map_key(key, projected)
        if new is None:
            continue
        if new == "position_embedding":
            side = math.isqrt(value.shape[1])
            value = value.reshape(1, side, side, value.shape[2])
        elif new.endswith(("attention.fuse.weight", "project.weight")):
            value = value.flatten(1)  # 1×1 conv (o, i, 1, 1) -> Linear (o, i)
        elif new == "encoder_convs.0.conv1.conv.weight" and in_channels == 1:
            value = value.sum(dim=1, keepdim=True)
        out[new] = value
    return out
