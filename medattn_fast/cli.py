"""``medattn-fast`` command line: info | verify | bench | build | train | nnunet."""
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
        if row["per-call order"]:
            print(f"  {'':<28} per-call order: {row['per-call order']}")
        for limit in row["limits"]:
            print(f"  {'':<28} limit {limit}")
    from .nn.attention_gate import UNFUSED_NORMS

    print("not fused:")
    for norm, reason in UNFUSED_NORMS.items():
        print(f"  AttentionGate(norm={norm!r})  {reason}")
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
    return {"info": _info, "verify": _verify, "build": _build, "train": _train, "nnunet": _nnunet}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
