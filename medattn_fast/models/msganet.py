r"""MSGANet: multi-scale guided self-attention for medical image segmentation (Sinha & Dolz,
IEEE JBHI 2020, "Multi-scale self-guided attention"; public code sinAshish/Multi-Scale-Attention,
``DAF_stack``). 2-D.

Structure (B batch, F = ``base_channels``, input (B, in_channels, H, W), H and W divisible by 32)::

    backbone    ResNet stem (/4) and four stages -> r_1 (/4), r_2 (/8), r_3 (/16), r_4 (/32)
    reduce[k]   1×1 conv (-> F) + BN + PReLU, bilinearly upsampled to r_1's size       -> d_k
    fuse        MultiConv(4F -> F) of cat(d_4, d_3, d_2, d_1)                             -> f
    step s = 1, 2, for each scale k (guide g_k = f in step 1, g_k = a1_k ⊙ f in step 2):
        j_k          = cat(d_k, g_k)                                   (B, 2F, H/4, W/4)
        z_k, ĵ_k     = semantic_s(j_k)   encoder-decoder (shared over the four scales)
                       z_k: latent (B, 8F, H/16, W/16), ĵ_k: reconstruction of j_k
        p_k          = PAM branch(j_k)   3×3 conv 2F -> F, BN, PReLU, PAM(F), 3×3 conv, BN, PReLU
        c_k          = CAM branch(j_k)   same with CAM(F)
        as_k         = out_s[k]((p_k + c_k) ⊙ sem_s[k](ĵ_k))     sem: 3×3 conv 2F -> F, out: 1×1 conv
    predictions  8 logits maps, bilinearly upsampled to (H, W):
                 predict_1[k](d_k) (the multi-scale features) and predict_2[k](a2_k) (the refined ones)

``MultiConv`` is ``3×3 conv, BN, PReLU, 3×3 conv, BN, PReLU, 1×1 conv, BN, PReLU``. The semantic
encoder-decoder is two ``(3×3 conv, BN, ReLU)×2 + 2×2 max-pool`` encoders (2F -> 4F -> 8F) and two
``(3×3 conv, BN, ReLU)×2 + 2×2 transposed conv`` decoders back to 2F at the input size. PAM/CAM
are DANet's (``γ·V softmax(QᵀK)ᵀ + x``, ``γ·softmax(rowmax(E) − E) X + x``).

**Outputs.** In train mode ``forward`` returns an :class:`MSGANetOutputs` (the 8 logit maps, both
steps' latents, the semantic modules' inputs and reconstructions): what :func:`msganet_loss`, the
original's training objective, needs. In eval mode it returns the average of the four refined
(step-2) logit maps, as the original does at inference.

**Differences from the original, on purpose.** The backbone is a ResNet written here (basic
blocks, torchvision's parameter names, default ResNet-18 widths and depths) instead of the
ImageNet ResNeXt-101 the original downloads: nothing is downloaded;
:meth:`MSGANet.load_backbone_weights` loads a weights file of the user's (a torchvision
``resnet18``/``resnet34`` state_dict loads as is when ``in_channels == 3``). The widths are
configurable (the original hard-codes F = 64 and 5 classes). Modules the original builds but never
calls (``conv6_*``, ``conv7_*``, ``attention1..4``, ``refine1..4``) are not built; the original's
checkpoints therefore do not load here.

PAM and CAM are :class:`medattn_fast.nn.PositionAttention` and
:class:`~medattn_fast.nn.ChannelAttention` (no N×N matrix, float32 energy); the tests and
benchmarks compare the model with a twin in DANet's original modules built by swapping these two
(``medattn_fast.testing.twins``).
"""
from __future__ import annotations

import os
from typing import Dict, List, Mapping, NamedTuple, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.attention import ChannelAttention, PositionAttention
from ._parts import check_input, state_dict_misfit

__all__ = ["MSGANet", "MSGANetOutputs", "ResNetBackbone", "msganet_loss"]

_NAME = "MSGANet"
_SCALES = 4


