r"""End-to-end check: the fast networks train exactly like their reference twins.

For every full network of :mod:`medattn_fast.models` a *reference twin* (the faithful
attention blocks, N×N / C×C matrices materialised, the originals' loops) and the *fast* network
start from the same weights and are trained, side by side, on the same phantom batches
(:class:`medattn_fast.data.PhantomDataset`) for ``steps`` steps in float32. Per step ``t``::

    L_ref(t)  = loss(reference(x_t), y_t);  reference ← reference − SGD step of ∇L_ref(t)
    L_fast(t) = loss(fast(x_t), y_t);       fast      ← fast − SGD step of ∇L_fast(t)

and the report is both curves and ``max_t |L_fast(t) − L_ref(t)| / |L_ref(t)|``. The two
computations are mathematically equal, so the curves may differ only by float32 rounding (the
fused kernels sum in another order), amplified by the training dynamics. How much a network's
training amplifies rounding is measured alongside: a third curve trains the reference from weights
perturbed by one float32 rounding (``noise_rel_diff``, see :func:`compare`). The loss is the
package's training objective (:func:`medattn_fast.train.training_loss`: CE + soft Dice, MSGANet's
deep-supervised objective + Dice). The optimiser is SGD with momentum: an adaptive optimiser
(Adam) divides each gradient by its own running magnitude, which turns the rounding noise of an
exactly-zero gradient (MT-UNet's GaussianTrans ``bias`` cancels in its softmaxes) into full-size,
sign-random updates, and the comparison would measure that noise instead of the networks.

The twins, built as the model benchmarks build them (``bench/cases_models.py``;
MT-UNet as ``bench/cases_networks.py``'s ``mtunet_model`` rows):

* ``DAUNet``, ``CrossAttentionUNet``, ``MSGANet``: :func:`medattn_fast.testing.twins.reference_twin` of the fast
  network (a copy with its attention modules swapped for the faithful ones, same weights);
  attention gammas set to 0.5 so that PAM/CAM contribute from the first step (0 at init makes them
  the identity).
* ``MTUNet``: the reference is ``medattn_fast.reference.mtunet.MTUNet`` (the original's modules;
  fixed widths, 79M parameters), the fast one ``models.MTUNet.from_original_state_dict`` of its
  state_dict with 3 input channels (with 1 channel the clean model sums the original's repeated
  kernel, and SGD would then move the sum 3× slower than the original moves its copies). Off 224²,
  the original's 784-token position embedding is replaced by one for the input's token grid.
  At ``--size tiny`` (the tests) the original's fixed widths are too slow for a CPU test, and the
  MT-UNet twin is a narrow clean ``models.MTUNet`` copied, the reference copy on the reference
  backend (as for AttentionUNet; the clean model's equality with the original is tested in fp64 by
  ``tests/test_mtunet_model.py``).
* ``AttentionUNet``: one network, copied; the reference copy runs under
  ``use_backend("reference")`` (the seed math of the gates), the fast copy on the default backend.

Sizes: ``--size small`` (the default off CUDA) trains tiny widths at 32²–64² so that all five
networks take a few minutes on a CPU; ``--size real`` (the default on CUDA) the networks' working
sizes. Results go to ``bench/results/loss_curves[-float64]_<device>.json`` and ``.csv``, named like
``bench.run``'s files (the device, torch and triton versions are inside)::

    python -m bench.loss_curves [--steps 20] [--size small|real] [--model DAUNet ...] [--device cpu]
                                [--dtype float64]
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("DAUNet", "CrossAttentionUNet", "MSGANet", "MTUNet", "AttentionUNet")


@dataclass
class Twin:
    """A reference network and a fast one holding the same weights, and the data they train on."""

    name: str
    reference: nn.Module
    fast: nn.Module
    batch: int
    in_channels: int
    num_classes: int
    spatial_size: Tuple[int, ...]
    config: str  # human-readable: widths, size


class UnderBackend(nn.Module):
    """``module`` with every fused op of its forward forced to ``backend``
    (``medattn_fast.use_backend``); the wrapped module's parameters stay its own."""

    def __init__(self, module: nn.Module, backend: str):
        super().__init__()
        self.module, self.backend = module, backend

    def forward(self, *args):
        import medattn_fast

        with medattn_fast.use_backend(self.backend):
            return self.module(*args)

    @property
    def losses(self):  # training_loss looks the model's own objective up on the raw model
        return getattr(self.module, "losses", None)


