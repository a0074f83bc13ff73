"""Drop-in MT-UNet blocks: the originals' class names, constructor signatures, attributes and
``state_dict`` keys (Dootmaan/MT-UNet, ``MTUNet.py``), fast inside::

    from medattn_fast.compat.mtunet import EAmodule, CSAttention, MEAttention   # was: from MTUNet import ...

Same inputs, same outputs (layouts included: ``WinAttention`` returns the windowed
(b, p, p, win, c) tensor, ``Attention(axial=True)`` returns the scores), same parameters — also the
ones without effect, so checkpoints load with ``strict=True``. What changes is inside:

* ``WinAttention``: one vectorised :func:`medattn_fast.functional.window_attention` call (pad,
  partition, one GEMM for q/k/v, batched attention) instead of permute copies and a padding buffer
  built on the CPU and moved with ``.cuda()``; runs on any device and dtype.
* ``GaussianTrans``: :func:`medattn_fast.functional.gaussian_axial_from_scores` instead of a Python
  double loop over pixels with a host-to-device copy per pixel.
* ``MEAttention``: :func:`medattn_fast.functional.external_attention` (no head permutes).
* ``CSAttention``: the 1×1 ``queeze`` conv runs channel-last on the cropped grid and is split in
  its [global, local] halves, so the concatenation and the layout permutes are never materialised.

Every class here is a subclass of its namesake in :mod:`medattn_fast.reference.mtunet`, which
builds each container's children by name from the module of the container's own class: the module
tree, the construction order (one seed, the original's initial weights) and the keys are the
reference's by construction; only the forwards are replaced. Every class has
``from_original(module)``: build the twin of an original instance (constructor
arguments inferred from it), load its state_dict strictly, keep its device, dtype and training mode.
:data:`COMPAT_CLASSES` maps the original class names to these classes (used by ``convert``).
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as MF
from ..reference import mtunet as R
from ..reference.mtunet import MTUNET_CONFIGS
from ..nn.mtunet import merge_windows, window_aggregation
from ._adopt import adopt

__all__ = [name for name in R.__all__ if name != "DEFAULT_CONFIGS"] + ["COMPAT_CLASSES"]


# The original upsamples the global branch by a hard-coded 4 (UpsamplingBilinear2d(scale_factor=4)).
_GLOBAL_UPSAMPLE = 4


def _square_side(name: str, n: int) -> int:
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{name}: the token count must be a square h·h (MT-UNet's layout), got n = {n}")
    return side


def _tokens(name: str, x, dim: int) -> Tuple[int, int, int]:
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != dim:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: input must have shape (B, N, C) = (*, *, {dim}), got {got}")
    return tuple(x.shape)


class _FromOriginal:
    """``from_original``: constructor args from the original, strict state_dict load, same
    device/dtype/training mode. Subclasses implement ``_init_args(module) -> (args, kwargs)``."""

    @classmethod
    def _init_args(cls, module: nn.Module):  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    @classmethod
    def from_original(cls, module: nn.Module):
        """The fast twin of ``module`` (an instance of the original class of the same name)."""
        try:
            args, kwargs = cls._init_args(module)
        except (AttributeError, KeyError, TypeError) as exc:
            raise TypeError(
                f"{cls.__name__}.from_original: {type(module).__name__} does not have the structure of "
                f"MT-UNet's {cls.__name__} ({type(exc).__name__}: {exc})") from exc
        return adopt(cls(*args, **kwargs), module)


# ---------------------------------------------------------------------------------------------
# GaussianTrans
# ---------------------------------------------------------------------------------------------

class GaussianTrans(_FromOriginal, R.GaussianTrans):
    r"""MT-UNet's ``GaussianTrans()``: ``forward((x, atten_x, atten_y, value))`` -> (B, H, W, D).

    ``out[r,c] = Σ_j softmax_j(atten_x[r,c,j] − θ(j−c)² − β) v[r,j] + Σ_i softmax_i(atten_y[c,r,i] − θ(i−r)² − β) v[i,c]``
    with θ = ``shift``, β = ``bias`` (β cancels in both softmaxes: kept for the checkpoints, its
    gradient is 0). x (B, H, W, C) only carries the grid size, as in the original; atten_x
    (B, H, W, W), atten_y (B, W, H, H), value (B, H, W, D). Unlike the original, H ≠ W works.
    """

    @classmethod
    def _init_args(cls, module):
        return (), {}

    def forward(self, x):
        if not isinstance(x, (tuple, list)) or len(x) != 4:
            raise TypeError("GaussianTrans: input must be the tuple (x, atten_x, atten_y, value), "
                            f"got {type(x).__name__}" + (f" of length {len(x)}" if isinstance(x, (tuple, list)) else ""))
        grid, atten_x, atten_y, value = x
        if isinstance(grid, torch.Tensor) and isinstance(value, torch.Tensor) and grid.shape[1:3] != value.shape[1:3]:
            raise ValueError(f"GaussianTrans: x and value must share the grid (B, H, W, ·), got x {tuple(grid.shape)} "
                             f"and value {tuple(value.shape)}")
        return MF.gaussian_axial_from_scores(atten_x, atten_y, value, self.shift, bias=self.bias)


# ---------------------------------------------------------------------------------------------
# Attention (window mode and axial-scores mode)
# ---------------------------------------------------------------------------------------------

class Attention(_FromOriginal, R.Attention):
    r"""MT-UNet's ``Attention(dim, configs, axial=False)``.

    ``axial=False``: x (..., win, dim) -> (..., win, dim), multi-head softmax attention over the
    ``win`` tokens (scale 1/sqrt(d), d = dim/head), then ``out``; one GEMM for q/k/v, heads as a
    batch dimension of strided views. (Inside WinAttention the whole window pass is one
    :func:`~medattn_fast.functional.window_attention` call instead.)

    ``axial=True``: x (b, h, w, dim) -> (atten_x (b, h, w, w), atten_y (b, w, h, h), value
    (b, h, w, dim)): single-head row and column scores ``q·k`` (no scaling) from strided views, no
    contiguous copies. ``out`` exists but is not used in this mode (as in the original).
    ``key_layer.bias`` has no effect in either mode.
    """

    @classmethod
    def _init_args(cls, module):
        return (module.dim, {"head": module.num_head}), {"axial": bool(module.axial)}

    def projection_weights(self):
        """(query_weight, query_bias, key_weight, key_bias, value_weight, value_bias, out_weight,
        out_bias), in the order :func:`~medattn_fast.functional.window_attention` takes them."""
        return (self.query_layer.weight, self.query_layer.bias, self.key_layer.weight, self.key_layer.bias,
                self.value_layer.weight, self.value_layer.bias, self.out.weight, self.out.bias)

    def _qkv(self, x):
        weight = torch.cat((self.query_layer.weight, self.key_layer.weight, self.value_layer.weight))
        bias = torch.cat((self.query_layer.bias, self.key_layer.bias, self.value_layer.bias))
        return F.linear(x, weight, bias).split(self.all_head_size, dim=-1)

    def forward(self, x):
        if not isinstance(x, torch.Tensor) or x.shape[-1] != self.dim or x.dim() < (4 if self.axial else 2):
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            want = f"(b, h, w, {self.dim})" if self.axial else f"(..., win, {self.dim})"
            raise ValueError(f"Attention: input must have shape {want}, got {got}")
        q, k, v = self._qkv(x)
        if self.axial:
            if x.dim() != 4:
                raise ValueError(f"Attention: input must have shape (b, h, w, {self.dim}), got {tuple(x.shape)}")
            atten_x = torch.matmul(q, k.transpose(-1, -2))  # (b, h, w, w): along each row
            atten_y = torch.matmul(q.transpose(1, 2), k.permute(0, 2, 3, 1))  # (b, w, h, h): along each column
            return atten_x, atten_y, v
        heads, d = self.num_head, self.attention_head_size
        q, k, v = (t.unflatten(-1, (heads, d)).transpose(-2, -3) for t in (q, k, v))  # (..., heads, win, d)
        # plain batched matmuls: windows are short (see ops.window), the (win, win) scores are small
        probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(d)), dim=-1)
        return self.out(torch.matmul(probs, v).transpose(-2, -3).flatten(-2))


# ---------------------------------------------------------------------------------------------
# WinAttention, DlightConv
# ---------------------------------------------------------------------------------------------

class WinAttention(_FromOriginal, R.WinAttention):
    r"""MT-UNet's ``WinAttention(configs, dim)``: tokens (b, n, c), n = h·h -> (b, p, p, ws², c).

    The original's padding exactly (zeros on the right/bottom strips, the bottom-right corner a copy
    of x's last block, padded tokens unmasked), via ``window_attention(pad_mode="mtunet",
    layout="windows")``, on x's own device (no ``.cuda()``).
    """

    @classmethod
    def _init_args(cls, module):
        att = module.attention
        return ({"win_size": module.window_size, "head": att.num_head}, att.dim), {}

    def forward(self, x):
        b, n, c = _tokens("WinAttention", x, self.attention.dim)
        side = _square_side("WinAttention", n)
        return MF.window_attention(x.reshape(b, side, side, c), *self.attention.projection_weights(),
                                   window_size=self.window_size, num_heads=self.attention.num_head,
                                   pad_mode="mtunet", layout="windows")


class DlightConv(_FromOriginal, R.DlightConv):
    r"""MT-UNet's ``DlightConv(dim, configs)``: windows (b, p, p, win, c) -> (b, p, p, c),
    ``Σ_win softmax(linear(mean_win(x))) · x`` (the weighted sum as one batched matmul)."""

    @classmethod
    def _init_args(cls, module):
        win = module.linear.out_features
        side = math.isqrt(win)
        if side * side != win:
            raise TypeError(f"linear.out_features = {win} is not win_size²")
        return (module.linear.in_features, {"win_size": side}), {}

    def forward(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[-2:] != (self.linear.out_features,
                                                                                 self.linear.in_features):
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"DlightConv: input must have shape (..., win, c) = "
                             f"(..., {self.linear.out_features}, {self.linear.in_features}), got {got}")
        return window_aggregation(x, self.linear.weight, self.linear.bias)


# ---------------------------------------------------------------------------------------------
# CSAttention
# ---------------------------------------------------------------------------------------------

class CSAttention(_FromOriginal, R.CSAttention):
    r"""MT-UNet's ``CSAttention(dim, configs)``: tokens (b, n, c), n = h·h -> (b, n, c).

    local = windows of WinAttention on the padded (R, R) grid; global = GaussianTrans of the axial
    scores of DlightConv(windows) on the (p, p) grid of windows, upsampled ×4 bilinearly
    (align_corners=True, the original's hard-coded factor); out = ``queeze``([global, local])
    cropped to h × h. ``global_atten.out`` is kept (checkpoints) but never called, as in the
    original. ``queeze`` runs channel-last on the cropped grid, as two halves of its weight.
    """

    @classmethod
    def _init_args(cls, module):
        win = module.win_atten
        return (win.attention.dim, {"win_size": win.window_size, "head": win.attention.num_head}), {}

    def forward(self, x):
        b, n, c = _tokens("CSAttention", x, self.win_atten.attention.dim)
        side = _square_side("CSAttention", n)
        if self.win_atten.window_size != _GLOBAL_UPSAMPLE:
            # The original fails here too: its ×4 global grid only matches the padded local grid
            # when the windows are 4×4.
            raise ValueError(f"CSAttention: configs['win_size'] must be {_GLOBAL_UPSAMPLE} (the global branch is "
                             f"upsampled ×{_GLOBAL_UPSAMPLE}), got {self.win_atten.window_size}")
        windows = self.win_atten(x)  # (b, p, p, win, c)
        local = merge_windows(windows)[:, :side, :side]  # (b, h, h, c), strided view

        tokens = self.dlightconv(windows)  # (b, p, p, c)
        atten_x, atten_y, value = self.global_atten(tokens)
        glob = self.gaussiantrans((tokens, atten_x, atten_y, value))  # (b, p, p, c)
        glob = F.interpolate(glob.permute(0, 3, 1, 2), scale_factor=_GLOBAL_UPSAMPLE, mode="bilinear",
                             align_corners=True)
        glob = glob.permute(0, 2, 3, 1)[:, :side, :side]  # (b, h, h, c)

        # queeze(cat[global, local]) as two channel-last GEMMs on the cropped grid
        weight = self.queeze.weight.flatten(1)  # (c, 2c)
        w_global, w_local = weight[:, :c], weight[:, c:]
        out = F.linear(glob, w_global) + F.linear(local, w_local, self.queeze.bias)
        return out.reshape(b, n, c)


# ---------------------------------------------------------------------------------------------
# MEAttention, EAmodule
# ---------------------------------------------------------------------------------------------

class MEAttention(_FromOriginal, R.MEAttention):
    r"""MT-UNet's ``MEAttention(dim, configs)``: (B, N, dim) -> (B, N, dim), external attention
    with 4·head heads, memories of 64 slots, softmax over tokens then over slots
    (:func:`~medattn_fast.functional.external_attention`). ``query_liner.bias`` and
    ``linear_0.bias`` have no effect (kept for the checkpoints)."""

    @classmethod
    def _init_args(cls, module):
        head, rem = divmod(module.num_heads, module.coef)
        if rem or module.coef != 4:
            raise TypeError(f"num_heads={module.num_heads}, coef={module.coef} do not come from MEAttention(dim, configs)")
        return (module.proj.out_features, {"head": head}), {}

    def forward(self, x):
        _tokens("MEAttention", x, self.proj.out_features)
        return MF.external_attention(x, self.query_liner.weight, self.query_liner.bias, self.linear_0.weight,
                                     self.linear_0.bias, self.linear_1.weight, self.linear_1.bias,
                                     self.proj.weight, self.proj.bias, num_heads=self.num_heads)


class EAmodule(_FromOriginal, R.EAmodule):
    r"""MT-UNet's mixed transformer module ``EAmodule(dim)``: (B, N, dim) -> (B, N, dim).

    ``x = x + CSAttention(SlayerNorm(x))``; ``x = x + EAttention(ElayerNorm(x))`` (LayerNorm eps
    1e-6). The original reads a module-level ``configs``; here it is an argument defaulting to that
    dict (:data:`MTUNET_CONFIGS`). ``ElayerNorm.bias`` has no effect (kept for the checkpoints).
    """

    @classmethod
    def _init_args(cls, module):
        win = module.CSAttention.win_atten
        return (module.SlayerNorm.normalized_shape[0],), {
            "configs": {"win_size": win.window_size, "head": win.attention.num_head}}



COMPAT_CLASSES = {
    "GaussianTrans": GaussianTrans,
    "Attention": Attention,
    "WinAttention": WinAttention,
    "DlightConv": DlightConv,
    "CSAttention": CSAttention,
    "MEAttention": MEAttention,
    "EAmodule": EAmodule,
}


# ---------------------------------------------------------------------------------------------
# The whole network: MT-UNet's CNN stem/decoder, encoder/decoder blocks and MTUNet
# ---------------------------------------------------------------------------------------------
#
# The CNN parts (ConvBNReLU, DoubleConv, U_encoder, U_decoder, DecoderStem, Stem) are plain
# convolutions with nothing to fuse: the reference's classes, named here so that the reference
# containers (which build their children by name from the module of their own class) build this
# module's classes at every level. They are left out of COMPAT_CLASSES: swapping them would change
# nothing, and their generic names (``DoubleConv``, ``Stem``) match other networks' classes.
# encoder_block, decoder_block and MTUNet are in it (they hold the mixed-transformer modules).


# The original's Stem: a (1, 784, 256) position embedding, i.e. a 28×28 token grid (224² input).
_EMBED_TOKENS, _EMBED_DIM = 784, 256
# 3 max-pools before the tokens, then two stride-2 convs that the decoder's transposed convs undo.
_STEM_STRIDE, _TOKEN_STRIDE = 8, 4


def _configs_of(ea: nn.Module) -> Dict[str, object]:
    """The configs (win_size, head) an EAmodule-like module was built with."""
    win = ea.CSAttention.win_atten
    return {"win_size": win.window_size, "head": win.attention.num_head}


class ConvBNReLU(_FromOriginal, R.ConvBNReLU):
    """MT-UNet's ``ConvBNReLU(c_in, c_out, kernel_size, stride=1, padding=1, activation=True)``:
    Conv2d (no bias) -> BatchNorm2d -> ReLU (skipped when ``activation=False``)."""

    @classmethod
    def _init_args(cls, module):
        conv = module.conv
        return (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                bool(module.activation)), {}



class DoubleConv(_FromOriginal, R.DoubleConv):
    """MT-UNet's ``DoubleConv(cin, cout)``: h = ConvBN(ConvBNReLU(x)) (3×3 each), then
    ``relu(h + BN(conv1x1(h)))``."""

    @classmethod
    def _init_args(cls, module):
        return (module.conv[0].conv.in_channels, module.conv[0].conv.out_channels), {}



class U_encoder(_FromOriginal, R.U_encoder):
    """MT-UNet's CNN encoder: (B, 3, H, W) -> ((B, 256, H/8, W/8), [f1 (64, H), f2 (128, H/2),
    f3 (256, H/4)]): DoubleConv then 2×2 max-pool, three times."""

    @classmethod
    def _init_args(cls, module):
        return (), {}



class U_decoder(_FromOriginal, R.U_decoder):
    """MT-UNet's CNN decoder: (B, 512, H/8, W/8), [f1, f2, f3] -> (B, 64, H, W); each stage
    ``res_i(cat[skip, trans_i(x)])`` (the skip first)."""

    @classmethod
    def _init_args(cls, module):
        return (), {}



class DecoderStem(_FromOriginal, R.DecoderStem):
    """MT-UNet's ``DecoderStem()``: :class:`U_decoder` nested as ``block``."""

    @classmethod
    def _init_args(cls, module):
        return (), {}



