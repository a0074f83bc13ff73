"""Run the benchmarks and write CSV/JSON under bench/results/ (and figures under bench/figures/).

    python -m bench.run                 the headline set (bench/headline.py): whole networks and one
                                        row per op, original vs fast, ~3 min on a 2-core CPU, a summary
    python -m bench.run --all           every case, provider, mode and dtype of bench/cases_*.py
    python -m bench.run [--op position ...] [--provider torch ...] [--mode fwd+bwd]
                        [--dtype float32] [--shape TEXT] [--quick] [--interleave] [--out bench/results]
                                        those cases only (a filter implies --all's case set); --op
                                        names a case file (bench/cases_<op>.py) or a case's op
                                        column (e.g. mtunet_model, attention_unet_model)
    python -m bench.run --gpu-check --csv rows.csv [--deadline EPOCH] [--tiny] [--warm]
                                        the GPU check's timing stage (bench/gpu_check.sh): each
                                        family's gpu_check_cases in priority order against the
                                        deadline (default now + 300 s), one flushed CSV row each;
                                        --tiny: toy shapes (the CPU dry run); --warm: call the fused
                                        providers once (fills Triton's cache), no rows

Files: ``<what>_<device>.{json,csv}``, ``<what>`` = ``--tag`` if given, else ``headline``, ``all`` or
the ops chosen; ``<device>`` = ``cpu`` or the GPU's model (``h100``). Each JSON records the device, the
versions, the command and the date.
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
    if "--gpu-check" in argv:   # no resident-set reading there; and a re-executed child would outlive `timeout`
        return
    if all(os.environ.get(k) == v for k, v in _MALLOC_ENV.items()):
        return
    env = dict(os.environ, **_MALLOC_ENV)
    # the checkout first on the path, the caller's directory kept (relative --out stays theirs)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    sys.exit(subprocess.call([sys.executable, "-m", "bench.run", *argv], env=env))


def discover():
    """``{family: module}`` of every ``bench/cases_<family>.py``."""
    import bench

    mods = {}
    for info in pkgutil.iter_modules(bench.__path__):
        if info.name.startswith("cases_"):
            mods[info.name[len("cases_"):]] = importlib.import_module(f"bench.{info.name}")
    return mods


def select_cases(device, ops=None, shape=None):
    """The cases of ``device`` (its type in ``case.devices``) whose file family or ``op`` column is
    in ``ops`` (None: every case), and whose shape contains ``shape``; raises ValueError naming an
    op that matches nothing. The case list of ``bench.run`` and of ``bench/test_benchmarks.py``."""
    families = discover()
    chosen = []
    matched = set()
    for family in sorted(families):
        for case in families[family].cases(device):
            if device.type not in case.devices or (shape and shape not in case.shape):
                continue
            hit = [o for o in (ops or ()) if o in (family, case.op)]
            matched.update(hit)
            if ops is None or hit:
                chosen.append(case)
    unknown = [o for o in (ops or ()) if o not in matched and o not in families]
    if unknown:
        ops_known = sorted({c.op for f in families.values() for c in f.cases(device)})
        raise ValueError(f"--op: unknown {unknown}; case files: {sorted(families)}; op columns: {ops_known}")
    return chosen


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    _ensure_malloc_env(argv)
    ap = argparse.ArgumentParser(prog="medattn-fast bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--all", action="store_true", help="every case (the full run), not the headline set")
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
    ap.add_argument("--figures", default=str(ROOT / "bench" / "figures"), help="where the headline figure goes")
    ap.add_argument("--tag", default="", help="suffix for the result files")
    gpu = ap.add_argument_group("the GPU check's timing stage (bench/gpu_check.sh)")
    gpu.add_argument("--gpu-check", action="store_true", help="time the GPU check's rows (bench.headline.gpu_check_cases)")
    gpu.add_argument("--csv", help="CSV the rows are appended to, flushed row by row")
    gpu.add_argument("--deadline", type=float, default=None, help="epoch seconds; default: now + 300")
    gpu.add_argument("--tiny", action="store_true", help="toy shapes (the CPU dry run)")
    gpu.add_argument("--warm", action="store_true", help="only call the fused providers once, no rows")
    args = ap.parse_args(argv)

    import torch

    device = torch.device(args.device)
    if args.gpu_check:
        return _gpu_check(args, device)
    if any((args.csv, args.deadline, args.tiny, args.warm)):
        ap.error("--csv, --deadline, --tiny and --warm belong to --gpu-check")
    full = args.all or any((args.op, args.provider, args.mode, args.dtype, args.shape))
    if not full:
        return _headline(args, argv, device)
    from bench.harness import environment, format_table, measured_copy_bandwidth, run_case

    try:
        cases = select_cases(device, args.op, args.shape)
    except ValueError as exc:
        ap.error(str(exc))
    rows = []
    for case in cases:
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
    what = args.tag or ("all" if not args.op else "-".join(args.op))
    write_results(Path(args.out), what, env, rows, argv)
    return 0


def device_slug(env) -> str:
    """``cpu``, or the GPU's model in lower case (``h100``, ``a100``; ``cuda`` if none is found)."""
    if not env.get("cuda"):
        return "cpu"
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Za-z]*)\b", env.get("device", ""))
    return m.group(1).lower() if m else "cuda"


