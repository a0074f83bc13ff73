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

Every class has ``from_original(module)``: build the twin of an original instance (constructor
arguments inferred from it), load its state_dict strictly, keep its device, dtype and training mode.
:data:`COMPAT_CLASSES` maps the original class names to these classes (used by ``convert``).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as MF
from ..nn.mtunet import merge_windows, window_aggregation
from ._adopt import adopt

__all__ = [
    "MTUNET_CONFIGS",
    "GaussianTrans",
    "Attention",
    "WinAttention",
    "DlightConv",
    "CSAttention",
    "MEAttention",
    "EAmodule",
    "COMPAT_CLASSES",
]

# The original's module-level ``configs`` (Synapse model); EAmodule's default.
MTUNET_CONFIGS: Dict[str, object] = {
    "win_size": 4,
    "head": 8,
    "axis": [28, 16, 8],
    "encoder": [256, 512],
    "bottleneck": 1024,
    "decoder": [1024, 512],
    "decoder_stem": [(256, 512), (256, 256), (128, 64), 32],
}

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

class GaussianTrans(_FromOriginal, nn.Module):
    r"""MT-UNet's ``GaussianTrans()``: ``forward((x, atten_x, atten_y, value))`` -> (B, H, W, D).

    ``out[r,c] = Σ_j softmax_j(atten_x[r,c,j] − θ(j−c)² − β) v[r,j] + Σ_i softmax_i(atten_y[c,r,i] − θ(i−r)² − β) v[i,c]``
    with θ = ``shift``, β = ``bias`` (β cancels in both softmaxes: kept for the checkpoints, its
    gradient is 0). x (B, H, W, C) only carries the grid size, as in the original; atten_x
    (B, H, W, W), atten_y (B, W, H, H), value (B, H, W, D). Unlike the original, H ≠ W works.
    """

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(-torch.abs(torch.randn(1)))
        self.shift = nn.Parameter(torch.abs(torch.randn(1)))
        self.softmax = nn.Softmax(dim=-1)  # the original's attribute (no parameters)

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

class Attention(_FromOriginal, nn.Module):
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

    def __init__(self, dim, configs, axial=False):
        super().__init__()
        self.axial = axial
        self.dim = dim
        self.num_head = configs["head"]
        self.attention_head_size = int(self.dim / configs["head"])
        self.all_head_size = self.num_head * self.attention_head_size
        self.query_layer = nn.Linear(self.dim, self.all_head_size)
        self.key_layer = nn.Linear(self.dim, self.all_head_size)
        self.value_layer = nn.Linear(self.dim, self.all_head_size)
        self.out = nn.Linear(self.dim, self.dim)
        self.softmax = nn.Softmax(dim=-1)  # the original's attribute (no parameters)

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

class WinAttention(_FromOriginal, nn.Module):
    r"""MT-UNet's ``WinAttention(configs, dim)``: tokens (b, n, c), n = h·h -> (b, p, p, ws², c).

    The original's padding exactly (zeros on the right/bottom strips, the bottom-right corner a copy
    of x's last block, padded tokens unmasked), via ``window_attention(pad_mode="mtunet",
    layout="windows")``, on x's own device (no ``.cuda()``).
    """

    def __init__(self, configs, dim):
        super().__init__()
        self.window_size = configs["win_size"]
        self.attention = Attention(dim, configs)

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


class DlightConv(_FromOriginal, nn.Module):
    r"""MT-UNet's ``DlightConv(dim, configs)``: windows (b, p, p, win, c) -> (b, p, p, c),
    ``Σ_win softmax(linear(mean_win(x))) · x`` (the weighted sum as one batched matmul)."""

    def __init__(self, dim, configs):
        super().__init__()
        self.linear = nn.Linear(dim, configs["win_size"] * configs["win_size"])
        self.softmax = nn.Softmax(dim=-1)  # the original's attribute (no parameters)

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

