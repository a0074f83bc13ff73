r"""Train a medattn-fast segmentation model: ``python -m medattn_fast.train`` or ``medattn-fast train``.

Usage::

    # single process, 2-D phantoms, Attention U-Net (CPU or the first GPU)
    python -m medattn_fast.train --model attention_unet --data phantoms2d --steps 2000 --out runs/aunet

    # 3-D phantoms, mixed precision (bf16 autocast on CPU; fp16 + GradScaler on CUDA), torch.compile
    python -m medattn_fast.train --model attention_unet --data phantoms3d --amp --compile --out runs/aunet3d

    # your own data: a folder of <case>_img.npy + <case>_mask.npy (or <case>.npz, or NIfTI), 96³ crops
    python -m medattn_fast.train --model attention_unet --data /data/liver --crop 96 96 96 --out runs/liver

    # resume: continues the step count, optimizer, AMP scaler, data order and RNG streams
    python -m medattn_fast.train --model attention_unet --data phantoms2d --steps 4000 \
        --resume runs/aunet/checkpoint.pt --out runs/aunet

    # several processes / GPUs (DDP; NCCL on GPU, gloo on CPU; rank 0 writes everything)
    torchrun --nproc_per_node=4 -m medattn_fast.train --model mtunet --data phantoms2d --out runs/mtunet

    # a model's constructor arguments beyond the defaults
    python -m medattn_fast.train --model attention_unet --model-kwargs '{"channels": [16, 32, 64, 128]}'

What it does, per step: a batch ``(image (B, C, *S), label (B, *S))``, logits from the model, the
loss ``CE(logits, label) + (1 − soft Dice over the foreground classes)`` (:class:`DiceCELoss`),
AdamW (a model whose train-mode output is structured — MSGANet's deep supervision — is trained on
its own objective plus the soft Dice of its averaged logits, see :func:`training_loss`).
``--batch-size`` is per process. A progress line on stderr shows the loss, the hard Dice of
the batch (foreground classes, all ranks pooled) and images/s. Every ``--save-every`` steps (and at
the end) rank 0 writes ``<out>/checkpoint.pt`` atomically; every ``--log-every`` steps it appends the
metrics to ``<out>/log.jsonl``; every ``--snapshot-every`` steps it writes ``<out>/snapshot_<step>.png``
(input, label, prediction, then the model's attention maps when its ``forward`` takes
``return_attention``) and redraws ``<out>/progress.png`` (loss and Dice against the step; also at the end).
With matplotlib installed the snapshot is a labelled figure (each gate's map with its level and a
0–1 colour bar; :mod:`medattn_fast.train_figures`); without it, the snapshot is a strip of unlabelled
panels and no progress plot is drawn (said once). ``--tensorboard DIR`` also writes the scalars and
the snapshot's images there (``torch.utils.tensorboard``; the ``tensorboard`` extra).

Under DDP the parameters stay identical on every rank (gradients are averaged); BatchNorm running
statistics are each rank's own between forwards (DDP re-broadcasts rank 0's at each forward), and the
checkpoint holds rank 0's. A resumed DDP run with the same world size restores every rank's RNG.

Models are looked up by name in :data:`MODELS` and resolved lazily from ``medattn_fast.models``, so a
model that is not available gives a clear error when chosen, never at import time.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ._progress import StatusLine, progress_bar

__all__ = ["MODELS", "ModelSpec", "TrainConfig", "TrainResult", "DiceCELoss", "training_loss", "dice_counts",
           "dice_scores", "build_model",
           "build_dataset", "train", "main"]

CHECKPOINT_NAME = "checkpoint.pt"


# --------------------------------------------------------------------------------------------
# model registry
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """How to build a model by name.

    ``class_name`` is looked up on ``medattn_fast.models`` when the model is built (then, if the
    package does not export it, in its submodule ``medattn_fast.models.<module>``). ``defaults``
    are the small default constructor arguments (``{spatial_dims}`` etc. are filled in by
    :func:`build_model`); ``spatial_dims`` lists the dimensionalities the model supports.
    """
    class_name: str
    module: str
    spatial_dims: Tuple[int, ...]
    defaults: Dict[str, Any] = field(default_factory=dict)


MODELS: Dict[str, ModelSpec] = {
    "attention_unet": ModelSpec("AttentionUNet", "attention_unet", (2, 3),
                                {"channels": (16, 32, 64, 128), "strides": (2, 2, 2)}),
    "mtunet": ModelSpec("MTUNet", "mtunet", (2,), {"base_channels": 16, "num_heads": 4}),
    "daunet": ModelSpec("DAUNet", "daunet", (2, 3), {"channels": (16, 32, 64, 128), "strides": (2, 2, 2)}),
    "msganet": ModelSpec("MSGANet", "msganet", (2,), {"base_channels": 16, "backbone_widths": (16, 32, 64, 128)}),
    "cross_attention_unet": ModelSpec("CrossAttentionUNet", "cross_attention_unet", (2, 3),
                                      {"channels": (16, 32, 64, 128), "strides": (2, 2, 2)}),
}

# the names the models use for the generic arguments (the first one the constructor takes wins)
_CLASS_ARGS = ("num_classes", "out_channels", "n_classes", "classes")
_CHANNEL_ARGS = ("in_channels", "n_channels", "in_ch")


def _model_class(name: str):
    if name not in MODELS:
        raise ValueError(f"train: unknown model {name!r}; choose one of {sorted(MODELS)}")
    import importlib

    import medattn_fast.models as models

    spec = MODELS[name]
    cls = getattr(models, spec.class_name, None)
    if cls is None:
        module_name = f"medattn_fast.models.{spec.module}"
        try:
            cls = getattr(importlib.import_module(module_name), spec.class_name, None)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:  # a missing dependency of an existing module: say so
                raise
    if cls is None:
        raise ValueError(f"train: model {name!r} needs medattn_fast.models.{MODELS[name].class_name}, "
                         "which this installation of medattn-fast does not provide")
    return cls


def build_model(name: str, *, spatial_dims: int, in_channels: int, num_classes: int,
                overrides: Optional[Dict[str, Any]] = None) -> nn.Module:
    """The model ``name`` for ``in_channels`` inputs and ``num_classes`` outputs, its small default
    configuration (:data:`MODELS`) updated with ``overrides``.

    The generic arguments are passed under the names the constructor uses (``num_classes`` or
    ``out_channels``, ``in_channels``, ``spatial_dims``), found with :func:`inspect.signature`.
    """
    cls = _model_class(name)
    spec = MODELS[name]
    if spatial_dims not in spec.spatial_dims:
        raise ValueError(f"train: model {name!r} supports spatial_dims {spec.spatial_dims}, the data has "
                         f"{spatial_dims} (choose phantoms2d or 2-D data)")
    params = inspect.signature(cls).parameters
    kwargs: Dict[str, Any] = dict(spec.defaults)
    if "spatial_dims" in params:
        kwargs["spatial_dims"] = spatial_dims
    for names, value in ((_CHANNEL_ARGS, in_channels), (_CLASS_ARGS, num_classes)):
        key = next((n for n in names if n in params), None)
        if key is None:
            raise ValueError(f"train: cannot tell {cls.__name__} its {names[0]}: its constructor takes none of {names}")
        kwargs[key] = value
    kwargs.update(overrides or {})
    unknown = [k for k in kwargs if k not in params] if not any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) else []
    if unknown:
        raise ValueError(f"train: {cls.__name__} takes no argument(s) {unknown}; it takes {list(params)}")
    return cls(**kwargs)


def _takes_return_attention(model: nn.Module) -> bool:
    try:
        return "return_attention" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------------------------
# loss and metric
# --------------------------------------------------------------------------------------------
def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


class DiceCELoss(nn.Module):
    r"""``ce_weight · CE(logits, y) + dice_weight · (1 − mean_{b, k≥1} Dice_{b,k})``.

    Soft Dice per image ``b`` and foreground class ``k`` (the background, class 0, is left out:
    it dominates the voxel count and would make the Dice term trivially high), with
    ``p = softmax(logits)`` over classes and ``g`` the one-hot label::

        Dice_{b,k} = (2 Σ_s p_{b,k,s} g_{b,k,s} + ε) / (Σ_s p_{b,k,s} + Σ_s g_{b,k,s} + ε)

    ``ε = smooth`` keeps an absent class that is not predicted at Dice ≈ 1. Computed in float32
    for 16-bit logits (autocast-safe), in float64 for float64 logits. Shapes: logits ``(B, K, *S)``, target
    ``(B, *S)`` int64 in ``0 … K-1``; returns a scalar. With K = 1 there is no foreground: the loss is
    the CE alone.
    """

    def __init__(self, *, ce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1e-5):
        super().__init__()
        self.ce_weight, self.dice_weight, self.smooth = float(ce_weight), float(dice_weight), float(smooth)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.dim() < 3 or target.shape != logits.shape[:1] + logits.shape[2:]:
            raise ValueError(f"DiceCELoss: expected logits (B, K, *S) and target (B, *S), got "
                             f"{tuple(logits.shape)} and {tuple(target.shape)}")
        ce = F.cross_entropy(_at_least_float32(logits), target)
        return self.ce_weight * ce + self.dice_weight * self.dice_term(logits, target)

    def dice_term(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``1 − mean_{b, k≥1} Dice_{b,k}`` alone (0 when there is no foreground class)."""
        logits = _at_least_float32(logits)
        num_classes = logits.shape[1]
        if num_classes < 2:
            return logits.new_zeros(())
        probs = logits.softmax(dim=1)[:, 1:].flatten(2)                      # (B, K-1, N)
        onehot = F.one_hot(target, num_classes).movedim(-1, 1)[:, 1:].flatten(2).to(probs.dtype)
        intersection = (probs * onehot).sum(-1)
        dice = (2 * intersection + self.smooth) / (probs.sum(-1) + onehot.sum(-1) + self.smooth)
        return 1.0 - dice.mean()


