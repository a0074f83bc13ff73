"""``medattn-fast`` command line: info | verify | bench | build | tune | train | nnunet."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def _info(args) -> int:
    from .backend import info

    data = info(build=args.build)
    width = max(len(k) for k in data)
    for key, value in data.items():
        if key in ("backends", "ops"):
            continue
        print(f"{key:<{width}}  {value}")
    print("backends:")
    for name, status in data["backends"].items():
        print(f"  {name:<10} {status}")
    print("ops (family, backends, auto order on CPU / CUDA, export backend, limits):")
    for name, row in data["ops"].items():
        print(f"  {name:<28} {row['family']}: {', '.join(row['backends'])}; auto CPU {' > '.join(row['auto on CPU'])}, "
              f"CUDA {' > '.join(row['auto on CUDA'])}; export {row['export']}")
        print(f"  {'':<28} auto: {row['auto']}")
        for what in ("per-call order", "autotune key", "autotune variants"):
            if row[what]:
                print(f"  {'':<28} {what}: {row[what]}")
        for limit in row["limits"]:
            print(f"  {'':<28} limit {limit}")
    _print_autotune_cache()
    from .nn.attention_gate import UNFUSED_NORMS

    print("not fused:")
    for norm, reason in UNFUSED_NORMS.items():
        print(f"  AttentionGate(norm={norm!r})  {reason}")
    return 0


def _print_autotune_cache() -> None:
    """The autotune's cache files (``MEDATTN_CACHE_DIR``): each entry's pick and timings."""
    from . import autotune

    state = "on" if autotune.enabled() else "off (MEDATTN_AUTOTUNE=0: static order)"
    print(f"autotune: {state}; cache {autotune.cache_dir()}")
    paths = sorted(autotune.cache_dir().glob("autotune-*.json"))
    if not paths:
        print("  (no cache file yet: `medattn-fast tune` or the first calls of a model fill it)")
    current = autotune.versions()
    for path in paths:
        entries = autotune._read(path)
        print(f"  {path} ({len(entries)} entries)")
        for key, entry in sorted(entries.items()):
            times = ", ".join(f"{k} {v:.3f} ms" for k, v in sorted(entry.get("times_ms", {}).items(),
                                                                   key=lambda kv: kv[1]))
            stale = "" if entry.get("versions") == current else "  [other versions: re-measured on next use]"
            print(f"    {key}\n      -> {entry.get('label', entry.get('pick'))}  ({times}){stale}")


def _parse_shape(text: str):
    parts = [p for p in text.replace("x", ",").replace("×", ",").split(",") if p.strip()]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) not in (4, 5) or min(shape) < 1:
        raise SystemExit(f"medattn-fast tune: --shape must be B,C,H,W or B,C,D,H,W (positive integers, "
                         f"',' or 'x' between them), got {text!r}")
    return shape


def _tune(args) -> int:
    """Builds ``--model``, runs it on random input of ``--shape`` (forward; with ``--train`` forward
    and backward in training mode) with the autotune on, and prints each op's pick."""
    import torch

    from . import autotune
    from .backend import use_backend
    from .train import build_model

    shape = _parse_shape(args.shape)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    model = build_model(args.model, spatial_dims=len(shape) - 2, in_channels=shape[1],
                        num_classes=args.num_classes).to(device=device, dtype=dtype)
    model.train(args.train)
    x = torch.randn(shape, device=device, dtype=dtype)
    previous = autotune._enabled_override
    autotune.set_enabled(True)
    try:
        with use_backend("auto"), autotune.record() as picks, torch.set_grad_enabled(args.train):
            out = model(x)
            if args.train:
                outs = [t for t in autotune.all_tensors(out) if t.requires_grad]
                torch.autograd.backward([t.float().sum() for t in outs])
    finally:
        autotune.set_enabled(previous)
    print(f"{args.model} {'train' if args.train else 'eval'} {tuple(shape)} {dtype} on {device}: "
          f"{len(picks)} tuned call(s)")
    for dev, key, choice, measured in picks:
        entry = autotune.cache_entries(dev).get(key, {})
        times = ", ".join(f"{k} {v:.3f} ms" for k, v in sorted(entry.get("times_ms", {}).items(), key=lambda kv: kv[1]))
        print(f"  {key}\n    -> {choice.label} ({'measured' if measured else 'cached'}: {times})")
    if picks:
        print(f"cache: {autotune.cache_path(picks[0][0])}")
    return 0