class CSAttention(_FromOriginal, nn.Module):
    r"""MT-UNet's ``CSAttention(dim, configs)``: tokens (b, n, c), n = h·h -> (b, n, c).

    local = windows of WinAttention on the padded (R, R) grid; global = GaussianTrans of the axial
    scores of DlightConv(windows) on the (p, p) grid of windows, upsampled ×4 bilinearly
    (align_corners=True, the original's hard-coded factor); out = ``queeze``([global, local])
    cropped to h × h. ``global_atten.out`` is kept (checkpoints) but never called, as in the
    original. ``queeze`` runs channel-last on the cropped grid, as two halves of its weight.
    """

    def __init__(self, dim, configs):
        super().__init__()
        self.win_atten = WinAttention(configs, dim)
        self.dlightconv = DlightConv(dim, configs)
        self.global_atten = Attention(dim, configs, axial=True)
        self.gaussiantrans = GaussianTrans()
        self.up = nn.UpsamplingBilinear2d(scale_factor=_GLOBAL_UPSAMPLE)  # the original's attribute
        self.queeze = nn.Conv2d(2 * dim, dim, 1)

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

class MEAttention(_FromOriginal, nn.Module):
    r"""MT-UNet's ``MEAttention(dim, configs)``: (B, N, dim) -> (B, N, dim), external attention
    with 4·head heads, memories of 64 slots, softmax over tokens then over slots
    (:func:`~medattn_fast.functional.external_attention`). ``query_liner.bias`` and
    ``linear_0.bias`` have no effect (kept for the checkpoints)."""

    def __init__(self, dim, configs):
        super().__init__()
        self.num_heads = configs["head"]
        self.coef = 4
        self.query_liner = nn.Linear(dim, dim * self.coef)
        self.num_heads = self.coef * self.num_heads
        self.k = 256 // self.coef
        self.linear_0 = nn.Linear(dim * self.coef // self.num_heads, self.k)
        self.linear_1 = nn.Linear(self.k, dim * self.coef // self.num_heads)
        self.proj = nn.Linear(dim * self.coef, dim)

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


class EAmodule(_FromOriginal, nn.Module):
    r"""MT-UNet's mixed transformer module ``EAmodule(dim)``: (B, N, dim) -> (B, N, dim).

    ``x = x + CSAttention(SlayerNorm(x))``; ``x = x + EAttention(ElayerNorm(x))`` (LayerNorm eps
    1e-6). The original reads a module-level ``configs``; here it is an argument defaulting to that
    dict (:data:`MTUNET_CONFIGS`). ``ElayerNorm.bias`` has no effect (kept for the checkpoints).
    """

    def __init__(self, dim, configs=MTUNET_CONFIGS):
        super().__init__()
        self.SlayerNorm = nn.LayerNorm(dim, eps=1e-6)
        self.ElayerNorm = nn.LayerNorm(dim, eps=1e-6)
        self.CSAttention = CSAttention(dim, configs)
        self.EAttention = MEAttention(dim, configs)

    @classmethod
    def _init_args(cls, module):
        win = module.CSAttention.win_atten
        return (module.SlayerNorm.normalized_shape[0],), {
            "configs": {"win_size": win.window_size, "head": win.attention.num_head}}

    def forward(self, x):
        x = x + self.CSAttention(self.SlayerNorm(x))
        return x + self.EAttention(self.ElayerNorm(x))


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
# convolutions with nothing to fuse; they are here so that ``MTUNet`` and its pieces keep the
# original's names and keys. They are left out of COMPAT_CLASSES: swapping them would change
# nothing, and their generic names (``DoubleConv``, ``Stem``) match other networks' classes.
# encoder_block, decoder_block and MTUNet are in it (they hold the mixed-transformer modules).

__all__ += [
    "ConvBNReLU",
    "DoubleConv",
    "U_encoder",
    "U_decoder",
    "DecoderStem",
    "Stem",
    "encoder_block",
    "decoder_block",
    "MTUNet",
]

# The original's Stem: a (1, 784, 256) position embedding, i.e. a 28×28 token grid (224² input).
_EMBED_TOKENS, _EMBED_DIM = 784, 256
# 3 max-pools before the tokens, then two stride-2 convs that the decoder's transposed convs undo.
_STEM_STRIDE, _TOKEN_STRIDE = 8, 4


def _configs_of(ea: nn.Module) -> Dict[str, object]:
    """The configs (win_size, head) an EAmodule-like module was built with."""
    win = ea.CSAttention.win_atten
    return {"win_size": win.window_size, "head": win.attention.num_head}


class ConvBNReLU(_FromOriginal, nn.Module):
    """MT-UNet's ``ConvBNReLU(c_in, c_out, kernel_size, stride=1, padding=1, activation=True)``:
    Conv2d (no bias) -> BatchNorm2d -> ReLU (skipped when ``activation=False``)."""

    def __init__(self, c_in, c_out, kernel_size, stride=1, padding=1, activation=True):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size=kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.activation = activation

    @classmethod
    def _init_args(cls, module):
        conv = module.conv
        return (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                bool(module.activation)), {}

    def forward(self, x):
        x = self.bn(self.conv(x))
        return torch.relu(x) if self.activation else x


class DoubleConv(_FromOriginal, nn.Module):
    """MT-UNet's ``DoubleConv(cin, cout)``: h = ConvBN(ConvBNReLU(x)) (3×3 each), then
    ``relu(h + BN(conv1x1(h)))``."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Sequential(
            ConvBNReLU(cin, cout, 3, 1, padding=1),
            ConvBNReLU(cout, cout, 3, stride=1, padding=1, activation=False),
        )
        self.conv1 = nn.Conv2d(cout, cout, 1)
        self.relu = nn.ReLU()
        self.bn = nn.BatchNorm2d(cout)

    @classmethod
    def _init_args(cls, module):
        return (module.conv[0].conv.in_channels, module.conv[0].conv.out_channels), {}

    def forward(self, x):
        h = self.conv(x)
        return torch.relu(h + self.bn(self.conv1(h)))


class U_encoder(_FromOriginal, nn.Module):
    """MT-UNet's CNN encoder: (B, 3, H, W) -> ((B, 256, H/8, W/8), [f1 (64, H), f2 (128, H/2),
    f3 (256, H/4)]): DoubleConv then 2×2 max-pool, three times."""

    def __init__(self):
        super().__init__()
        self.res1 = DoubleConv(3, 64)
        self.pool1 = nn.MaxPool2d(2)
        self.res2 = DoubleConv(64, 128)
        self.pool2 = nn.MaxPool2d(2)
        self.res3 = DoubleConv(128, 256)
        self.pool3 = nn.MaxPool2d(2)

    @classmethod
    def _init_args(cls, module):
        return (), {}

    def forward(self, x):
        features = []
        for res, pool in ((self.res1, self.pool1), (self.res2, self.pool2), (self.res3, self.pool3)):
            x = res(x)
            features.append(x)
            x = pool(x)
        return x, features


class U_decoder(_FromOriginal, nn.Module):
    """MT-UNet's CNN decoder: (B, 512, H/8, W/8), [f1, f2, f3] -> (B, 64, H, W); each stage
    ``res_i(cat[skip, trans_i(x)])`` (the skip first)."""

    def __init__(self):
        super().__init__()
        self.trans1 = nn.ConvTranspose2d(512, 256, 2, stride=2)
        self.res1 = DoubleConv(512, 256)
        self.trans2 = nn.ConvTranspose2d(256, 128, 2, stride=2)
        self.res2 = DoubleConv(256, 128)
        self.trans3 = nn.ConvTranspose2d(128, 64, 2, stride=2)
        self.res3 = DoubleConv(128, 64)

    @classmethod
    def _init_args(cls, module):
        return (), {}

    def forward(self, x, feature):
        x = self.res1(torch.cat((feature[2], self.trans1(x)), dim=1))
        x = self.res2(torch.cat((feature[1], self.trans2(x)), dim=1))
        return self.res3(torch.cat((feature[0], self.trans3(x)), dim=1))


class DecoderStem(_FromOriginal, nn.Module):
    """MT-UNet's ``DecoderStem()``: :class:`U_decoder` nested as ``block``."""

    def __init__(self):
        super().__init__()
        self.block = U_decoder()

    @classmethod
    def _init_args(cls, module):
        return (), {}

    def forward(self, x, features):
        return self.block(x, features)