def training_loss(raw_model: nn.Module, outputs, target: torch.Tensor,
                  criterion: DiceCELoss) -> Tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits) of one train-mode forward.

    Logits (a tensor): ``criterion(logits, target)``. A structured output (deep supervision, as
    MSGANet's :class:`~medattn_fast.models.MSGANetOutputs`) comes with the model's own objective:
    the model's ``losses(outputs, target)["total"]`` (its original training loss) plus the soft
    Dice term of ``outputs.average()``, which is also the logits the metrics see.
    """
    if isinstance(outputs, torch.Tensor):
        return criterion(outputs, target), outputs
    losses = getattr(raw_model, "losses", None)
    average = getattr(outputs, "average", None)
    if losses is None or average is None:
        raise TypeError(f"train: {type(raw_model).__name__} returned {type(outputs).__name__}: expected logits, or "
                        "an output with .average() from a model with .losses(outputs, target)")
    logits = average()
    total = losses(outputs, target)["total"]
    return total + criterion.dice_weight * criterion.dice_term(logits, target), logits


def dice_counts(prediction: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per foreground class k ≥ 1: ``[|P_k ∩ G_k|, |P_k| + |G_k|]`` over the whole batch, (K-1, 2)
    float64 — summable across batches and ranks before forming the Dice."""
    pred = F.one_hot(prediction, num_classes)[..., 1:].flatten(0, -2).double()
    true = F.one_hot(target, num_classes)[..., 1:].flatten(0, -2).double()
    return torch.stack([(pred * true).sum(0), pred.sum(0) + true.sum(0)], dim=1)


def dice_scores(counts: torch.Tensor) -> float:
    """Mean hard Dice ``2|P∩G| / (|P| + |G|)`` over the foreground classes present in prediction or
    label (a class absent from both is not scored); 1.0 when none is present."""
    present = counts[:, 1] > 0
    if not bool(present.any()):
        return 1.0
    return float((2 * counts[present, 0] / counts[present, 1]).mean())


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def build_dataset(spec: str, *, length: int = 256, size: Optional[Sequence[int]] = None, num_classes: int = 3,
                  seed: int = 0, phantom_kwargs: Optional[Dict[str, Any]] = None) -> Dataset:
    """``phantoms2d`` / ``phantoms3d`` (:class:`~medattn_fast.data.PhantomDataset`, default sizes
    64² / 32³) or a folder path (:class:`~medattn_fast.data.FolderDataset`, ``size`` = crop)."""
    from .data import FolderDataset, PhantomDataset

    if spec in ("phantoms2d", "phantoms3d"):
        dims = 2 if spec == "phantoms2d" else 3
        size = tuple(size) if size else ((64, 64) if dims == 2 else (32, 32, 32))
        if len(size) == 1:
            size = size * dims
        if len(size) != dims:
            raise ValueError(f"train: --size for {spec} needs 1 or {dims} ints, got {list(size)}")
        return PhantomDataset(length, size, num_classes=num_classes, seed=seed, **(phantom_kwargs or {}))
    if not Path(spec).is_dir():
        raise ValueError(f"train: --data must be phantoms2d, phantoms3d or an existing folder, got {spec!r}")
    return FolderDataset(spec, crop_size=tuple(size) if size else None, seed=seed)


class ResumableSampler(DistributedSampler):
    """:class:`DistributedSampler` (shuffled by ``seed + epoch``, this rank's share) that can start
    part-way through an epoch: ``skip`` of this rank's indices are dropped, so a resumed run sees
    the same batches as an uninterrupted one without loading the skipped items."""

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.skip:])

    def __len__(self) -> int:
        return self.num_samples - self.skip


