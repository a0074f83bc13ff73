"""Benchmark cases of the originals' whole networks, original vs fast, with the same weights (op
column: the network's name), and MT-UNet in every implementation (op ``mtunet_model``). Our own
networks (:mod:`medattn_fast.models`) are ``bench/cases_models.py``.

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

**MT-UNet, every implementation** (op ``mtunet_model``; ``--op mtunet_model`` selects these rows):
the whole MT-UNet (Synapse model, ``MTUNet(9)``, 79M parameters) at 224².

* GPU: a training step, B = 12 (the original's training batch size): forward + backward of the
  logits in train mode (batch-statistics BatchNorm), and eval inference (no-grad).
* CPU: B = 1, inference (no-grad) and forward + backward. The original cannot run on a CPU at all
  (``.cuda()`` calls); its device-agnostic reference still evaluates GaussianTrans as a Python loop
  over the pixels of every Gaussian grid, which is what this row shows.

Providers, all sharing the reference's weights (one state_dict):

* ``reference``: the seed-faithful ``medattn_fast.reference.mtunet.MTUNet`` (loop GaussianTrans,
  permute copies, padding buffer, per-head linears);
* ``auto``: ``medattn_fast.compat.mtunet.MTUNet`` (the drop-in: same keys) on the default backend;
* ``torch``: the same compat model with every fused op forced to the vectorised torch backend;
* ``models``: the clean ``medattn_fast.models.MTUNet`` loaded with ``from_original_state_dict``;
* ``reference-vec``: the reference model with only its ``GaussianTrans`` blocks replaced by the
  vectorised ``torch`` implementation (no loop over pixels; every other block stays the seed's):
  the issue's second baseline ("the reference with a vectorised GaussianTrans").

AMP rows (shape suffix ``AMP``) run every provider under ``torch.autocast`` in bfloat16 with
float32 weights, as a mixed-precision training step would (bfloat16 needs no loss scaling).

The output compared (error column) is the logits, (B, 9, 224, 224). FLOPs: 80.75 GFLOP per image
forward (convolutions and matmuls of the reference, counted with ``torch.utils.flop_counter`` on
the meta device; the Gaussian softmaxes are not counted).

**The GPU check** (``gpu_check_cases(device, tiny)``, ``bench/gpu_check.sh``): one MT-UNet training
step, B=12 224², the drop-in (``compat.mtunet.MTUNet``, ``auto``; and on CUDA the same step captured
as CUDA graphs by ``torch.compile(mode="reduce-overhead")``) vs the original (the CPU dry run builds it
at B=1 and does not time it).
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, List, Sequence, Tuple

import torch

import medattn_fast
from bench.harness import Case, auto_provider, fast_twin, owned_by, with_backend, within
from medattn_fast.compat.mtunet import GaussianTrans as CompatGaussianTrans
from medattn_fast.compat.mtunet import MTUNet as CompatMTUNet
from medattn_fast.models import MTUNet as CleanMTUNet
from medattn_fast.reference.mtunet import MTUNet as ReferenceMTUNet


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
    ("DANet head C=512", _danet_head, fast_twin, (8, 2048, 96, 96), (1, 2048, 32, 32), "256² image"),
    ("MT-UNet", _mtunet, fast_twin, (12, 3, 224, 224), (1, 3, 224, 224), "224²"),
    ("AttU_Net (LeeJunHyun)", _attu_net, fast_twin, (8, 3, 224, 224), (1, 3, 224, 224), "224²"),
    ("Oktay CT 3-D grid gate", _oktay_ct, fast_twin, (2, 1, 160, 160, 96), (1, 1, 48, 48, 32), "48×48×32 patch"),
    ("MONAI AttentionUnet 3-D", _monai_attention_unet, _monai_fast, (2, 1, 96, 96, 96), (1, 1, 48, 48, 48), "48³ patch"),
)


def shape_label(shape: Sequence[int]) -> str:
    return f"B={shape[0]} {'x'.join(map(str, shape[1:]))}"


def network_cases(device: torch.device, training_only: bool = False) -> List[Case]:
    """The originals' whole networks, original vs converted (``training_only``: the train-step rows)."""
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


# ------------------------------------------------------------------------------------------------
# MT-UNet, every implementation (op mtunet_model)
# ------------------------------------------------------------------------------------------------

SIDE, CLASSES = 224, 9
FLOPS_PER_IMAGE = 80.75e9


class _VectorisedGaussianTrans(CompatGaussianTrans):
    """GaussianTrans on the vectorised ``torch`` backend, whatever the default choice is."""

    def forward(self, inputs):
        with medattn_fast.use_backend("torch"):
            return super().forward(inputs)