class Stem(_FromOriginal, nn.Module):
    r"""MT-UNet's ``Stem()``: (B, 3, H, W) -> (tokens (B, N, 256), [f1, f2, f3]).

    :class:`U_encoder`, the 1×1 ``trans_dim`` ConvBNReLU, row-major tokens plus
    ``position_embedding`` (1, N, 256). The original's N is 784 (a 28×28 grid: 224² input only);
    ``num_tokens`` (keyword, not in the original) builds another square embedding. An input whose
    token grid does not match the embedding raises ValueError (the original fails in the addition);
    :class:`medattn_fast.models.MTUNet` interpolates the embedding instead.
    """

    def __init__(self, *, num_tokens=_EMBED_TOKENS):
        super().__init__()
        self.model = U_encoder()
        self.trans_dim = ConvBNReLU(256, 256, 1, 1, 0)
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


class encoder_block(_FromOriginal, nn.Module):
    r"""MT-UNet's ``encoder_block(dim)``: tokens (B, h·h, dim) -> ((B, 2·dim, h/2, h/2), skip
    (B, dim, h, h)): two fast :class:`EAmodule`, then the stride-2 2×2 ConvBNReLU. The skip is a
    channel-first view of the tokens, as in the original. ``configs`` defaults to
    :data:`MTUNET_CONFIGS` (the original's module-level dict)."""

    def __init__(self, dim, configs=MTUNET_CONFIGS):
        super().__init__()
        self.block = nn.ModuleList([
            EAmodule(dim, configs),
            EAmodule(dim, configs),
            ConvBNReLU(dim, dim * 2, 2, stride=2, padding=0),
        ])

    @classmethod
    def _init_args(cls, module):
        return (module.block[0].SlayerNorm.normalized_shape[0],), {"configs": _configs_of(module.block[0])}

    def forward(self, x):
        B, N, C = _tokens("encoder_block", x, self.block[2].conv.in_channels)
        side = _square_side("encoder_block", N)
        x = self.block[1](self.block[0](x))
        skip = x.view(B, side, side, C).permute(0, 3, 1, 2)  # (B, C, h, h) view
        return self.block[2](skip), skip