# ---------------------------------------------------------------------------------------------
# backbone
# ---------------------------------------------------------------------------------------------
class _BasicBlock(nn.Module):
    """ResNet basic block ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` (torchvision names)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + shortcut)


class ResNetBackbone(nn.Module):
    """A ResNet feature extractor: stem (7×7 conv stride 2, BN, ReLU, 3×3 max-pool stride 2) and
    four stages of basic blocks (strides 1, 2, 2, 2), with torchvision's parameter names
    (``conv1``, ``bn1``, ``layer1`` … ``layer4``; no ``fc``).

    forward: x (B, in_channels, H, W) -> [r_1 (/4), r_2 (/8), r_3 (/16), r_4 (/32)] with
    ``widths[i]`` channels each.
    """

    def __init__(self, in_channels: int = 3, widths: Sequence[int] = (64, 128, 256, 512),
                 depths: Sequence[int] = (2, 2, 2, 2)):
        super().__init__()
        if len(widths) != _SCALES or len(depths) != _SCALES or min(widths) < 1 or min(depths) < 1:
            raise ValueError(f"{_NAME}: backbone widths and depths must be 4 positive ints each, "
                             f"got widths={tuple(widths)!r}, depths={tuple(depths)!r}")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = widths[0]
        for i, (width, depth) in enumerate(zip(widths, depths)):
            stride = 1 if i == 0 else 2
            blocks = [_BasicBlock(cin if b == 0 else width, width, stride if b == 0 else 1) for b in range(depth)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = width

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        features = []
        for i in range(1, _SCALES + 1):
            x = getattr(self, f"layer{i}")(x)
            features.append(x)
        return features


# ---------------------------------------------------------------------------------------------
# heads
# ---------------------------------------------------------------------------------------------
def _conv_bn_prelu(cin: int, cout: int, kernel_size: int) -> List[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2), nn.BatchNorm2d(cout), nn.PReLU()]


def _multi_conv(cin: int, cout: int) -> nn.Sequential:
    """3×3 conv-BN-PReLU, 3×3 conv-BN-PReLU, 1×1 conv-BN-PReLU (the original's ``MultiConv(attn=False)``)."""
    return nn.Sequential(*_conv_bn_prelu(cin, cout, 3), *_conv_bn_prelu(cout, cout, 3), *_conv_bn_prelu(cout, cout, 1))


def _conv_bn_relu_pair(cin: int, cout: int) -> List[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SemanticEncoderDecoder(nn.Module):
    """The semantic module: encoder C -> 2C (/2) -> 4C (/4), decoder back to C at the input size.

    forward: x (B, C, H, W), H and W even twice over -> ``(latent (B, 4C, H/4, W/4),
    reconstruction (B, C, H, W))``.
    """

    def __init__(self, channels: int):
        super().__init__()
        c = channels
        self.encode1 = nn.Sequential(*_conv_bn_relu_pair(c, 2 * c), nn.MaxPool2d(2))
        self.encode2 = nn.Sequential(*_conv_bn_relu_pair(2 * c, 4 * c), nn.MaxPool2d(2))
        self.decode2 = nn.Sequential(*_conv_bn_relu_pair(4 * c, 2 * c), nn.ConvTranspose2d(2 * c, 2 * c, 2, stride=2))
        self.decode1 = nn.Sequential(*_conv_bn_relu_pair(2 * c, c), nn.ConvTranspose2d(c, c, 2, stride=2))

    def forward(self, x: torch.Tensor):
        latent = self.encode2(self.encode1(x))
        return latent, self.decode1(self.decode2(latent))


class _AttentionBranch(nn.Sequential):
    """3×3 conv (2F -> F), BN, PReLU, PAM or CAM (F), 3×3 conv, BN, PReLU (the original's ``PAM_CAM_Layer``)."""

    def __init__(self, channels: int, attention: nn.Module):
        super().__init__(*_conv_bn_prelu(2 * channels, channels, 3), attention, *_conv_bn_prelu(channels, channels, 3))


class GuidedAttentionStep(nn.Module):
    """One refinement step over the four scales: ``out[k]((PAM(j_k) + CAM(j_k)) ⊙ sem[k](ĵ_k))``
    with ``j_k = cat(d_k, g_k)`` and ``(z_k, ĵ_k) = semantic(j_k)`` (one semantic module for all
    scales, as in the original). Keys: ``semantic``, ``position.{k}``, ``channel.{k}``,
    ``semantic_proj.{k}``, ``output.{k}`` (k = 0 … 3 for scales 1 … 4)."""

    def __init__(self, channels: int):
        super().__init__()
        self.semantic = SemanticEncoderDecoder(2 * channels)
        self.position = nn.ModuleList(_AttentionBranch(channels, PositionAttention(channels)) for _ in range(_SCALES))
        self.channel = nn.ModuleList(_AttentionBranch(channels, ChannelAttention()) for _ in range(_SCALES))
        self.semantic_proj = nn.ModuleList(nn.Conv2d(2 * channels, channels, 3, padding=1) for _ in range(_SCALES))
        self.output = nn.ModuleList(nn.Conv2d(channels, channels, 1) for _ in range(_SCALES))

    def forward(self, scales: Sequence[torch.Tensor], guides: Sequence[torch.Tensor]):
        """-> (attended [4], latents [4], inputs [4], reconstructions [4])."""
        attended, latents, inputs, reconstructions = [], [], [], []
        for k, (d, g) in enumerate(zip(scales, guides)):
            joint = torch.cat([d, g], dim=1)
            latent, reconstruction = self.semantic(joint)
            mixed = (self.position[k](joint) + self.channel[k](joint)) * self.semantic_proj[k](reconstruction)
            attended.append(self.output[k](mixed))
            latents.append(latent)
            inputs.append(joint)
            reconstructions.append(reconstruction)
        return attended, latents, inputs, reconstructions


class MSGANetOutputs(NamedTuple):
    """What :class:`MSGANet` returns in train mode (lists ordered by scale k = 1 … 4, fine to coarse).

    predictions: 8 logit maps (B, out_channels, H, W): the 4 multi-scale ones, then the 4 refined ones.
    latents_1, latents_2: the semantic encoders' latents of steps 1 and 2, (B, 4·2F, H/16, W/16).
    inputs_1, inputs_2: the semantic modules' inputs j_k, (B, 2F, H/4, W/4).
    reconstructions_1, reconstructions_2: their reconstructions ĵ_k, same shapes.
    """

    predictions: List[torch.Tensor]
    latents_1: List[torch.Tensor]
    latents_2: List[torch.Tensor]
    inputs_1: List[torch.Tensor]
    inputs_2: List[torch.Tensor]
    reconstructions_1: List[torch.Tensor]
    reconstructions_2: List[torch.Tensor]

    def average(self) -> torch.Tensor:
        """The eval-mode output: the mean of the four refined (step-2) logit maps."""
        return torch.stack(self.predictions[_SCALES:]).mean(0)


def msganet_loss(outputs: MSGANetOutputs, target: torch.Tensor, *, guided_weight: float = 0.25,
                 reconstruction_weight: float = 0.1) -> Dict[str, torch.Tensor]:
    r"""The original training objective of MSGANet.

    ``segmentation = Σ_{8 outputs} CE(prediction, target)`` (every deep-supervision output),
    ``guided = Σ_k MSE(z1_k, z2_k)`` (the two steps' semantic latents agree),
    ``reconstruction = Σ_{s, k} MSE(j_k, ĵ_k)`` (each of the 8 encoder-decoders reconstructs its input),
    ``total = segmentation + guided_weight · guided + reconstruction_weight · reconstruction``.
    Nothing is detached, as in the original.

    Args:
        outputs: :class:`MSGANetOutputs` (the model's train-mode output).
        target: class indices (B, H, W), int64.
    Returns: dict with scalar tensors ``total``, ``segmentation``, ``guided``, ``reconstruction``.
    """
    if not isinstance(outputs, MSGANetOutputs):
        raise TypeError(f"msganet_loss: argument 'outputs' must be MSGANetOutputs (the train-mode output of "
                        f"MSGANet), got {type(outputs).__name__}")
    pred = outputs.predictions[0]
    want = (pred.shape[0], *pred.shape[2:])
    if not isinstance(target, torch.Tensor) or target.dtype != torch.int64 or tuple(target.shape) != want:
        got = (f"{tuple(target.shape)} {target.dtype}" if isinstance(target, torch.Tensor)
               else type(target).__name__)
        raise ValueError(f"msganet_loss: argument 'target' must be int64 class indices of shape {want}, got {got}")
    segmentation = sum(F.cross_entropy(p, target) for p in outputs.predictions)
    guided = sum(F.mse_loss(a, b) for a, b in zip(outputs.latents_1, outputs.latents_2))
    reconstruction = sum(F.mse_loss(j, r) for j, r in zip(outputs.inputs_1 + outputs.inputs_2,
                                                          outputs.reconstructions_1 + outputs.reconstructions_2))
    total = segmentation + guided_weight * guided + reconstruction_weight * reconstruction
    return {"total": total, "segmentation": segmentation, "guided": guided, "reconstruction": reconstruction}


class MSGANet(nn.Module):
    """Multi-scale guided attention network (see the module docstring). 2-D.

    Args:
        in_channels, out_channels: image channels in, classes out (logits).
        base_channels: F, the width of the attention heads (the original: 64); PAM needs F ≥ 8.
        backbone_widths, backbone_depths: the ResNet's four stages (default ResNet-18).

    forward: x (B, in_channels, H, W), H and W divisible by 32 (else ValueError) ->
    :class:`MSGANetOutputs` in train mode, the (B, out_channels, H, W) average of the refined
    logits in eval mode.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 2, base_channels: int = 64, *,
                 backbone_widths: Sequence[int] = (64, 128, 256, 512), backbone_depths: Sequence[int] = (2, 2, 2, 2)):
        super().__init__()
        if isinstance(base_channels, bool) or not isinstance(base_channels, int) or base_channels < 8:
            raise ValueError(f"{_NAME}: argument 'base_channels' must be an int >= 8 (position attention has "
                             f"base_channels // 8 query channels), got {base_channels!r}")
        self.in_channels = in_channels
        f = base_channels
        self.backbone = ResNetBackbone(in_channels, backbone_widths, backbone_depths)
        self.reduce = nn.ModuleList(nn.Sequential(*_conv_bn_prelu(w, f, 1)) for w in backbone_widths)
        self.fuse = _multi_conv(_SCALES * f, f)
        self.step1 = GuidedAttentionStep(f)
        self.step2 = GuidedAttentionStep(f)
        self.predict1 = nn.ModuleList(nn.Conv2d(f, out_channels, 1) for _ in range(_SCALES))
        self.predict2 = nn.ModuleList(nn.Conv2d(f, out_channels, 1) for _ in range(_SCALES))

    def forward(self, x: torch.Tensor) -> Union[MSGANetOutputs, torch.Tensor]:
        check_input(_NAME, x, self.in_channels, 2, (32, 32))
        features = self.backbone(x)
        size = features[0].shape[2:]
        scales = [self.reduce[0](features[0])] + [
            F.interpolate(reduce(r), size=size, mode="bilinear", align_corners=False)
            for reduce, r in zip(self.reduce[1:], features[1:])]
        # The original concatenates coarse to fine: cat(d_4, d_3, d_2, d_1).
        fused = self.fuse(torch.cat(scales[::-1], dim=1))
        attended1, latents1, inputs1, recon1 = self.step1(scales, [fused] * _SCALES)
        attended2, latents2, inputs2, recon2 = self.step2(scales, [a * fused for a in attended1])

        def upsampled(head: nn.Module, t: torch.Tensor) -> torch.Tensor:
            return F.interpolate(head(t), size=x.shape[2:], mode="bilinear", align_corners=False)

        refined = [upsampled(head, a) for head, a in zip(self.predict2, attended2)]
        if not self.training:
            return torch.stack(refined).mean(0)
        coarse = [upsampled(head, d) for head, d in zip(self.predict1, scales)]
        return MSGANetOutputs(coarse + refined, latents1, latents2, inputs1, inputs2, recon1, recon2)

    @staticmethod
    def losses(outputs: MSGANetOutputs, target: torch.Tensor, **weights) -> Dict[str, torch.Tensor]:
        """:func:`msganet_loss` (segmentation, guided and reconstruction terms, and their total)."""
        return msganet_loss(outputs, target, **weights)

    def load_backbone_weights(self, weights: Union[str, os.PathLike, Mapping[str, torch.Tensor]]) -> List[str]:
        """Load a ResNet state_dict (a file path or a mapping) into ``self.backbone``, strictly.

        Accepted keys: the backbone's own (``conv1.weight``, ``layer1.0.bn1.running_mean``, …),
        optionally all behind one ``backbone.`` or ``module.`` prefix; a classifier (``fc.*``, as
        in torchvision checkpoints) is ignored. Missing, unexpected or mis-shaped keys raise
        ValueError naming them. Returns the ignored keys.
        """
        if isinstance(weights, (str, os.PathLike)):
            weights = torch.load(weights, map_location="cpu", weights_only=True)
        if not isinstance(weights, Mapping):
            raise TypeError(f"{_NAME}.load_backbone_weights: argument 'weights' must be a path or a state_dict "
                            f"mapping, got {type(weights).__name__}")
        state = dict(weights)
        for prefix in ("module.", "backbone."):
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
        ignored = sorted(k for k in state if k.startswith("fc."))
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        misfit = state_dict_misfit(self.backbone.state_dict(), state)
        if misfit:
            raise ValueError(f"{_NAME}.load_backbone_weights: the weights do not fit the backbone: {misfit}")
        self.backbone.load_state_dict(state, strict=True)
        return ignored