# --------------------------------------------------------------------------------------------
# config, checkpoints, distributed helpers
# --------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Everything a run depends on (the CLI flags, one to one)."""
    model: str = "attention_unet"
    data: str = "phantoms2d"
    out: str = "runs/train"
    steps: int = 1000
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 1e-4
    num_classes: Optional[int] = None          # phantoms: 3; folders: scanned from the label maps
    size: Optional[Tuple[int, ...]] = None     # phantom size / folder crop
    dataset_length: int = 256                  # phantoms only
    phantom_kwargs: Dict[str, Any] = field(default_factory=dict)
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    amp: bool = False
    compile: bool = False
    backend: Optional[str] = None
    device: Optional[str] = None
    resume: Optional[str] = None
    save_every: int = 500
    snapshot_every: int = 500
    log_every: int = 10
    workers: int = 0
    seed: int = 0
    quiet: bool = False
    tensorboard: Optional[str] = None          # a folder for TensorBoard event files

    def validate(self) -> None:
        """ValueError naming the flag for a value the loop cannot run with (before any work)."""
        for name, minimum in (("steps", 1), ("batch_size", 1), ("log_every", 1), ("save_every", 0),
                              ("snapshot_every", 0), ("workers", 0), ("dataset_length", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"train: --{name.replace('_', '-')} must be an int >= {minimum}, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"train: --lr must be > 0, got {self.lr!r}")
        if self.num_classes is not None and self.num_classes < 2:
            raise ValueError(f"train: --num-classes must be >= 2 (background + one class), got {self.num_classes}")


@dataclass
class TrainResult:
    """What :func:`train` hands back: the trained (unwrapped) model, its optimizer and last metrics."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: int
    loss: float
    dice: float
    checkpoint: Optional[Path]


def _distributed() -> Tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(path: Path, payload: Dict[str, Any]) -> None:
    """torch.save to a temporary file, then rename: a crash mid-write never leaves a torn checkpoint."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


class _Progress:
    """The training progress line on stderr: bar, step, loss, Dice, throughput and ETA."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.total, self.line = total, StatusLine(sys.stderr, enabled=enabled)
        self.start_time, self.start_step = time.perf_counter(), start

    def update(self, step: int, loss: float, dice: float, images_per_s: float) -> None:
        if not self.line.enabled:
            return
        remaining = (self.total - step) * (time.perf_counter() - self.start_time) / max(step - self.start_step, 1)
        self.line.show(f"{progress_bar(step, self.total, 24)} {step}/{self.total} loss {loss:.4f} dice {dice:.3f} "
                       f"{images_per_s:.1f} img/s eta {int(remaining) // 60}m{int(remaining) % 60:02d}s")

    def close(self) -> None:
        self.line.close(keep=True)


_told_without_matplotlib = False


def _without_matplotlib_once() -> None:
    global _told_without_matplotlib
    if not _told_without_matplotlib:
        _told_without_matplotlib = True
        print("train: matplotlib is not installed: snapshots are unlabelled panels and no progress.png is drawn "
              "(pip install matplotlib, or the medattn-fast[bench] extra)", file=sys.stderr)


def _snapshot_arrays(raw_model: nn.Module, image: torch.Tensor, label: torch.Tensor):
    """(image (C, *S), label (*S), prediction (*S), attention maps [(1, *S_l)]) of the batch's first
    item, numpy, from an eval-mode forward (the model's mode is restored)."""
    was_training = raw_model.training
    raw_model.eval()
    with torch.no_grad():
        if _takes_return_attention(raw_model):
            logits, maps = raw_model(image[:1], return_attention=True)
            maps = [m[0].float().cpu().numpy() for m in maps if m is not None]
        else:
            logits, maps = raw_model(image[:1]), []
    raw_model.train(was_training)
    return (image[0].float().cpu().numpy(), label[0].cpu().numpy(), logits.argmax(1)[0].cpu().numpy(), maps)


def _write_snapshot(path: Path, arrays, *, num_classes: int, step: int) -> None:
    """The snapshot PNG: a labelled matplotlib figure, or (without matplotlib) the panel strip."""
    from . import train_figures

    image, label, prediction, maps = arrays
    if train_figures.matplotlib_available():
        counts = dice_counts(torch.from_numpy(prediction)[None], torch.from_numpy(label)[None].long(), num_classes)
        figure = train_figures.snapshot_figure(image, label, prediction, maps, num_classes=num_classes, step=step,
                                               dice=dice_scores(counts))
        train_figures.save_figure(figure, path)
        return
    from .png import snapshot_panels, write_png

    _without_matplotlib_once()
    write_png(path, snapshot_panels(image, label, prediction, maps))


def _write_progress(path: Path, records: List[Dict[str, float]]) -> None:
    """``progress.png`` from the log's records (nothing without matplotlib or records)."""
    from . import train_figures

    if not records:
        return
    if not train_figures.matplotlib_available():
        _without_matplotlib_once()
        return
    train_figures.save_figure(train_figures.progress_figure(records), path)


def _read_log(path: Path) -> List[Dict[str, float]]:
    """The records of an existing ``log.jsonl`` (a resumed run's progress plot starts with them)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _tensorboard_writer(folder: str):
    """A ``torch.utils.tensorboard.SummaryWriter`` on ``folder`` (ValueError naming the flag when
    the tensorboard package is missing)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ValueError(f"train: --tensorboard needs the tensorboard package (pip install tensorboard, or the "
                         f"medattn-fast[tensorboard] extra): {exc}") from None
    return SummaryWriter(log_dir=folder)


def _tensorboard_images(writer, arrays, step: int, num_classes: int) -> None:
    """The snapshot's panels as TensorBoard images (grey 0–1; classes scaled to 0–1; α as is)."""
    from .png import middle_slice

    image, label, prediction, maps = arrays
    dims = label.ndim
    shown = middle_slice(image[0], dims).astype(np.float32)
    span = float(shown.max() - shown.min()) or 1.0
    writer.add_image("snapshot/image", (shown - shown.min()) / span, step, dataformats="HW")
    for name, values in (("label", label), ("prediction", prediction)):
        writer.add_image(f"snapshot/{name}", middle_slice(values, dims).astype(np.float32) / max(num_classes - 1, 1),
                         step, dataformats="HW")
    for level, alpha in enumerate(maps, start=1):
        alpha = alpha[0] if alpha.ndim == dims + 1 else alpha
        writer.add_image(f"snapshot/attention_level_{level}",
                         middle_slice(alpha, dims, depth_of=label.shape[0]).astype(np.float32), step, dataformats="HW")


# --------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------
def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) training as configured; see the module docstring. Under torchrun every rank
    calls this; the process group is created here (env://) and destroyed at the end."""
    config.validate()
    rank, world, local_rank = _distributed()
    distributed = world > 1
    if config.device is not None:
        device = torch.device(config.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
    try:
        return _train(config, rank, world, device)
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(config: TrainConfig, rank: int, world: int, device: torch.device) -> TrainResult:
    from . import backend as backend_module

    is_main = rank == 0
    distributed = world > 1
    if config.backend is not None:
        backend_module.set_backend(config.backend)
    out = Path(config.out)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)

    checkpoint = None
    if config.resume:
        checkpoint = torch.load(config.resume, map_location="cpu", weights_only=False)
        if checkpoint.get("model_name") != config.model:
            raise ValueError(f"train: --resume {config.resume!r} holds model {checkpoint.get('model_name')!r}, "
                             f"not {config.model!r}")

    # every rank seeds identically so that the initial weights agree (DDP also broadcasts them)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)

    num_classes = config.num_classes
    dataset = build_dataset(config.data, length=config.dataset_length, size=config.size,
                            num_classes=num_classes or 3, seed=config.seed, phantom_kwargs=config.phantom_kwargs)
    if num_classes is None:
        num_classes = getattr(dataset, "num_classes", 3)
        num_classes = num_classes() if callable(num_classes) else num_classes
    sample_image, _ = dataset[0]
    spatial_dims = sample_image.dim() - 1

    raw_model = build_model(config.model, spatial_dims=spatial_dims, in_channels=sample_image.shape[0],
                            num_classes=num_classes, overrides=config.model_kwargs).to(device)
    optimizer = torch.optim.AdamW(raw_model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    use_scaler = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    start_step = 0
    if checkpoint is not None:
        raw_model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        start_step = int(checkpoint["step"])
        states = checkpoint["rng"]
        # one RNG state per rank was saved; a different world size keeps the fresh seeding
        if len(states) == world:
            _set_rng_state(states[rank])

    model: nn.Module = raw_model
    if distributed:
        model = nn.parallel.DistributedDataParallel(raw_model, device_ids=[device.index] if device.type == "cuda"
                                                    else None)
    if config.compile:
        model = torch.compile(model)

    sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, seed=config.seed)
    steps_per_epoch = len(sampler) // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"train: {len(dataset)} items over {world} process(es) do not fill one batch of "
                         f"{config.batch_size}")
    # the loader draws its workers' base seed from this generator, not from the global stream, so
    # starting an iterator (every epoch, and once more on resume) leaves the dropout stream alone
    loader = DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, drop_last=True,
                        num_workers=config.workers, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(config.seed + rank))
    criterion = DiceCELoss()
    if config.amp:
        amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        autocast = lambda: torch.autocast(device.type, dtype=amp_dtype)  # noqa: E731
    else:
        autocast = nullcontext

    progress = _Progress(config.steps, start_step, enabled=is_main and not config.quiet)
    step = start_step
    loss_value, dice_value = float("nan"), float("nan")
    window_loss, window_steps, window_counts, window_images, window_start = 0.0, 0, None, 0, time.perf_counter()
    records = _read_log(out / "log.jsonl") if is_main else []
    log_file = open(out / "log.jsonl", "a") if is_main else None
    writer = _tensorboard_writer(config.tensorboard) if is_main and config.tensorboard else None
    saved: Optional[Path] = None

    def save() -> Path:
        # every rank's RNG state goes into the checkpoint so that a resumed DDP run continues each stream
        states = [None] * world
        if distributed:
            dist.all_gather_object(states, _rng_state())
        else:
            states = [_rng_state()]
        path = out / CHECKPOINT_NAME
        if is_main:
            _save_checkpoint(path, {
                "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if use_scaler else None, "step": step, "rng": states,
                "model_name": config.model, "num_classes": num_classes, "config": dataclasses.asdict(config),
            })
        return path

    model.train()
    try:
        while step < config.steps:
            epoch, offset = divmod(step, steps_per_epoch)
            sampler.set_epoch(epoch)
            sampler.skip = offset * config.batch_size
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            for image, label in loader:
                image = image.to(device, non_blocking=True)
                label = label.to(device, non_blocking=True)
                with autocast():
                    loss, logits = training_loss(raw_model, model(image), label, criterion)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                step += 1

                window_loss += float(loss.detach())
                window_steps += 1
                counts = dice_counts(logits.detach().argmax(1), label, num_classes)
                window_counts = counts if window_counts is None else window_counts + counts
                window_images += image.shape[0]
                if step % config.log_every == 0 or step == config.steps:
                    stats = torch.cat([torch.tensor([window_loss, window_steps, window_images], dtype=torch.float64),
                                       window_counts.cpu().flatten()])
                    if distributed:
                        # pool the window over the ranks (gloo/NCCL: on the collective's device)
                        stats = stats.to(device if device.type == "cuda" else "cpu")
                        dist.all_reduce(stats)
                        stats = stats.cpu()
                    elapsed = time.perf_counter() - window_start
                    loss_value = float(stats[0]) / float(stats[1])  # mean over the window's steps and ranks
                    dice_value = dice_scores(stats[3:].view(-1, 2))
                    images_per_s = float(stats[2]) / max(elapsed, 1e-9)
                    progress.update(step, loss_value, dice_value, images_per_s)
                    if log_file is not None:
                        record = {"step": step, "loss": loss_value, "dice": dice_value, "images_per_s": images_per_s}
                        records.append(record)
                        log_file.write(json.dumps(record) + "\n")
                        log_file.flush()
                    if writer is not None:
                        for name in ("loss", "dice", "images_per_s"):
                            writer.add_scalar(f"train/{name}", records[-1][name], step)
                    window_loss, window_steps, window_counts, window_images = 0.0, 0, None, 0
                    window_start = time.perf_counter()
                if is_main and config.snapshot_every and step % config.snapshot_every == 0:
                    arrays = _snapshot_arrays(raw_model, image, label)
                    _write_snapshot(out / f"snapshot_{step:07d}.png", arrays, num_classes=num_classes, step=step)
                    _write_progress(out / "progress.png", records)
                    if writer is not None:
                        _tensorboard_images(writer, arrays, step, num_classes)
                if config.save_every and step % config.save_every == 0 and step != config.steps:
                    saved = save()
                if step >= config.steps:
                    break
        saved = save()
        if is_main and config.snapshot_every and step % config.snapshot_every != 0:
            _write_progress(out / "progress.png", records)   # the curve up to the last step
    finally:
        progress.close()
        if log_file is not None:
            log_file.close()
        if writer is not None:
            writer.close()
    if is_main and step == start_step:
        print(f"train: nothing to do: the run is at step {step} and --steps is {config.steps}", file=sys.stderr)
    elif is_main and not math.isfinite(loss_value):
        print(f"train: warning: the loss is {loss_value}", file=sys.stderr)
    return TrainResult(raw_model, optimizer, step, loss_value, dice_value, saved if is_main else None)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The training flags (shared by ``python -m medattn_fast.train`` and ``medattn-fast train``)."""
    d = TrainConfig()
    ap.add_argument("--model", default=d.model, choices=sorted(MODELS), help="network to train")
    ap.add_argument("--data", default=d.data, help="phantoms2d, phantoms3d or a folder of volumes")
    ap.add_argument("--out", default=d.out, help="output folder (checkpoint.pt, snapshot_*.png, log.jsonl)")
    ap.add_argument("--steps", type=int, default=d.steps, help="total optimizer steps (a resumed run counts on)")
    ap.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step and per process")
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--weight-decay", type=float, default=d.weight_decay)
    ap.add_argument("--num-classes", type=int, default=None,
                    help="classes incl. background (phantoms: 3; folders: scanned from the labels)")
    ap.add_argument("--size", "--crop", dest="size", type=int, nargs="+", default=None,
                    help="phantom size or folder crop, e.g. 64 or 96 96 96")
    ap.add_argument("--dataset-length", type=int, default=d.dataset_length, help="phantoms per epoch")
    ap.add_argument("--noise", type=float, default=None, help="phantom noise std (default 0.1)")
    ap.add_argument("--model-kwargs", type=json.loads, default={}, help="JSON dict of extra constructor arguments")
    ap.add_argument("--amp", action="store_true", help="autocast: bf16 on CPU, fp16 + GradScaler on CUDA")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--backend", default=None, help="medattn-fast kernel backend (auto, torch, triton, cuda, cpp)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK if available)")
    ap.add_argument("--resume", default=None, help="checkpoint to continue from")
    ap.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint interval in steps (0: end only)")
    ap.add_argument("--snapshot-every", type=int, default=d.snapshot_every, help="PNG interval in steps (0: never)")
    ap.add_argument("--log-every", type=int, default=d.log_every, help="progress/log interval in steps")
    ap.add_argument("--workers", type=int, default=d.workers, help="DataLoader worker processes")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--quiet", action="store_true", help="no progress line")
    ap.add_argument("--tensorboard", default=None, metavar="DIR",
                    help="also write scalars and snapshot images to DIR for TensorBoard (needs tensorboard)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    phantom_kwargs = {} if args.noise is None else {"noise_std": args.noise}
    return TrainConfig(model=args.model, data=args.data, out=args.out, steps=args.steps, batch_size=args.batch_size,
                       lr=args.lr, weight_decay=args.weight_decay, num_classes=args.num_classes,
                       size=tuple(args.size) if args.size else None, dataset_length=args.dataset_length,
                       phantom_kwargs=phantom_kwargs, model_kwargs=args.model_kwargs, amp=args.amp,
                       compile=args.compile, backend=args.backend, device=args.device, resume=args.resume,
                       save_every=args.save_every, snapshot_every=args.snapshot_every, log_every=args.log_every,
                       workers=args.workers, seed=args.seed, quiet=args.quiet, tensorboard=args.tensorboard)


def run(args: argparse.Namespace) -> int:
    """Train from parsed flags; prints a summary (rank 0) and returns the exit status."""
    result = train(config_from_args(args))
    if result.checkpoint is not None:
        print(f"step {result.step}: loss {result.loss:.4f}, dice {result.dice:.3f}; checkpoint {result.checkpoint}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m medattn_fast.train", description="Train a segmentation model",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