def _with_vectorised_gaussian(ref: torch.nn.Module) -> torch.nn.Module:
    """A copy of the reference model whose GaussianTrans blocks are the vectorised ones."""
    model = copy.deepcopy(ref)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ == "GaussianTrans":
                fast = _VectorisedGaussianTrans()
                fast.load_state_dict(child.state_dict())
                setattr(parent, name, fast.to(child.shift.device))
    return model


def _mtunet_model_setup(batch: int, train: bool, amp: bool = False):
    def setup(device: torch.device, dtype: torch.dtype):
        torch.manual_seed(0)
        ref = ReferenceMTUNet(CLASSES).to(device=device, dtype=dtype)
        with torch.no_grad():  # the original initialises it to zeros: give it content
            ref.stem.position_embedding.normal_(0.0, 0.02)
        compat = CompatMTUNet.from_original(ref)
        clean = CleanMTUNet.from_original_state_dict(ref.state_dict())
        vectorised = _with_vectorised_gaussian(ref)
        for model in (ref, compat, clean, vectorised):
            model.train(train)
        x = torch.randn(batch, 3, SIDE, SIDE, device=device, dtype=dtype, requires_grad=False)
        providers: Dict[str, Callable] = {
            "reference": ref.forward,
            "auto": compat.forward,
            "torch": with_backend(compat, "torch"),
            "models": clean.forward,
            "reference-vec": vectorised.forward,
        }
        if amp:
            # bfloat16 autocast (float32 weights), as a mixed-precision training step runs
            providers = {name: within(fn, lambda: torch.autocast(device.type, dtype=torch.bfloat16))
                         for name, fn in providers.items()}
        return (x,), providers

    return setup


def mtunet_model_cases(device: torch.device) -> List[Case]:
    """MT-UNet, every implementation (op ``mtunet_model``)."""
    out = []
    for batch, devices, label in ((12, ("cuda",), "GPU training batch"), (1, ("cpu",), "CPU, one image")):
        out.append(Case(op="mtunet_model", shape=f"B={batch} 3x{SIDE}x{SIDE} train step", setup=_mtunet_model_setup(batch, True),
                        flops=FLOPS_PER_IMAGE * batch, modes=("fwd+bwd",), devices=devices,
                        note=f"{label}: MTUNet(9) forward+backward of the logits, train-mode BN"))
        if batch > 1:
            out.append(Case(op="mtunet_model", shape=f"B={batch} 3x{SIDE}x{SIDE} train step AMP",
                            setup=_mtunet_model_setup(batch, True, amp=True), flops=FLOPS_PER_IMAGE * batch, modes=("fwd+bwd",),
                            devices=devices, note=f"{label}: as the train step, under bfloat16 autocast"))
        out.append(Case(op="mtunet_model", shape=f"B={batch} 3x{SIDE}x{SIDE} eval", setup=_mtunet_model_setup(batch, False),
                        flops=FLOPS_PER_IMAGE * batch, modes=("no-grad",), devices=devices,
                        note=f"{label}: MTUNet(9) inference"))
    return out


def cases(device: torch.device) -> List[Case]:
    return network_cases(device) + mtunet_model_cases(device)


# ------------------------------------------------------------------------------------------------
# the GPU check (bench/gpu_check.sh)
# ------------------------------------------------------------------------------------------------

def _check_mtunet_setup(batch: int, side: int):
    def setup(device: torch.device, dtype: torch.dtype):
        original = ReferenceMTUNet(CLASSES).to(device=device, dtype=dtype).train()
        with torch.no_grad():   # the original initialises it to zeros: give it content
            original.stem.position_embedding.normal_(0.0, 0.02)
        fast = CompatMTUNet.from_original(original).train()
        x = torch.randn(batch, 3, side, side, device=device, dtype=dtype)
        # auto: the fastest fused backend of each op (the row's note names each op's pick); on CUDA
        # also the whole step captured as CUDA graphs (torch.compile's "reduce-overhead"): at B=12 the
        # ops launch programs of a few µs, so the host's launch latency is the cost to remove
        providers: Dict[str, Callable] = {"auto": auto_provider(fast)}
        if device.type == "cuda":
            providers["auto graphed"] = owned_by(torch.compile(fast, mode="reduce-overhead"), fast)
        providers["original"] = original.forward
        return (x,), providers
    return setup


def gpu_check_cases(device: torch.device, tiny: bool = False) -> List[Case]:
    """The GPU check's MT-UNet training step (``tiny``: B=1, built but not timed in the CPU dry run)."""
    batch = 1 if tiny else 12
    return [Case(op="mtunet", shape=f"MT-UNet train step B={batch} {SIDE}x{SIDE}", setup=_check_mtunet_setup(batch, SIDE),
                 flops=FLOPS_PER_IMAGE * batch, dtypes=(torch.float32,), modes=("fwd+bwd",),
                 estimate_s=3 if tiny else 90, warm=("auto",), timed_in_dry_run=False,
                 note="train-mode BN, logits fwd+bwd")]
