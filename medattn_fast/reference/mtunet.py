"""MT-UNet's blocks (Wang et al., "Mixed Transformer U-Net for medical image segmentation", ICASSP
2022; Dootmaan/MT-UNet, ``MTUNet.py``), faithful to the original: the oracle the fast paths are checked against.

Same class names, constructor signatures, attribute names (hence ``state_dict`` keys) and math as
the original, with two deliberate differences, both device plumbing and neither numerical:

* no ``.cuda()`` calls: every tensor the original creates on the CPU and then moves to the GPU
  (WinAttention's padding buffer, GaussianTrans's distance tables) is created on the input's device
  and dtype, so the blocks run on CPU, on any GPU and in float64;
* ``EAmodule`` reads the original's module-level ``configs`` dict; here that dict is
  :data:`MTUNET_CONFIGS` and is the default of a ``configs`` argument.

The original's quirks are reproduced on purpose; each is named in the docstring of the class that
has it (those that tie the whole network to 224² in :class:`MTUNet`'s).
"""
from __future__ import annotations

import math
import sys
from typing import Dict

import torch
from torch import nn

from .gaussian_trans import GaussianTrans  # noqa: F401  (re-exported: CSAttention builds one)

# The original's module-level ``configs`` (Synapse model), read by EAmodule and MTUNet.
MTUNET_CONFIGS: Dict[str, object] = {
    "win_size": 4,
    "head": 8,
    "axis": [28, 16, 8],
    "encoder": [256, 512],
    "bottleneck": 1024,
    "decoder": [1024, 512],
    "decoder_stem": [(256, 512), (256, 256), (128, 64), 32],
}

__all__ = ["MTUNET_CONFIGS", "ConvBNReLU", "DoubleConv", "MEAttention", "Attention",
           "WinAttention", "DlightConv", "GaussianTrans", "CSAttention", "EAmodule", "U_encoder", "U_decoder",
           "DecoderStem", "Stem", "encoder_block", "decoder_block", "MTUNet"]


def _block(owner: nn.Module, name: str) -> type:
    """The class ``name`` of the module that defines ``type(owner)`` (this one's otherwise): a module
    of same-named subclasses (fast forwards) gets its own classes at every level of the tree, in the
    original's order and with the original's keys."""
    return getattr(sys.modules[type(owner).__module__], name, None) or globals()[name]


def _square_side(n: int) -> int:
    # The original computes int(np.sqrt(n)); math.isqrt equals it for every n below 2**52.
    return math.isqrt(n)


class ConvBNReLU(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> ReLU (the ReLU is skipped when ``activation=False``)."""

    def __init__(self, c_in, c_out, kernel_size, stride=1, padding=1, activation=True):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size=kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.activation = activation

    def forward(self, x):
        x = self.bn(self.conv(x))
        if self.activation:
            x = self.relu(x)
        return x


class DoubleConv(nn.Module):
    """Two 3×3 ConvBNReLU (the second without ReLU), then ``relu(h + BN(conv1x1(h)))`` where h is
    the output of the pair: the residual adds a 1×1-conv branch of h to h itself, not the input."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Sequential(
            _block(self, "ConvBNReLU")(cin, cout, 3, 1, padding=1),
            _block(self, "ConvBNReLU")(cout, cout, 3, stride=1, padding=1, activation=False),
        )
        self.conv1 = nn.Conv2d(cout, cout, 1)
        self.relu = nn.ReLU()
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        x = self.conv(x)
        h = x
        x = self.bn(self.conv1(x))
        return self.relu(h + x)


class MEAttention(nn.Module):
    r"""Multi-head external attention (MT-UNet's "EAttention").

    x (B, N, dim) -> ``query_liner`` (dim -> 4·dim) -> 4·head heads of width d = dim/head
    (``num_heads`` is overwritten with ``coef * head``) -> per head
    ``a = x_h M_kᵀ + b_k`` (N × 64, ``linear_0``), softmax over the **tokens** (dim -2, N),
    ``a / (1e-9 + Σ_S a)`` (over the 64 memory slots), ``y_h = a M_vᵀ + b_v`` (``linear_1``)
    -> heads concatenated (B, N, 4·dim) -> ``proj`` -> (B, N, dim).

    Quirks: the memory size is ``256 // coef`` = 64 whatever dim is; ``query_liner.bias`` and
    ``linear_0.bias`` have no effect (both add a per-slot constant over the N tokens the softmax
    normalises over), so their gradients are 0.
    """

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

    def forward(self, x):
        B, N, C = x.shape
        x = self.query_liner(x)
        x = x.view(B, N, self.num_heads, -1).permute(0, 2, 1, 3)  # (B, heads, N, d)
        attn = self.linear_0(x)  # (B, heads, N, S)
        attn = attn.softmax(dim=-2)  # over the tokens
        attn = attn / (1e-9 + attn.sum(dim=-1, keepdim=True))  # over the memory slots
        x = self.linear_1(attn).permute(0, 2, 1, 3).reshape(B, N, -1)
        return self.proj(x)