class Stem(_FromOriginal, R.Stem):
    r"""MT-UNet's ``Stem()``: (B, 3, H, W) -> (tokens (B, N, 256), [f1, f2, f3]).

    :class:`U_encoder`, the 1×1 ``trans_dim`` ConvBNReLU, row-major tokens plus
    ``position_embedding`` (1, N, 256). The original's N is 784 (a 28×28 grid: 224² input only);
    ``num_tokens`` (keyword, not in the original) builds another square embedding. An input whose
    token grid does not match the embedding raises ValueError (the original fails in the addition);
    :class:`medattn_fast.models.MTUNet` interpolates the embedding instead.
    """

    def __init__(self, *, num_tokens=_EMBED_TOKENS):
        super().__init__()
        if num_tokens != _EMBED_TOKENS:
            self.position_embedding = nn.Parameter(torch.zeros((1, num_tokens, _EMBED_DIM)))

    @classmethod
    def _init_args(cls, module):
        return (), {"num_tokens": module.position_embedding.shape[1]}

    def forward(self, x):
        x, features = self.model(x)
        x = self.trans_dim(x)
        B, C, H, W = x.shape
        if H * W != self.position_embedding.shape[1]:
            raise ValueError(f"Stem: the token grid must have {self.position_embedding.shape[1]} tokens (the position "
                             f"embedding's), got {H}×{W} = {H * W}")
        # tokens (B, N, C) straight from the channel-last view: one copy, fused with the addition
        return x.permute(0, 2, 3, 1).reshape(B, H * W, C) + self.position_embedding, features