def _verify(args) -> int:
    from .verify import format_results, run_verify

    results = run_verify(device=args.device, backends=args.backend, dtypes=args.dtype)
    print(format_results(results))
    failed = [r for r in results if r.status == "FAIL"]
    if not any(r.status == "ok" for r in results):
        print("verify: no fused path could run on this device", file=sys.stderr)
        return 1
    return 1 if failed else 0


def _bench(rest) -> int:
    """``python -m bench.run`` of the source checkout this package was installed from (editable
    install or ``PYTHONPATH``): the benchmark cases are not part of the installed package."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "bench" / "run.py").is_file():
        print("medattn-fast bench needs a source checkout (the benchmark cases in bench/ are not installed "
              "with the package): clone the repository and run `make bench` there", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)
    return subprocess.call([sys.executable, "-m", "bench.run", *rest], env=env)


def _build(args) -> int:
    from . import _build

    print(f"build dir: {_build.build_dir()}")
    status = 0
    for (kind, family), reason in _build.build_all().items():
        label = f"{kind}/{family}"
        if reason is None:
            print(f"  {label:<28} built")
        elif family == "*":
            print(f"  {label:<28} skipped: {reason}")
        else:
            print(f"  {label:<28} FAILED: {reason}")
            status = 1
    return status


def _train(args) -> int:
    from .train import run

    return run(args)


def _nnunet(args) -> int:
    from .integrations.nnunet.cli import run

    return run(args)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="medattn-fast", description="Fused attention kernels for medical image segmentation")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("info", help="versions, device, backends and why they are unavailable")
    p.add_argument("--build", action="store_true", help="build the csrc extensions to report their status")
    p = sub.add_parser("verify", help="every available fused path vs the reference on fresh random inputs")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--backend", action="append", help="only this backend (repeatable)")
    p.add_argument("--dtype", action="append", help="float64, float32, bfloat16, float16 (repeatable)")
    sub.add_parser("bench", help="the headline benchmark in minutes; --all: every case (options: `medattn-fast bench --help`; needs a source checkout)", add_help=False)
    sub.add_parser("build", help="build the csrc extensions ahead of time")
    p = sub.add_parser("tune", help="fill the autotune cache for a model and input shape (auto's measured picks)")
    from .train import MODELS

    p.add_argument("--model", required=True, choices=sorted(MODELS), help="the network (as in `medattn-fast train`)")
    p.add_argument("--shape", required=True, help="input shape B,C,H,W or B,C,D,H,W (e.g. 2,1,128,128)")
    p.add_argument("--train", action="store_true", help="training step: training mode, forward and backward")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "float64"))
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--num-classes", type=int, default=2, help="output classes of the network (default 2)")
    from .train import add_arguments as add_train_arguments  # the flags live beside the loop they configure

    add_train_arguments(sub.add_parser("train", help="train a segmentation model (see python -m medattn_fast.train -h)"))
    from .integrations.nnunet.cli import add_arguments as add_nnunet_arguments

    add_nnunet_arguments(sub.add_parser("nnunet", help="nnU-Net v2: add-config | trainer-path | warm-start "
                                                       "(needs medattn-fast[nnunet])"))
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        rest = argv[1:]
        if rest and rest[0] == "--":
            rest = rest[1:]
        return _bench(rest)
    args = ap.parse_args(argv)
    return {"info": _info, "verify": _verify, "build": _build, "train": _train, "nnunet": _nnunet,
            "tune": _tune}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