class Attention(nn.Module):
    r"""Multi-head self-attention, in two modes.

    ``axial=False`` (window attention): x (b, p, p, win, dim) -> per window and head
    ``softmax(q kᵀ / sqrt(d)) v`` over the ``win`` tokens, d = int(dim / head) -> heads concatenated
    -> ``out`` Linear -> (b, p, p, win, dim). ``key_layer.bias`` has no effect (q·b_k is constant
    over the keys).

    ``axial=True`` (the global branch of CSAttention): x (b, h, w, dim) -> returns the *scores*,
    not an output: ``atten_x`` (b, h, w, w) with ``atten_x[r, c, j] = q[r, c]·k[r, j]``,
    ``atten_y`` (b, w, h, h) with ``atten_y[c, r, i] = q[r, c]·k[i, c]`` (a single head over all
    dim channels, no 1/sqrt(d) scaling), and the value projection (b, h, w, dim). ``out`` is built
    but never called in this mode, and ``key_layer.bias`` has no effect once GaussianTrans applies
    its softmaxes.
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
        self.softmax = nn.Softmax(dim=-1)

    def transpose_for_scores(self, x):
        return x.view(*(x.size()[:-1] + (self.num_head, self.attention_head_size)))

    def forward(self, x):
        if self.axial:
            b, h, w, c = x.shape
            mixed_query_layer = self.query_layer(x)
            mixed_key_layer = self.key_layer(x)
            mixed_value_layer = self.value_layer(x)

            # row attention (single head)
            query_layer_x = mixed_query_layer.view(b * h, w, -1)
            key_layer_x = mixed_key_layer.view(b * h, w, -1).transpose(-1, -2)
            attention_scores_x = torch.matmul(query_layer_x, key_layer_x).view(b, -1, w, w)  # (b, h, w, w)

            # column attention (single head)
            query_layer_y = mixed_query_layer.permute(0, 2, 1, 3).contiguous().view(b * w, h, -1)
            key_layer_y = mixed_key_layer.permute(0, 2, 1, 3).contiguous().view(b * w, h, -1).transpose(-1, -2)
            attention_scores_y = torch.matmul(query_layer_y, key_layer_y).view(b, -1, h, h)  # (b, w, h, h)

            return attention_scores_x, attention_scores_y, mixed_value_layer

        mixed_query_layer = self.query_layer(x)
        mixed_key_layer = self.key_layer(x)
        mixed_value_layer = self.value_layer(x)

        # (b, p, p, win, head, d) -> (b, p, p, head, win, d)
        query_layer = self.transpose_for_scores(mixed_query_layer).permute(0, 1, 2, 4, 3, 5).contiguous()
        key_layer = self.transpose_for_scores(mixed_key_layer).permute(0, 1, 2, 4, 3, 5).contiguous()
        value_layer = self.transpose_for_scores(mixed_value_layer).permute(0, 1, 2, 4, 3, 5).contiguous()

        attention_scores = torch.matmul(query_layer, key_layer.transpose(-1, -2))
        attention_scores = attention_scores / math.sqrt(self.attention_head_size)
        atten_probs = self.softmax(attention_scores)

        context_layer = torch.matmul(atten_probs, value_layer)  # (b, p, p, head, win, d)
        context_layer = context_layer.permute(0, 1, 2, 4, 3, 5).contiguous()
        context_layer = context_layer.view(*(context_layer.size()[:-2] + (self.all_head_size,)))
        return self.out(context_layer)


class WinAttention(nn.Module):
    r"""Window attention over a square token grid: (b, n, c) -> (b, p, p, ws·ws, c).

    Quirks: h = w = int(sqrt(n)) (only square grids work); when h is not a multiple of ``win_size``
    the (b, c, h, w) map is padded to side R = h + ws − h % ws with **zeros** on the right and
    bottom strips and, in the bottom-right (R−h)×(R−w) corner, a copy of x's last (R−h)×(R−w)
    block ``x[..., h−R:, w−R:]`` (a single pixel is broadcast when h == 1; 1 < h < R−h raises, as in
    the original); padded tokens are attended to like real ones (no mask). The output keeps the
    windowed layout (b, p, p, ws·ws, c), p = R/ws, tokens row-major inside each window.
    The original builds the padding buffer on the CPU and ends with ``.cuda()``; here the buffer is
    created on x's device and dtype and nothing is moved.
    """

    def __init__(self, configs, dim):
        super().__init__()
        self.window_size = configs["win_size"]
        self.attention = _block(self, "Attention")(dim, configs)

    def forward(self, x):
        b, n, c = x.shape
        h, w = _square_side(n), _square_side(n)
        x = x.permute(0, 2, 1).contiguous().view(b, c, h, w)
        if h % self.window_size != 0:
            right_size = h + self.window_size - h % self.window_size
            new_x = x.new_zeros((b, c, right_size, right_size))
            new_x[:, :, 0:x.shape[2], 0:x.shape[3]] = x[:]
            new_x[:, :, x.shape[2]:, x.shape[3]:] = x[:, :, (x.shape[2] - right_size):, (x.shape[3] - right_size):]
            x = new_x
            b, c, h, w = x.shape
        ws = self.window_size
        x = x.view(b, c, h // ws, ws, w // ws, ws)
        x = x.permute(0, 2, 4, 3, 5, 1).contiguous().view(b, h // ws, w // ws, ws * ws, c)
        return self.attention(x)  # (b, p, p, win, c)


class DlightConv(nn.Module):
    r"""Window aggregation: (b, p, p, win, c) -> (b, p, p, c).

    ``prob = softmax(linear(mean_win(x)))`` (one weight per token of the window, ``linear``:
    c -> win_size²), ``out = Σ_win prob · x``.
    """

    def __init__(self, dim, configs):
        super().__init__()
        self.linear = nn.Linear(dim, configs["win_size"] * configs["win_size"])
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x):
        h = x
        avg_x = torch.mean(x, dim=-2)  # (b, p, p, c)
        x_prob = self.softmax(self.linear(avg_x))  # (b, p, p, win)
        x = torch.mul(h, x_prob.unsqueeze(-1))  # (b, p, p, win, c)
        return torch.sum(x, dim=-2)  # (b, p, p, c)


class CSAttention(nn.Module):
    r"""Local-global attention: (b, n, c) -> (b, n, c), n a square.

    local  = WinAttention(x) merged back to the padded grid (b, c, R, R);
    global = GaussianTrans(Attention(axial=True)(DlightConv(WinAttention(x)))) on the (p, p) grid of
    windows, upsampled ×4 by ``UpsamplingBilinear2d`` (align_corners=True; the factor is 4 whatever
    ``win_size`` is, so only win_size = 4 gives matching shapes);
    out = ``queeze``(cat[global, local]) (1×1 conv, 2c -> c), cropped to the original h × w.

    Quirks: ``global_atten.out`` is built but never called; ``gaussiantrans.bias`` and
    ``global_atten.key_layer.bias`` / ``win_atten.attention.key_layer.bias`` have no effect.
    """

    def __init__(self, dim, configs):
        super().__init__()
        self.win_atten = _block(self, "WinAttention")(configs, dim)
        self.dlightconv = _block(self, "DlightConv")(dim, configs)
        self.global_atten = _block(self, "Attention")(dim, configs, axial=True)
        self.gaussiantrans = _block(self, "GaussianTrans")()
        self.up = nn.UpsamplingBilinear2d(scale_factor=4)
        self.queeze = nn.Conv2d(2 * dim, dim, 1)

    def forward(self, x):
        origin_size = x.shape
        origin_h, origin_w = _square_side(origin_size[1]), _square_side(origin_size[1])
        x = self.win_atten(x)  # (b, p, p, win, c)
        b, p, p, win, c = x.shape
        side = _square_side(win)
        h = x.view(b, p, p, side, side, c).permute(0, 1, 3, 2, 4, 5).contiguous()
        h = h.view(b, p * side, p * side, c).permute(0, 3, 1, 2).contiguous()  # (b, c, R, R)

        x = self.dlightconv(x)  # (b, p, p, c)
        atten_x, atten_y, mixed_value = self.global_atten(x)
        x = self.gaussiantrans((x, atten_x, atten_y, mixed_value))  # (b, p, p, c)
        x = x.permute(0, 3, 1, 2).contiguous()

        x = self.up(x)
        x = self.queeze(torch.cat((x, h), dim=1)).permute(0, 2, 3, 1).contiguous()
        x = x[:, :origin_h, :origin_w, :].contiguous()
        return x.view(b, -1, c)


class EAmodule(nn.Module):
    r"""Mixed transformer module: (B, N, dim) -> (B, N, dim).

    ``x = x + CSAttention(SlayerNorm(x))``; ``x = x + EAttention(ElayerNorm(x))``; both LayerNorms
    with eps 1e-6. The original's constructor is ``EAmodule(dim)`` and reads the module-level
    ``configs``; ``configs`` defaults to that dict (:data:`MTUNET_CONFIGS`). ``ElayerNorm.bias`` has
    no effect (see :class:`MEAttention`).
    """

    def __init__(self, dim, configs=MTUNET_CONFIGS):
        super().__init__()
        self.SlayerNorm = nn.LayerNorm(dim, eps=1e-6)
        self.ElayerNorm = nn.LayerNorm(dim, eps=1e-6)
        self.CSAttention = _block(self, "CSAttention")(dim, configs)
        self.EAttention = _block(self, "MEAttention")(dim, configs)

    def forward(self, x):
        h = x
        x = self.CSAttention(self.SlayerNorm(x))
        x = h + x
        h = x
        x = self.EAttention(self.ElayerNorm(x))
        return h + x


# ---------------------------------------------------------------------------------------------
# The whole network: CNN stem and decoder, mixed-transformer encoder/bottleneck/decoder, MTUNet
# ---------------------------------------------------------------------------------------------


class U_encoder(nn.Module):
    r"""The CNN stem's encoder: (B, 3, H, W) -> ((B, 256, H/8, W/8), [f1, f2, f3]).

    ``res1`` DoubleConv(3, 64) -> f1 (B, 64, H, W) -> max-pool 2 -> ``res2`` DoubleConv(64, 128)
    -> f2 (B, 128, H/2, W/2) -> pool -> ``res3`` DoubleConv(128, 256) -> f3 (B, 256, H/4, W/4)
    -> pool. The features are the skips of :class:`U_decoder`, in that order.
    """

    def __init__(self):
        super().__init__()
        self.res1 = _block(self, "DoubleConv")(3, 64)
        self.pool1 = nn.MaxPool2d(2)
        self.res2 = _block(self, "DoubleConv")(64, 128)
        self.pool2 = nn.MaxPool2d(2)
        self.res3 = _block(self, "DoubleConv")(128, 256)
        self.pool3 = nn.MaxPool2d(2)

    def forward(self, x):
        features = []
        x = self.res1(x)
        features.append(x)  # (B, 64, H, W)
        x = self.pool1(x)
        x = self.res2(x)
        features.append(x)  # (B, 128, H/2, W/2)
        x = self.pool2(x)
        x = self.res3(x)
        features.append(x)  # (B, 256, H/4, W/4)
        x = self.pool3(x)
        return x, features


class U_decoder(nn.Module):
    r"""The CNN decoder: (B, 512, H/8, W/8), [f1, f2, f3] -> (B, 64, H, W).

    Three times: ``trans_i`` ConvTranspose2d(k2, s2) halves the channels and doubles the side,
    then ``res_i`` DoubleConv of ``cat[skip, x]`` (the skip first: f3, then f2, then f1).
    """

    def __init__(self):
        super().__init__()
        self.trans1 = nn.ConvTranspose2d(512, 256, 2, stride=2)
        self.res1 = _block(self, "DoubleConv")(512, 256)
        self.trans2 = nn.ConvTranspose2d(256, 128, 2, stride=2)
        self.res2 = _block(self, "DoubleConv")(256, 128)
        self.trans3 = nn.ConvTranspose2d(128, 64, 2, stride=2)
        self.res3 = _block(self, "DoubleConv")(128, 64)

    def forward(self, x, feature):
        x = self.res1(torch.cat((feature[2], self.trans1(x)), dim=1))  # (B, 256, H/4, W/4)
        x = self.res2(torch.cat((feature[1], self.trans2(x)), dim=1))  # (B, 128, H/2, W/2)
        x = self.res3(torch.cat((feature[0], self.trans3(x)), dim=1))  # (B, 64, H, W)
        return x


class DecoderStem(nn.Module):
    """Wrapper of :class:`U_decoder` (the original nests it as ``block``: keys ``decoder_stem.block.*``)."""

    def __init__(self):
        super().__init__()
        self.block = _block(self, "U_decoder")()

    def forward(self, x, features):
        return self.block(x, features)


class Stem(nn.Module):
    r"""CNN stem to tokens: (B, 3, 224, 224) -> ((B, 784, 256), [f1, f2, f3]).

    :class:`U_encoder`, ``trans_dim`` (1×1 ConvBNReLU 256 -> 256), flattened row-major to tokens
    (B, N, 256), plus ``position_embedding`` (1, 784, 256), zero-initialised as in the original.
    Quirk: the embedding has exactly 784 = 28² tokens, so only 224² inputs work.
    """

    def __init__(self):
        super().__init__()
        self.model = _block(self, "U_encoder")()
        self.trans_dim = _block(self, "ConvBNReLU")(256, 256, 1, 1, 0)
        self.position_embedding = nn.Parameter(torch.zeros((1, 784, 256)))

    def forward(self, x):
        x, features = self.model(x)  # (B, 256, 28, 28)
        x = self.trans_dim(x)
        x = x.flatten(2).transpose(-2, -1)  # (B, N, 256)
        x = x + self.position_embedding
        return x, features


class encoder_block(nn.Module):
    r"""Two mixed-transformer modules then a stride-2 2×2 ConvBNReLU:
    tokens (B, N, dim), N = h·h -> ((B, 2·dim, h/2, h/2), skip (B, dim, h, h)).

    ``block`` = [EAmodule(dim), EAmodule(dim), ConvBNReLU(dim, 2·dim, 2, stride=2, padding=0)].
    The skip is the tokens folded back to a channel-first grid (a permuted view, not a copy);
    the side is int(sqrt(N)) (square grids only).
    """

    def __init__(self, dim, configs=MTUNET_CONFIGS):
        super().__init__()
        self.block = nn.ModuleList([
            _block(self, "EAmodule")(dim, configs),
            _block(self, "EAmodule")(dim, configs),
            _block(self, "ConvBNReLU")(dim, dim * 2, 2, stride=2, padding=0),
        ])

    def forward(self, x):
        x = self.block[0](x)
        x = self.block[1](x)
        B, N, C = x.shape
        h, w = _square_side(N), _square_side(N)
        x = x.view(B, h, w, C).permute(0, 3, 1, 2)  # (B, C, h, w)
        skip = x
        x = self.block[2](x)
        return x, skip


class decoder_block(nn.Module):
    r"""Upsample, join the skip, two mixed-transformer modules: (B, dim, h, w), skip -> tokens.

    ``flag=False``: ``block`` = [ConvTranspose2d(dim, dim/2, 2, s2), Conv2d(dim, dim/2, 1),
    EAmodule(dim/2) ×2]; x -> up -> ``cat[x, skip]`` (x first) -> 1×1 conv -> tokens
    (B, 4hw, dim/2) -> EAmodules.
    ``flag=True``: ``block`` = [ConvTranspose2d(dim, dim/2, 2, s2), EAmodule(dim) ×2];
    x -> up -> ``cat[x, skip]`` (the skip has dim/2 channels, so the join has dim) -> tokens
    (B, 4hw, dim) -> EAmodules.
    """

    def __init__(self, dim, flag, configs=MTUNET_CONFIGS):
        super().__init__()
        self.flag = flag
        if not self.flag:
            self.block = nn.ModuleList([
                nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2, padding=0),
                nn.Conv2d(dim, dim // 2, kernel_size=1, stride=1),
                _block(self, "EAmodule")(dim // 2, configs),
                _block(self, "EAmodule")(dim // 2, configs),
            ])
        else:
            self.block = nn.ModuleList([
                nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2, padding=0),
                _block(self, "EAmodule")(dim, configs),
                _block(self, "EAmodule")(dim, configs),
            ])

    def forward(self, x, skip):
        x = torch.cat((self.block[0](x), skip), dim=1)
        if not self.flag:
            x = self.block[1](x)
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        B, H, W, C = x.shape
        x = x.view(B, -1, C)  # a view of the permuted map: H and W stay mergeable
        first = 1 if self.flag else 2
        x = self.block[first](x)
        return self.block[first + 1](x)


class MTUNet(nn.Module):
    r"""MT-UNet (Synapse model): (B, 3 or 1, 224, 224) -> logits (B, out_ch, 224, 224).

    Data flow (shapes at 224², configs of the Synapse model)::

        x (1 channel repeated to 3)
        Stem            -> tokens (B, 784, 256) + position embedding;  CNN skips f1..f3
        encoder[0]      -> EAmodule(256) ×2 at 28²; skip (B, 256, 28, 28); conv -> (B, 512, 14, 14)
        encoder[1]      -> EAmodule(512) ×2 at 14²; skip (B, 512, 14, 14); conv -> (B, 1024, 7, 7)
        bottleneck      -> EAmodule(1024) ×2 at 7²
        decoder[0]      -> up to 14², cat[x, skip 512], 1×1 -> 512, EAmodule(512) ×2
        decoder[1]      -> up to 28², cat[x, skip 256] (512), EAmodule(512) ×2
        decoder_stem    -> U_decoder with skips f3, f2, f1: (B, 64, 224, 224)
        SegmentationHead-> 1×1 conv, (B, out_ch, 224, 224)

    What ties it to 224×224, square, 3-channel input (kept on purpose):

    * 224²: ``Stem.position_embedding`` is a (1, 784, 256) parameter added to the tokens of the
      28×28 map the CNN stem makes of a 224² image (3 max-pools); any other size fails the addition.
      Sizes also have to survive 3 pools and 2 stride-2 convs: H = W = 32·k, and with the embedding, k = 7.
    * square: every token <-> grid conversion takes the side as int(sqrt(N)), so an H ≠ W input
      would be folded into the wrong grid.
    * 3 channels: ``U_encoder.res1`` takes 3; a 1-channel image is repeated to 3, any other count
      fails in the first conv.
    * the CNN widths (64/128/256, the 256-channel embedding, the 512-channel input of the CNN
      decoder) are hard-coded, which fixes configs["encoder"][0] = 256 and configs["decoder"][-1] = 512.

    Submodules are created in the original's order, so a given seed gives the original's initial weights.
    """

    def __init__(self, out_ch=4, configs=MTUNET_CONFIGS):
        super().__init__()
        self.stem = _block(self, "Stem")()
        self.encoder = nn.ModuleList()
        self.bottleneck = nn.Sequential(_block(self, "EAmodule")(configs["bottleneck"], configs),
                                        _block(self, "EAmodule")(configs["bottleneck"], configs))
        self.decoder = nn.ModuleList()
        self.decoder_stem = _block(self, "DecoderStem")()
        for dim in configs["encoder"]:
            self.encoder.append(_block(self, "encoder_block")(dim, configs))
        for dim in configs["decoder"][:-1]:
            self.decoder.append(_block(self, "decoder_block")(dim, False, configs))
        self.decoder.append(_block(self, "decoder_block")(configs["decoder"][-1], True, configs))
        self.SegmentationHead = nn.Conv2d(64, out_ch, 1)

    def forward(self, x):
        if x.size()[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x, features = self.stem(x)  # (B, N, 256)
        skips = []
        for block in self.encoder:
            x, skip = block(x)
            skips.append(skip)
            B, C, H, W = x.shape
            x = x.permute(0, 2, 3, 1).contiguous().view(B, -1, C)  # (B, N, C)
        x = self.bottleneck(x)
        B, N, C = x.shape
        x = x.view(B, _square_side(N), -1, C).permute(0, 3, 1, 2)  # (B, C, h, h)
        for i, block in enumerate(self.decoder):
            x = block(x, skips[len(self.decoder) - i - 1])  # deepest skip first
            B, N, C = x.shape
            x = x.view(B, _square_side(N), _square_side(N), C).permute(0, 3, 1, 2)
        x = self.decoder_stem(x, features)
        return self.SegmentationHead(x)