class encoder_block(_FromOriginal, R.encoder_block):
    r"""MT-UNet's ``encoder_block(dim)``: tokens (B, h·h, dim) -> ((B, 2·dim, h/2, h/2), skip
    (B, dim, h, h)): two fast :class:`EAmodule`, then the stride-2 2×2 ConvBNReLU. The skip is a
    channel-first view of the tokens, as in the original. ``configs`` defaults to
    :data:`MTUNET_CONFIGS` (the original's module-level dict)."""

    @classmethod
    def _init_args(cls, module):
        return (module.block[0].SlayerNorm.normalized_shape[0],), {"configs": _configs_of(module.block[0])}

    def forward(self, x):
        B, N, C = _tokens("encoder_block", x, self.block[2].conv.in_channels)
        side = _square_side("encoder_block", N)
        x = self.block[1](self.block[0](x))
        skip = x.view(B, side, side, C).permute(0, 3, 1, 2)  # (B, C, h, h) view
        return self.block[2](skip), skip


class decoder_block(_FromOriginal, R.decoder_block):
    r"""MT-UNet's ``decoder_block(dim, flag)``: (B, dim, h, w), skip -> tokens (B, 4hw, C).

    ``flag=False``: up (ConvTranspose2d dim -> dim/2), 1×1 conv of ``cat[x, skip]`` -> dim/2, two
    EAmodule(dim/2). ``flag=True``: up, ``cat[x, skip]`` (dim channels), two EAmodule(dim).
    Inside, the join is built channel-last, directly as tokens: with the 1×1 conv it is two GEMMs
    on the halves of its weight (no concatenation), without it one channel-last concatenation
    (no extra permute copy).
    """

    @classmethod
    def _init_args(cls, module):
        flag = bool(module.flag)
        ea = module.block[1 if flag else 2]
        return (module.block[0].in_channels, flag), {"configs": _configs_of(ea)}

    def forward(self, x, skip):
        up = self.block[0]
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != up.in_channels:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"decoder_block: argument 'x' must have shape (B, {up.in_channels}, h, w), got {got}")
        B, _, h, w = x.shape
        want = (B, self.block[1].in_channels - up.out_channels if not self.flag else up.out_channels, 2 * h, 2 * w)
        if not isinstance(skip, torch.Tensor) or tuple(skip.shape) != want:
            got = tuple(skip.shape) if isinstance(skip, torch.Tensor) else type(skip).__name__
            raise ValueError(f"decoder_block: argument 'skip' must have shape {want}, got {got}")
        x_last = up(x).permute(0, 2, 3, 1)  # (B, 2h, 2w, dim/2) views
        skip_last = skip.permute(0, 2, 3, 1)
        if not self.flag:
            conv = self.block[1]
            weight = conv.weight.flatten(1)  # (dim/2, dim) over cat[x, skip]
            w_x, w_skip = weight[:, :up.out_channels], weight[:, up.out_channels:]
            tokens = F.linear(x_last, w_x) + F.linear(skip_last, w_skip, conv.bias)
            first = 2
        else:
            tokens = torch.cat((x_last, skip_last), dim=-1)
            first = 1
        tokens = tokens.reshape(B, 4 * h * w, tokens.shape[-1])
        return self.block[first + 1](self.block[first](tokens))


