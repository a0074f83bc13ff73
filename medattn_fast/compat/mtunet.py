"""MT-UNet's blocks and network (Dootmaan/MT-UNet, ``MTUNet.py``; :mod:`medattn_fast.reference.mtunet`),
fast inside (see :mod:`medattn_fast.compat`)::

    from medattn_fast.compat.mtunet import EAmodule, MTUNet   # was: from MTUNet import ...

The reference containers build their children by name from the module of their own class, so
these subclasses get each other at every level of the tree. Parameters without effect are kept,
as in the original. The CNN parts (ConvBNReLU, DoubleConv, U_encoder, U_decoder,
DecoderStem, Stem) have nothing to fuse and are the reference's classes, re-exported.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as MF
from ..ops import _validate as V
from ..nn.mtunet import fuse_local_global, window_aggregation
from ..reference import mtunet as R
from ..reference.mtunet import (MTUNET_CONFIGS, ConvBNReLU, DecoderStem, DoubleConv,  # noqa: F401 (re-exported)
                                Stem, U_decoder, U_encoder)
from ._adopt import FromOriginal

__all__ = R.__all__ + ["COMPAT_CLASSES"]

# The original upsamples the global branch by a hard-coded 4 (UpsamplingBilinear2d(scale_factor=4)).
_GLOBAL_UPSAMPLE = 4
# The original's Stem: a (1, 784, 256) position embedding, i.e. a 28×28 token grid (224² input),
# after 3 max-pools; two stride-2 convs follow, undone by the decoder's transposed convs.
_EMBED_TOKENS, _EMBED_DIM, _STEM_STRIDE, _TOKEN_STRIDE = 784, 256, 8, 4


def _square_side(name: str, n: int) -> int:
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{name}: the token count must be a square h·h (MT-UNet's layout), got n = {n}")
    return side


def _check_shape(name: str, arg: str, x, names: str, want: Tuple) -> None:
    """The ops' input checks (:mod:`medattn_fast.ops._validate`): a floating tensor of shape ``want``
    (None: any size), its dims named ``names`` in the message."""
    V.tensor(name, arg, x)
    V.shape(name, arg, x, want, names)


def _configs_of(module: nn.Module) -> dict:
    """The configs (win_size, head) an EAmodule/CSAttention-like module was built with."""
    win = module.CSAttention.win_atten if hasattr(module, "CSAttention") else module.win_atten
    return {"win_size": win.window_size, "head": win.attention.num_head}


class GaussianTrans(FromOriginal, R.GaussianTrans):
    """Fused :func:`~medattn_fast.functional.gaussian_axial_from_scores` instead of the original's
    Python loop over pixels; H ≠ W works. ``forward((x, atten_x, atten_y, value))`` as the reference."""

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
        if isinstance(value, torch.Tensor) and value.device.type in ("cpu", "cuda") \
                and torch.is_autocast_enabled(value.device.type):
            # The original's loop is elementwise ops and softmaxes, none of which autocast
            # casts: it computes in its inputs' dtypes (θ float32 promotes them) and returns
            # value's. So does the op with autocast off (float32 accumulation), on the scores in
            # value's dtype and θ as it is (rounding θ to 16 bits would cost its gradient).
            dtype = value.dtype
            with torch.autocast(value.device.type, enabled=False):
                return MF.gaussian_axial_from_scores(atten_x.to(dtype), atten_y.to(dtype), value, self.shift,
                                                     bias=self.bias)
        return MF.gaussian_axial_from_scores(atten_x, atten_y, value, self.shift, bias=self.bias)


class Attention(FromOriginal, R.Attention):
    """One GEMM for q/k/v and strided head views instead of permute copies; the axial scores from
    strided views (no contiguous copies). Same two modes, inputs and outputs as the reference."""

    @classmethod
    def _init_args(cls, module):
        return (module.dim, {"head": module.num_head}), {"axial": bool(module.axial)}

    def projection_weights(self):
        """(query_weight, query_bias, key_weight, key_bias, value_weight, value_bias, out_weight,
        out_bias), in the order :func:`~medattn_fast.functional.window_attention` takes them."""
        return (self.query_layer.weight, self.query_layer.bias, self.key_layer.weight, self.key_layer.bias,
                self.value_layer.weight, self.value_layer.bias, self.out.weight, self.out.bias)

    def forward(self, x):
        if not isinstance(x, torch.Tensor) or x.shape[-1] != self.dim or x.dim() < 2 or (self.axial and x.dim() != 4):
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            want = f"(b, h, w, {self.dim})" if self.axial else f"(..., win, {self.dim})"
            raise ValueError(f"Attention: input must have shape {want}, got {got}")
        weight = torch.cat((self.query_layer.weight, self.key_layer.weight, self.value_layer.weight))
        bias = torch.cat((self.query_layer.bias, self.key_layer.bias, self.value_layer.bias))
        q, k, v = F.linear(x, weight, bias).split(self.all_head_size, dim=-1)
        if self.axial:
            atten_x = torch.matmul(q, k.transpose(-1, -2))  # (b, h, w, w): along each row
            atten_y = torch.matmul(q.transpose(1, 2), k.permute(0, 2, 3, 1))  # (b, w, h, h): along each column
            return atten_x, atten_y, v
        heads, d = self.num_head, self.attention_head_size
        q, k, v = (t.unflatten(-1, (heads, d)).transpose(-2, -3) for t in (q, k, v))  # (..., heads, win, d)
        probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(d)), dim=-1)
        return self.out(torch.matmul(probs, v).transpose(-2, -3).flatten(-2))


class WinAttention(FromOriginal, R.WinAttention):
    """One :func:`~medattn_fast.functional.window_attention` call (``pad_mode="mtunet"``: the
    original's padding exactly; ``layout="windows"``) on x's own device, no ``.cuda()``."""

    @classmethod
    def _init_args(cls, module):
        att = module.attention
        return ({"win_size": module.window_size, "head": att.num_head}, att.dim), {}

    def forward(self, x):
        _check_shape("WinAttention", "x", x, "(B, N, C)", (None, None, self.attention.dim))
        b, n, c = x.shape
        side = _square_side("WinAttention", n)
        return MF.window_attention(x.reshape(b, side, side, c), *self.attention.projection_weights(),
                                   window_size=self.window_size, num_heads=self.attention.num_head,
                                   pad_mode="mtunet", layout="windows")


class DlightConv(FromOriginal, R.DlightConv):
    """The softmax-weighted sum over each window as one batched matmul
    (:func:`medattn_fast.nn.mtunet.window_aggregation`)."""

    @classmethod
    def _init_args(cls, module):
        win = module.linear.out_features
        if math.isqrt(win) ** 2 != win:
            raise ValueError(f"linear.out_features = {win} is not win_size²")
        return (module.linear.in_features, {"win_size": math.isqrt(win)}), {}

    def forward(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[-2:] != (self.linear.out_features,
                                                                                 self.linear.in_features):
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"DlightConv: input must have shape (..., win, c) = "
                             f"(..., {self.linear.out_features}, {self.linear.in_features}), got {got}")
        return window_aggregation(x, self.linear.weight, self.linear.bias)


class CSAttention(FromOriginal, R.CSAttention):
    """The fast blocks, and ``queeze`` run channel-last on the cropped grid as two GEMMs on the
    halves of its weight (:func:`medattn_fast.nn.mtunet.fuse_local_global`): the concatenation
    and the layout permutes are never materialised. ``global_atten.out`` is kept, never called."""

    @classmethod
    def _init_args(cls, module):
        return (module.win_atten.attention.dim, _configs_of(module)), {}

    def forward(self, x):
        _check_shape("CSAttention", "x", x, "(B, N, C)", (None, None, self.win_atten.attention.dim))
        b, n, c = x.shape
        side = _square_side("CSAttention", n)
        if self.win_atten.window_size != _GLOBAL_UPSAMPLE:
            # The original fails here too: its ×4 global grid only matches the padded local grid
            # when the windows are 4×4.
            raise ValueError(f"CSAttention: configs['win_size'] must be {_GLOBAL_UPSAMPLE} (the global branch is "
                             f"upsampled ×{_GLOBAL_UPSAMPLE}), got {self.win_atten.window_size}")
        windows = self.win_atten(x)  # (b, p, p, win, c)
        tokens = self.dlightconv(windows)  # (b, p, p, c)
        glob = self.gaussiantrans((tokens, *self.global_atten(tokens)))  # (b, p, p, c)
        out = fuse_local_global(windows, glob, (side, side), self.queeze.weight.flatten(1), self.queeze.bias,
                                scale=_GLOBAL_UPSAMPLE)
        return out.reshape(b, n, c)


class MEAttention(FromOriginal, R.MEAttention):
    """One :func:`~medattn_fast.functional.external_attention` call (no head permutes)."""

    @classmethod
    def _init_args(cls, module):
        head, rem = divmod(module.num_heads, module.coef)
        if rem or module.coef != 4:
            raise ValueError(f"num_heads={module.num_heads}, coef={module.coef} do not come from MEAttention(dim, configs)")
        return (module.proj.out_features, {"head": head}), {}

    def forward(self, x):
        _check_shape("MEAttention", "x", x, "(B, N, C)", (None, None, self.proj.out_features))
        return MF.external_attention(x, self.query_liner.weight, self.query_liner.bias, self.linear_0.weight,
                                     self.linear_0.bias, self.linear_1.weight, self.linear_1.bias,
                                     self.proj.weight, self.proj.bias, num_heads=self.num_heads)


class EAmodule(FromOriginal, R.EAmodule):
    """The reference's forward on the fast :class:`CSAttention` and :class:`MEAttention`."""

    @classmethod
    def _init_args(cls, module):
        return (module.SlayerNorm.normalized_shape[0],), {"configs": _configs_of(module)}


class encoder_block(FromOriginal, R.encoder_block):
    """The reference's forward on fast :class:`EAmodule` s; a token count that is not a square
    raises ValueError."""

    @classmethod
    def _init_args(cls, module):
        return (module.block[0].SlayerNorm.normalized_shape[0],), {"configs": _configs_of(module.block[0])}

    def forward(self, x):
        _check_shape("encoder_block", "x", x, "(B, N, C)", (None, None, self.block[2].conv.in_channels))
        _square_side("encoder_block", x.shape[1])
        return super().forward(x)


class decoder_block(FromOriginal, R.decoder_block):
    """The reference's forward on fast :class:`EAmodule` s; inputs whose shapes do not join raise
    ValueError."""

    @classmethod
    def _init_args(cls, module):
        flag = bool(module.flag)
        return (module.block[0].in_channels, flag), {"configs": _configs_of(module.block[1 if flag else 2])}

    def forward(self, x, skip):
        up = self.block[0]
        _check_shape("decoder_block", "x", x, "(B, C, h, w)", (None, up.in_channels, None, None))
        B, _, h, w = x.shape
        skip_channels = up.out_channels if self.flag else self.block[1].in_channels - up.out_channels
        _check_shape("decoder_block", "skip", skip, "(B, C_skip, 2h, 2w)", (B, skip_channels, 2 * h, 2 * w))
        return super().forward(x, skip)


class MTUNet(FromOriginal, R.MTUNet):
    r"""MT-UNet (Dootmaan/MT-UNet ``MTUNet(out_ch=4)``): (B, 3 or 1, 224, 224) -> (B, out_ch, 224, 224).

    The reference's modules, keys (487 for ``MTUNet(9)``) and forward on the fast blocks. Like the
    original it takes square inputs of side 8·sqrt(N) for the N-token position embedding (224 for
    the original's 784); ``num_tokens`` (keyword, not in the original) sets another square
    embedding whose side is a multiple of 4, and any other input raises ValueError. For any size,
    H ≠ W and 1- or 3-channel inputs, use :class:`medattn_fast.models.MTUNet` (it loads these
    checkpoints through its key map).
    """

    def __init__(self, out_ch=4, configs=MTUNET_CONFIGS, *, num_tokens=_EMBED_TOKENS):
        side = math.isqrt(num_tokens)
        if side * side != num_tokens or side % _TOKEN_STRIDE != 0:
            raise ValueError(f"MTUNet: num_tokens must be s·s with s a multiple of {_TOKEN_STRIDE} (two stride-2 "
                             f"stages follow), got {num_tokens}")
        super().__init__(out_ch, configs)  # the original's modules in its order: one seed, its weights
        if num_tokens != _EMBED_TOKENS:
            self.stem.position_embedding = nn.Parameter(torch.zeros((1, num_tokens, _EMBED_DIM)))

    @classmethod
    def _init_args(cls, module):
        configs = dict(MTUNET_CONFIGS, **_configs_of(module.bottleneck[0]))
        return (module.SegmentationHead.out_channels, configs), {
            "num_tokens": module.stem.position_embedding.shape[1]}

    def forward(self, x):
        tokens = self.stem.position_embedding.shape[1]
        side = _STEM_STRIDE * math.isqrt(tokens)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] not in (1, 3) or x.shape[2:] != (side, side):
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"MTUNet: argument 'x' must have shape (B, 1 or 3, {side}, {side}) (the position embedding "
                             f"has {tokens} tokens), got {got}; medattn_fast.models.MTUNet takes any size")
        return super().forward(x)


COMPAT_CLASSES = {cls.__name__: cls for cls in (GaussianTrans, Attention, WinAttention, DlightConv, CSAttention,
                                                MEAttention, EAmodule, encoder_block, decoder_block, MTUNet)}
