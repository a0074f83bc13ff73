"""Benchmark cases of the originals' whole networks, original vs fast, with the same weights.

``original`` is the network as its authors wrote it (restated: :mod:`medattn_fast.reference`,
:mod:`bench.networks`, MONAI's tree in :mod:`medattn_fast.testing.monai_attention_unet`); ``fast`` is the same
object after :func:`medattn_fast.convert` (its attention blocks swapped for the fast ones, every
other layer untouched) — or, for MONAI's AttentionUnet, which ``convert`` does not take,
:class:`medattn_fast.models.AttentionUNet` loaded from the MONAI network's ``state_dict``. The
error column is the max abs difference of the outputs (logits; DANet: the fused head output).

Networks, at the sizes their authors trained them (the GPU rows) and at sizes a 2-core CPU runs a
training step of in seconds (the CPU rows, the image or patch smaller, the network the same):

=====================  ===========================================  ====================  ===============
network                what is swapped                              GPU row               CPU row
=====================  ===========================================  ====================  ===============
DANet head             PAM + CAM at C=512 (in 2048, ResNet stride    B=8 2048×96×96       B=1 2048×48×48
                       8: a 768² crop gives 96×96)                  (768² crops)         (384² image)
MT-UNet                GaussianTrans (grids 7×7 / 4×4 / 2×2 at      B=12 3×224×224       B=1 3×224×224
                       224²), window, external attention
AttU_Net (LeeJunHyun)  Attention_block on four skips                B=8 3×224×224        B=1 3×224×224
Oktay CT 3-D           GridAttentionBlock3D on three skips          B=2 1×160×160×96     B=1 1×64×64×48
MONAI AttentionUnet    AttentionBlock on four skips (3-D,           B=2 1×96×96×96       B=1 1×64×64×64
                       channels 16…256, strides 2)
=====================  ===========================================  ====================  ===============

Modes: ``fwd+bwd`` in train mode (a training step: batch-statistics BN, backward through every
parameter) — the headline — and ``no-grad`` in eval mode (``--all``).
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, List, Sequence, Tuple

import torch

import medattn_fast
from bench.harness import Case


def _converted(original: torch.nn.Module) -> torch.nn.Module:
    fast = copy.deepcopy(original)
    report = medattn_fast.convert(fast)
    if not len(report):
        raise RuntimeError(f"convert() swapped nothing in {type(original).__name__}:\n{report}")
    return fast


def _danet_head() -> torch.nn.Module:
    from medattn_fast.reference.danet import DANetHead

    head = DANetHead(2048, 19)  # Cityscapes' 19 classes
    with torch.no_grad():  # gamma = 0 (its init) would make PAM and CAM the identity
        head.sa.gamma.fill_(0.5)
        head.sc.gamma.fill_(0.5)
    return head


def _mtunet() -> torch.nn.Module:
    from medattn_fast.reference.mtunet import MTUNet

    model = MTUNet(9)  # Synapse's 9 classes
    with torch.no_grad():  # the original initialises it to zeros: give it content
        model.stem.position_embedding.normal_(0.0, 0.02)
    return model


def _attu_net() -> torch.nn.Module:
    from bench.networks import AttU_Net

    return AttU_Net(3, 1)


def _oktay_ct() -> torch.nn.Module:
    from bench.networks import unet_CT_single_att_dsv_3D

    return unet_CT_single_att_dsv_3D(feature_scale=4, n_classes=4, in_channels=1)


MONAI_CONFIG = dict(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2))


def _monai_attention_unet() -> torch.nn.Module:
    from medattn_fast.testing.monai_attention_unet import AttentionUnet

    return AttentionUnet(**MONAI_CONFIG)


def _monai_fast(original: torch.nn.Module) -> torch.nn.Module:
    from medattn_fast.models import AttentionUNet

    return AttentionUNet.from_monai_state_dict(original.state_dict(), **MONAI_CONFIG)


def _output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _setup(build: Callable[[], torch.nn.Module], make_fast: Callable, input_shape: Tuple[int, ...], training: bool):
    def setup(device: torch.device, dtype: torch.dtype):
        torch.manual_seed(0)
        original = build().to(device=device, dtype=dtype).train(training)
        fast = make_fast(original).to(device=device, dtype=dtype).train(training)
        x = torch.randn(*input_shape, device=device, dtype=dtype)

        def run(model):
            def call(x):
                torch.manual_seed(1)  # the same dropout masks for both (DANet head's Dropout2d)
                return _output(model(x))
            call.__self__ = model  # the harness frees the parameters' .grad between modes
            return call

        providers: Dict[str, Callable] = {"original": run(original), "fast": run(fast)}
        return (x,), providers
    return setup


# (label, build, make_fast, GPU input, CPU input, what the CPU size is)
NETWORKS: Sequence[tuple] = (
    ("DANet head C=512", _danet_head, _converted, (8, 2048, 96, 96), (1, 2048, 32, 32), "256² image"),
    ("MT-UNet", _mtunet, _converted, (12, 3, 224, 224), (1, 3, 224, 224), "224²"),
    ("AttU_Net (LeeJunHyun)", _attu_net, _converted, (8, 3, 224, 224), (1, 3, 224, 224), "224²"),
    ("Oktay CT 3-D grid gate", _oktay_ct, _converted, (2, 1, 160, 160, 96), (1, 1, 48, 48, 32), "48×48×32 patch"),
    ("MONAI AttentionUnet 3-D", _monai_attention_unet, _monai_fast, (2, 1, 96, 96, 96), (1, 1, 48, 48, 48), "48³ patch"),
)


def shape_label(shape: Sequence[int]) -> str:
    return f"B={shape[0]} {'x'.join(map(str, shape[1:]))}"


def cases(device: torch.device, training_only: bool = False) -> List[Case]:
    cuda = device.type == "cuda"
    out: List[Case] = []
    for label, build, make_fast, gpu_shape, cpu_shape, _ in NETWORKS:
        shape = gpu_shape if cuda else cpu_shape
        for training, mode in ((True, "fwd+bwd"), (False, "no-grad")):
            if training_only and not training:
                continue
            out.append(Case(op=label, shape=f"{shape_label(shape)} {'train step' if training else 'eval'}",
                            setup=_setup(build, make_fast, shape, training), modes=(mode,),
                            reference="original", devices=(device.type,)))
    return out