class MTUNet(_FromOriginal, R.MTUNet):
    r"""MT-UNet (Dootmaan/MT-UNet ``MTUNet(out_ch=4)``): (B, 3 or 1, 224, 224) -> (B, out_ch, 224, 224).

    The original's modules, keys (487 for ``MTUNet(9)``) and math, on the fast blocks:
    Stem (CNN encoder + tokens + position embedding) -> encoder_block(256), encoder_block(512)
    -> bottleneck EAmodule(1024) ×2 -> decoder_block(1024, False), decoder_block(512, True) (the
    deepest skip first) -> DecoderStem (CNN decoder with the stem's features) -> 1×1
    ``SegmentationHead``. A 1-channel input is used as 3 identical channels (the original repeats
    it; here an expanded view).

    Like the original it takes square inputs of side 8·sqrt(N) for the N-token position embedding
    (224 for the original's 784); ``num_tokens`` (keyword, not in the original) sets another
    square embedding whose side is a multiple of 4. For any size, H ≠ W, and 1- or 3-channel
    inputs, use :class:`medattn_fast.models.MTUNet` (it loads these checkpoints).
    """

    def __init__(self, out_ch=4, configs=MTUNET_CONFIGS, *, num_tokens=_EMBED_TOKENS):
        side = math.isqrt(num_tokens)
        if side * side != num_tokens or side % _TOKEN_STRIDE != 0:
            raise ValueError(f"MTUNet: num_tokens must be s·s with s a multiple of {_TOKEN_STRIDE} (two stride-2 "
                             f"stages follow), got {num_tokens}")
        super().__init__(out_ch, configs)   # the original's modules in its order: one seed, its weights
        if num_tokens != _EMBED_TOKENS:
            self.stem.position_embedding = nn.Parameter(torch.zeros((1, num_tokens, _EMBED_DIM)))

    @classmethod
    def _init_args(cls, module):
        configs = dict(MTUNET_CONFIGS, **_configs_of(module.bottleneck[0]))
        return (module.SegmentationHead.out_channels, configs), {
            "num_tokens": module.stem.position_embedding.shape[1]}

    def input_side(self) -> int:
        """The input side the position embedding fits (224 for the original's 784 tokens)."""
        return _STEM_STRIDE * math.isqrt(self.stem.position_embedding.shape[1])

    def forward(self, x):
        side = self.input_side()
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] not in (1, 3) or x.shape[2:] != (side, side):
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"MTUNet: argument 'x' must have shape (B, 1 or 3, {side}, {side}) (the position embedding "
                             f"has {self.stem.position_embedding.shape[1]} tokens), got {got}; "
                             "medattn_fast.models.MTUNet takes any size")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x, features = self.stem(x)  # (B, N, 256)
        skips = []
        for block in self.encoder:
            x, skip = block(x)  # x (B, 2C, h/2, h/2)
            skips.append(skip)
            B, C, H, W = x.shape
            x = x.permute(0, 2, 3, 1).reshape(B, H * W, C)
        x = self.bottleneck(x)
        B, N, C = x.shape
        h = math.isqrt(N)
        x = x.view(B, h, h, C).permute(0, 3, 1, 2)
        for block, skip in zip(self.decoder, reversed(skips)):
            x = block(x, skip)  # tokens (B, N, C)
            B, N, C = x.shape
            h = math.isqrt(N)
            x = x.view(B, h, h, C).permute(0, 3, 1, 2)
        return self.SegmentationHead(self.decoder_stem(x, features))


COMPAT_CLASSES.update({
    "encoder_block": encoder_block,
    "decoder_block": decoder_block,
    "MTUNet": MTUNet,
})
