"""Run the benchmark cases and write CSV/JSON under bench/results/, keyed by device and versions.

    python -m bench.run [--op position ...] [--provider torch ...] [--mode fwd+bwd]
                        [--dtype float32] [--shape TEXT] [--quick] [--interleave] [--out bench/results]
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import time
from pathlib import Path

# glibc keeps freed blocks below a dynamic threshold in the heap, which would hide the real peak of
# live tensors from the resident-set measurement; a fixed threshold returns them at once.
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}

ROOT = Path(__file__).resolve().parent.parent


def _ensure_malloc_env(argv):
    if all(os.environ.get(k) == v for k, v in _MALLOC_ENV.items()):
        return
    env = dict(os.environ, **_MALLOC_ENV)
    sys.exit(subprocess.call([sys.executable, "-m", "bench.run", *argv], env=env, cwd=str(ROOT)))


def discover():
    import bench

    mods = {}
    for info in pkgutil.iter_modules(bench.__path__):
        if info.name.startswith("cases_"):
            mods[info.name[len("cases_"):]] = importlib.import_module(f"bench.{info.name}")
    return mods


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="medattn-fast bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--op", action="append", help="case family (file bench/cases_<op>.py); repeatable")
    ap.add_argument("--provider", action="append", help="only these providers; repeatable")
    ap.add_argument("--mode", action="append", help="fwd, fwd+bwd, no-grad; repeatable")
    ap.add_argument("--dtype", action="append", help="float32, bfloat16, float16; repeatable")
    ap.add_argument("--shape", help="only cases whose shape string contains this")
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--interleave", action="store_true",
                    help="time the providers of a case round-robin (robust ratios on a shared machine)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--tag", default="", help="suffix for the result files")
    args = ap.parse_args(argv)
    _ensure_malloc_env(argv)

    import torch

    from bench.harness import environment, format_table, measured_copy_bandwidth, run_case

    device = torch.device(args.device)
    families = discover()
    chosen = args.op or sorted(families)
    unknown = [o for o in chosen if o not in families]
    if unknown:
        ap.error(f"unknown --op {unknown}; known: {sorted(families)}")
    rows = []
    for fam in chosen:
        for case in families[fam].cases(device):
            if device.type not in case.devices:
                continue
            if args.shape and args.shape not in case.shape:
                continue
            for dtype in case.dtypes:
                dname = str(dtype).replace("torch.", "")
                if args.dtype and dname not in args.dtype:
                    continue
                print(f"# {case.op} {case.shape} {dname} on {device}", flush=True)
                rows += run_case(case, device, dtype, args.provider, args.mode, quick=args.quick,
                                 interleave=args.interleave)
    print(format_table(rows))
    env = environment()
    copy_gbps = measured_copy_bandwidth(device)  # measured for a case with bytes_moved
    if copy_gbps is not None:
        env["copy_GBps"] = f"{copy_gbps:.1f}"
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{env['device']}_torch{env['torch']}_triton{env['triton']}").strip("-")
    name = slug + "__" + "-".join(chosen) + (f"__{args.tag}" if args.tag else "")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"environment": env, "command": "python -m bench.run " + " ".join(argv),
               "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": [dataclasses.asdict(r) for r in rows]}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1))
    with open(out / f"{name}.csv", "w", newline="") as f:
        w = csv.writer(f)
        fields = [f.name for f in dataclasses.fields(rows[0])] if rows else []
        w.writerow(fields)
        for r in rows:
            w.writerow([getattr(r, k) for k in fields])
    print(f"wrote {out / name}.json and .csv")
    return 0


def _cuda():
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


if __name__ == "__main__":
    sys.exit(main())