class decoder_block(_FromOriginal, nn.Module):
    r"""MT-UNet's ``decoder_block(dim, flag)``: (B, dim, h, w), skip -> tokens (B, 4hw, C).

    ``flag=False``: up (ConvTranspose2d dim -> dim/2), 1×1 conv of ``cat[x, skip]`` -> dim/2, two
    EAmodule(dim/2). ``flag=True``: up, ``cat[x, skip]`` (dim channels), two EAmodule(dim).
    Inside, the join is built channel-last, directly as tokens: with the 1×1 conv it is two GEMMs
    on the halves of its weight (no concatenation), without it one channel-last concatenation
    (no extra permute copy).
    """

    def __init__(self, dim, flag, configs=MTUNET_CONFIGS):
        super().__init__()
        self.flag = flag
        if not self.flag:
            self.block = nn.ModuleList([
                nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2, padding=0),
                nn.Conv2d(dim, dim // 2, kernel_size=1, stride=1),
                EAmodule(dim // 2, configs),
                EAmodule(dim // 2, configs),
            ])
        else:
            self.block = nn.ModuleList([
                nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2, padding=0),
                EAmodule(dim, configs),
                EAmodule(dim, configs),
            ])

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


class MTUNet(_FromOriginal, nn.Module):
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
        super().__init__()
        side = math.isqrt(num_tokens)
        if side * side != num_tokens or side % _TOKEN_STRIDE != 0:
            raise ValueError(f"MTUNet: num_tokens must be s·s with s a multiple of {_TOKEN_STRIDE} (two stride-2 "
                             f"stages follow), got {num_tokens}")
        # built in the original's order (so one seed gives the original's initial weights)
        self.stem = Stem(num_tokens=num_tokens)
        self.encoder = nn.ModuleList()
        self.bottleneck = nn.Sequential(EAmodule(configs["bottleneck"], configs),
                                        EAmodule(configs["bottleneck"], configs))
        self.decoder = nn.ModuleList()
        self.decoder_stem = DecoderStem()
        for dim in configs["encoder"]:
            self.encoder.append(encoder_block(dim, configs))
        for dim in configs["decoder"][:-1]:
            self.decoder.append(decoder_block(dim, False, configs))
        self.decoder.append(decoder_block(configs["decoder"][-1], True, configs))
        self.SegmentationHead = nn.Conv2d(64, out_ch, 1)

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