def _gammas(model: nn.Module, value: float = 0.5) -> nn.Module:
    """Set the attention gammas (0 at init: PAM/CAM would start as the identity) to ``value``."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(value)
    return model


def _mtunet_twin(side: int, classes: int, device, embedding_std: float = 0.02):
    from medattn_fast.models import MTUNet
    from medattn_fast.reference.mtunet import MTUNet as ReferenceMTUNet

    reference = ReferenceMTUNet(classes)
    tokens = (side // 8) ** 2
    if tokens != reference.stem.position_embedding.shape[1]:  # the original only has 224²'s 784 tokens
        reference.stem.position_embedding = nn.Parameter(torch.zeros(1, tokens, reference.stem.position_embedding.shape[2]))
    with torch.no_grad():  # zeros in the original: give it content, as the benchmarks do
        reference.stem.position_embedding.normal_(0.0, embedding_std)
    reference = reference.to(device)
    fast = MTUNet.from_original_state_dict(reference.state_dict(), in_channels=3)
    return reference, fast


def twins(device: torch.device, size: str = "small", names: Sequence[str] = MODELS, seed: int = 0) -> Iterator[Twin]:
    """The twins of ``names`` (built one at a time, seeded) at ``size`` ``"tiny"`` (the tests),
    ``"small"`` (CPU runs) or ``"real"`` (the networks' working sizes; CUDA)."""
    from medattn_fast.testing.twins import reference_twin
    from medattn_fast.models import AttentionUNet, CrossAttentionUNet, DAUNet, MSGANet, MTUNet

    if size not in ("tiny", "small", "real"):
        raise ValueError(f"loss_curves: size must be 'tiny', 'small' or 'real', got {size!r}")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise ValueError(f"loss_curves: unknown models {unknown}; known: {list(MODELS)}")
    # (batch, side, widths or base) per size: tiny and small keep a CPU run short; real = cases_models.py's CUDA rows
    spec = {
        "tiny": dict(batch=2, side=32, widths=(8, 32, 32), msga=(8, (8, 8, 16, 16)), mtunet_side=32),
        "small": dict(batch=2, side=64, widths=(16, 32, 64, 128), msga=(16, (16, 16, 32, 32)), mtunet_side=64),
        "real": dict(batch=8, side=128, widths=(32, 64, 128, 256), msga=(64, (64, 128, 256, 512)), mtunet_side=224),
    }[size]
    batch, side, widths = spec["batch"], spec["side"], spec["widths"]
    strides = (2,) * (len(widths) - 1)
    classes = 3
    for name in names:
        torch.manual_seed(seed)
        if name == "DAUNet":
            fast = _gammas(DAUNet(2, 1, classes, channels=widths, strides=strides,
                                  attention_at=("bottleneck", "skip-1"))).to(device)
            yield Twin(name, reference_twin(fast)[0], fast, batch, 1, classes, (side, side),
                       f"channels={widths} PAM+CAM at bottleneck+skip-1")
        elif name == "CrossAttentionUNet":
            fast = CrossAttentionUNet(2, 1, classes, channels=widths, strides=strides, heads=4).to(device)
            yield Twin(name, reference_twin(fast)[0], fast, batch, 1, classes, (side, side), f"channels={widths}")
        elif name == "MSGANet":
            base, backbone = spec["msga"]
            fast = _gammas(MSGANet(1, classes, base, backbone_widths=backbone)).to(device)
            yield Twin(name, reference_twin(fast)[0], fast, batch, 1, classes, (side, side),
                       f"base={base} backbone={backbone}")
        elif name == "MTUNet" and size == "tiny":
            # the original's widths are fixed (79M parameters, tens of seconds a step on a CPU): the
            # tests train a narrow clean MTUNet against itself on the reference backend instead
            fast = MTUNet(3, classes, base_channels=8, num_heads=4, embedding_grid=(side // 8, side // 8)).to(device)
            with torch.no_grad():
                fast.position_embedding.normal_(0.0, 0.02)
            yield Twin(name, UnderBackend(copy.deepcopy(fast), "reference"), fast, batch, 3, classes, (side, side),
                       "base_channels=8; reference = the same network under backend 'reference'")
        elif name == "MTUNet":
            mside = spec["mtunet_side"]
            reference, fast = _mtunet_twin(mside, classes, device)
            yield Twin(name, reference, fast, batch, 3, classes, (mside, mside),
                       "the original's widths (79M parameters); reference = reference.mtunet.MTUNet")
        elif name == "AttentionUNet":
            fast = AttentionUNet(2, 1, classes, channels=widths, strides=strides).to(device)
            yield Twin(name, UnderBackend(copy.deepcopy(fast), "reference"), fast, batch, 1, classes,
                       (side, side), f"channels={widths}; reference = the same network under backend 'reference'")


def phantom_batches(twin: Twin, steps: int, device: torch.device, seed: int = 0,
                    dtype: torch.dtype = torch.float32) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` batches ``(image (B, C, *S) dtype, label (B, *S) int64)`` of seeded phantoms."""
    from medattn_fast.data import PhantomDataset

    data = PhantomDataset(steps * twin.batch, twin.spatial_size, num_classes=twin.num_classes,
                          in_channels=twin.in_channels, seed=seed)
    out = []
    for t in range(steps):
        items = [data[t * twin.batch + i] for i in range(twin.batch)]
        image = torch.stack([torch.as_tensor(im) for im, _ in items]).to(device=device, dtype=dtype)
        label = torch.stack([torch.as_tensor(lb) for _, lb in items]).to(device)
        out.append((image, label))
    return out


def train_curve(model: nn.Module, batches, *, lr: float, momentum: float, seed: int = 0) -> List[float]:
    """Train ``model`` (train mode) one SGD step per batch; the loss before each step."""
    from medattn_fast.train import DiceCELoss, training_loss

    criterion = DiceCELoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    model.train()
    losses = []
    for step, (image, label) in enumerate(batches):
        torch.manual_seed(seed + step)  # the same random stream for both twins (dropout, if any)
        optimizer.zero_grad(set_to_none=True)
        loss, _ = training_loss(model, model(image), label, criterion)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def perturbed_copy(model: nn.Module, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A copy of ``model`` with every floating parameter multiplied by ``1 + ε·u``, ``u ~ U(−1, 1)``
    elementwise, ε the machine epsilon of ``dtype``: the size of one rounding of the weights."""
    twin = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    eps = torch.finfo(dtype).eps
    with torch.no_grad():
        for p in twin.parameters():
            if p.is_floating_point():
                u = torch.rand(p.shape, generator=gen, dtype=torch.float64) * 2 - 1
                p.mul_((1 + eps * u).to(device=p.device, dtype=p.dtype))
    return twin


def compare(twin: Twin, steps: int, device: torch.device, *, lr: float = 0.01, momentum: float = 0.9,
            seed: int = 0, noise_floor: bool = True, dtype: torch.dtype = torch.float32) -> Dict[str, object]:
    """Both loss curves of ``twin`` over ``steps`` steps and their largest relative difference.

    ``noise_floor``: also train a copy of the reference whose weights differ by one float32 rounding
    (:func:`perturbed_copy`); its largest relative difference from the reference, ``noise_rel_diff``,
    is how far float32 rounding alone moves this network's curve in ``steps`` steps. Networks whose
    training amplifies rounding quickly (MSGANet's channel attention: softmax of energies ``X Xᵀ`` in
    the thousands, where a relative rounding of 1e-7 moves a logit by 1e-4) diverge from their twin
    as much as from their own perturbed copy; the two numbers side by side tell such noise from a bug.

    ``dtype=torch.float64`` trains both twins (and the perturbed copy, perturbed by one float64
    rounding) in double precision: there a difference of the order of float32 rounding would be a
    difference in the math, not in the summation order.
    """
    if dtype != torch.float32:
        twin.reference.to(dtype)
        twin.fast.to(dtype)
    batches = phantom_batches(twin, steps, device, seed, dtype)
    perturbed = perturbed_copy(twin.reference, seed, dtype) if noise_floor else None
    t0 = time.perf_counter()
    reference = train_curve(twin.reference, batches, lr=lr, momentum=momentum, seed=seed)
    t1 = time.perf_counter()
    fast = train_curve(twin.fast, batches, lr=lr, momentum=momentum, seed=seed)
    t2 = time.perf_counter()
    rel = [abs(f - r) / abs(r) for f, r in zip(fast, reference)]
    noise = None
    if perturbed is not None:
        noisy = train_curve(perturbed, batches, lr=lr, momentum=momentum, seed=seed)
        noise = {"perturbed_reference_loss": noisy,
                 "noise_rel_diff": max(abs(p - r) / abs(r) for p, r in zip(noisy, reference))}
    return {
        "model": twin.name, "config": twin.config, "batch": twin.batch,
        "input": [twin.in_channels, *twin.spatial_size], "classes": twin.num_classes,
        "steps": steps, "optimizer": f"SGD lr={lr} momentum={momentum}", "dtype": str(dtype).replace("torch.", ""),
        "reference_loss": reference, "fast_loss": fast,
        "max_rel_diff": max(rel), "max_rel_diff_step": rel.index(max(rel)),
        "reference_s": t1 - t0, "fast_s": t2 - t1, **(noise or {}),
    }


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.loss_curves", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", choices=("tiny", "small", "real"), default=None,
                    help="network sizes (default: real on CUDA, small on CPU)")
    ap.add_argument("--model", action="append", choices=MODELS, help="only these networks; repeatable")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                    help="float64: the exact-math check (results file gets a __float64 suffix)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)

    from bench.harness import environment

    device = torch.device(args.device)
    size = args.size or ("real" if device.type == "cuda" else "small")
    records = []
    for twin in twins(device, size, args.model or MODELS):
        record = compare(twin, args.steps, device, lr=args.lr, dtype=getattr(torch, args.dtype))
        records.append(record)
        print(f"{twin.name:<20} loss {record['reference_loss'][0]:.4f} -> {record['reference_loss'][-1]:.4f} "
              f"(reference) / {record['fast_loss'][-1]:.4f} (fast); max rel diff {record['max_rel_diff']:.2e} "
              f"at step {record['max_rel_diff_step']} ({args.dtype} noise floor {record['noise_rel_diff']:.2e}); "
              f"{record['reference_s']:.1f} s vs {record['fast_s']:.1f} s",
              flush=True)
        del twin
    env = environment()
    from bench.run import device_slug

    name = "loss_curves" + ("" if args.dtype == "float32" else f"-{args.dtype}") + f"_{device_slug(env)}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.loss_curves " + " ".join(sys.argv[1:] if argv is None else argv)
    payload = {"environment": env, "command": command.strip(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
               "size": size, "records": records}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1))
    with open(out / f"{name}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "step", "reference_loss", "fast_loss", "rel_diff", "perturbed_reference_loss", "noise_rel_diff"])
        for r in records:
            for t, (a, b, c) in enumerate(zip(r["reference_loss"], r["fast_loss"], r["perturbed_reference_loss"])):
                w.writerow([r["model"], t, repr(a), repr(b), repr(abs(b - a) / abs(a)), repr(c), repr(abs(c - a) / abs(a))])
    print(f"wrote {out / name}.json and .csv")
    worst = max((r["max_rel_diff"] for r in records), default=0.0)
    return 0 if math.isfinite(worst) else 1


if __name__ == "__main__":
    sys.exit(main())