def write_results(out: Path, what: str, env, rows, argv) -> Path:
    """``out/<what>_<device>.json`` and ``.csv``; returns the path without suffix."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{re.sub(r'[^A-Za-z0-9_]+', '-', what).strip('-')}_{device_slug(env)}"
    payload = {"environment": env, "command": " ".join(["python -m bench.run", *argv]).strip(),
               "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": [dataclasses.asdict(r) for r in rows]}
    Path(f"{stem}.json").write_text(json.dumps(payload, indent=1))
    with open(f"{stem}.csv", "w", newline="") as f:
        w = csv.writer(f)
        fields = [f.name for f in dataclasses.fields(rows[0])] if rows else []
        w.writerow(fields)
        for r in rows:
            w.writerow([getattr(r, k) for k in fields])
    print(f"wrote {stem}.json and .csv")
    return stem


def _headline(args, argv, device) -> int:
    from bench import headline
    from bench.harness import environment

    env = environment()
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "triton", "cuda", "python") if env.get(k))
    print(f"medattn-fast bench: the headline set on {env['device']} ({env['threads']} threads; {versions}); "
          f"`make bench-full` runs every case", flush=True)
    from medattn_fast import _build

    unbuilt = [f for f in _build.families("cpu")
               if not (_build.build_dir() / _build.module_name("cpu", f) / f"{_build.module_name('cpu', f)}.so").is_file()]
    if device.type == "cpu" and unbuilt:
        print(f"the C++ CPU kernels ({', '.join(unbuilt)}) build on first use: minutes, once per torch version "
              f"(`make build` does it ahead of time)", flush=True)
    cases = headline.headline_cases(device)
    progress = headline.Progress([c.budget_s for c in cases])
    rows = headline.run(device, cases, progress=progress, budget_scale=0.3 if args.quick else 1.0)
    elapsed = progress.finish()
    print(f"\nTraining step (forward + backward), float32, original vs fast with the same weights; "
          f"speedup = original time / fast time, memory = fast peak / original peak ({device.type}"
          f"{' resident set' if device.type == 'cpu' else ''}), max err = max |fast - original| of the output.")
    for line in headline.summary_lines(rows):
        print(line)
    load = ""
    if hasattr(os, "getloadavg"):
        load = f", load average {os.getloadavg()[0]:.1f} on {env['cpus']} CPUs"
    print(f"{env['device']}, {versions}; {headline.format_duration(elapsed)} in all{load}")
    missing = headline.unavailable_backends()
    if missing:
        print("not run on this device: " + "; ".join(f"{k} ({v})" for k, v in missing.items()))
    env["wall_s"] = f"{elapsed:.0f}"
    stem = write_results(Path(args.out), args.tag or "headline", env, rows, argv)
    try:
        from bench.plot import headline_figure
    except ImportError as exc:  # matplotlib is the optional `bench` extra
        print(f"no figure: {exc} (pip install 'medattn-fast[bench]')")
    else:
        figure = headline_figure(Path(str(stem) + ".json"), Path(args.figures))
        print(f"wrote {figure}")
    return 0 if all(r.status == "ok" for r in rows) else 1


def _gpu_check(args, device) -> int:
    from bench.harness import run_gpu_check
    from bench.headline import gpu_check_cases

    deadline = args.deadline if args.deadline is not None else time.time() + 300
    run_gpu_check(gpu_check_cases(device, args.tiny), device, args.csv, deadline, tiny=args.tiny, warm=args.warm)
    if args.warm:
        print(f"warm: done, {deadline - time.time():.0f} s before the deadline", flush=True)
    return 0


def _cuda():
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


if __name__ == "__main__":
    sys.exit(main())
