r"""The environment, kernel-resource and summary steps of ``bench/gpu_check.sh``.

* ``env``: torch / CUDA / triton versions and the GPU's name, multiprocessors, memory and L2.
* ``kernels CACHE_DIR --out CSV``: registers, spilled bytes and shared memory of every kernel Triton
  compiled into ``CACHE_DIR`` during the call (the tests' and the timings' specialisations). The
  registers and spills come from loading each cubin through Triton's driver (``load_binary`` returns
  ``n_regs`` and ``n_spills``, the figures Triton's own ``CompiledKernel`` reports); the local-memory
  bytes from ``cuobjdump -res-usage`` where that tool is found; shared memory from the kernel's
  metadata. Written row by row.
* ``summary OUT``: ``OUT/summary.txt`` from the files the call left under ``OUT``: the environment,
  tests passed / failed / skipped per op and dtype, the skips grouped by reason, the files pytest
  could not collect, the op families whose tests ran and those not reached before the time limit,
  every timing ratio, the kernels that spill, and what did not run or did not fit.
"""
from __future__ import annotations

import csv
import glob
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

KERNEL_FIELDS = ["kernel", "hash", "num_warps", "num_stages", "n_regs", "n_spills", "local_bytes", "shared_bytes",
                 "source"]


def env() -> int:
    import torch
    import triton

    print(f"python {sys.version.split()[0]}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        l2 = getattr(p, "L2_cache_size", 0) / 2 ** 20
        print(f"device {p.name}: sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
              f"{p.total_memory / 2 ** 30:.1f} GiB, L2 {l2:.0f} MiB")
    else:
        print("device: no CUDA device (dry run: the Triton kernels run under the interpreter)")
    return 0


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
def _cuobjdump() -> Optional[str]:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton

        wheel = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        return wheel if os.path.exists(wheel) else None
    except ImportError:
        return None


def _local_bytes(tool: Optional[str], cubin_path: str) -> Optional[int]:
    if tool is None:
        return None
    report = subprocess.run([tool, "-res-usage", cubin_path], capture_output=True, text=True).stdout
    values = re.findall(r"(?:STACK|LOCAL):(\d+)", report)
    return sum(int(v) for v in values) if values else None


def _driver_usage(name: str, cubin: bytes, shared: int) -> Tuple[Optional[int], Optional[int]]:
    """(n_regs, n_spills) from Triton's driver; (None, None) without a GPU."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None, None
        from triton.runtime import driver

        loaded = driver.active.utils.load_binary(name, cubin, shared, torch.cuda.current_device())
        return int(loaded[2]), int(loaded[3])
    except Exception:  # noqa: BLE001 - a driver API change must not lose the rest of the list
        return None, None


def kernels(cache_dir: str, out_csv: str) -> int:
    tool = _cuobjdump()
    with open(out_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=KERNEL_FIELDS)
        writer.writeheader()
        count = 0
        for cubin_path in sorted(glob.glob(os.path.join(cache_dir, "*", "*.cubin"))):
            meta_path = cubin_path[: -len(".cubin")] + ".json"
            try:
                with open(meta_path) as m:
                    meta = json.load(m)
            except (OSError, ValueError):
                meta = {}
            name = meta.get("name", os.path.basename(cubin_path)[: -len(".cubin")])
            shared = int(meta.get("shared", 0) or 0)
            with open(cubin_path, "rb") as c:
                cubin = c.read()
            n_regs, n_spills = _driver_usage(name, cubin, shared)
            writer.writerow(dict(kernel=name, hash=os.path.basename(os.path.dirname(cubin_path))[:12],
                                 num_warps=meta.get("num_warps", ""), num_stages=meta.get("num_stages", ""),
                                 n_regs="" if n_regs is None else n_regs,
                                 n_spills="" if n_spills is None else n_spills,
                                 local_bytes=_nz(_local_bytes(tool, cubin_path)), shared_bytes=shared,
                                 source="driver" if n_regs is not None else ("cuobjdump" if tool else "metadata")))
            f.flush()
            count += 1
    print(f"kernels: {count} compiled kernels in {cache_dir}" + ("" if tool else " (no cuobjdump found)"))
    return 0


def _nz(value: Optional[int]) -> object:
    return "" if value is None else value


# ---------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------
_RESULT = re.compile(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_TEST_ID = re.compile(r"(tests/[\w/]+\.py::[^\s]+)")
_DTYPE = re.compile(r"(bfloat16|float16|float32|float64|dtype[0-9])")
_DTYPE_INDEX = {"dtype0": "float32", "dtype1": "bfloat16", "dtype2": "float16"}   # the gpu tests' order


def test_results(log_path: str) -> Dict[str, str]:
    """{test id: outcome} from a ``pytest -v`` log (plain or xdist lines); the last outcome wins."""
    results: Dict[str, str] = {}
    if not os.path.exists(log_path):
        return results
    with open(log_path, errors="replace") as f:
        for line in f:
            outcome, test = _RESULT.search(line), _TEST_ID.search(line)
            if outcome and test:
                results[test.group(1)] = outcome.group(1)
    return results


# a skip in pytest's short summary (-rs): "SKIPPED [3] tests/conftest.py:89: reason"
_SKIP_SUMMARY = re.compile(r"^SKIPPED \[(\d+)\] \S+?:\d+: (.*?)\s*$")
# a skip in a plain -v line (xdist lines carry no reason): "tests/x.py::t SKIPPED (reason)   [ 10%]"
_SKIP_VERBOSE = re.compile(r"^(tests/\S+::\S+) SKIPPED \((.*)\)\s+\[\s*\d+%\]\s*$")
# a file pytest could not collect: the short summary's "ERROR tests/x.py - ..." or the
# "____ ERROR collecting tests/x.py ____" header (a test's own error carries "::")
_COLLECTION_ERROR = re.compile(r"^(?:ERROR (tests/[^\s:]+\.py)(?: - .*)?"
                               r"|_+ ERROR collecting (tests/[^\s:]+\.py) _+)\s*$")


def skip_reasons(log_path: str) -> Counter:
    """{reason: number of tests skipped with it}: from pytest's short summary where the log has
    one, else (a run stopped by the time limit) from the ``-v`` lines."""
    from_summary: Counter = Counter()
    from_lines: Counter = Counter()
    if os.path.exists(log_path):
        with open(log_path, errors="replace") as f:
            for line in f:
                found = _SKIP_SUMMARY.match(line)
                if found:
                    from_summary[found.group(2)] += int(found.group(1))
                    continue
                found = _SKIP_VERBOSE.match(line.rstrip("\n"))
                if found:
                    from_lines[found.group(2)] += 1
    return from_summary or from_lines


def collection_errors(log_path: str) -> List[str]:
    """The test files that pytest could not collect (import or syntax errors)."""
    files = []
    if os.path.exists(log_path):
        with open(log_path, errors="replace") as f:
            for line in f:
                found = _COLLECTION_ERROR.match(line)
                if found and (found.group(1) or found.group(2)) not in files:
                    files.append(found.group(1) or found.group(2))
    return files


def op_families() -> List[str]:
    """The op families (``medattn_fast/ops/<family>.py``, read from the tree, nothing imported)."""
    ops = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "medattn_fast", "ops")
    return sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ops, "[!_]*.py")))


def test_family(test_id: str, families: Sequence[str]) -> str:
    """The op family a ``-m gpu`` test checks: the family named in its file's name, else in its id
    (``test_fp32_precision.py::...[channel]``); a file on the gate (``test_attention_gate_cuda.py``)
    is ``attention_gate``; anything else, its module's name."""
    module = test_id.split("::")[0].rsplit("/", 1)[-1][:-3]
    for text in (module, test_id):
        named = [f for f in families if f in text]
        if named:
            return max(named, key=len)
    return "attention_gate" if "gate" in module and "attention_gate" in families else module


def families_reached(results: Dict[str, str], families: Sequence[str]) -> Dict[str, Counter]:
    """{family: Counter of its tests' outcomes} for every family, an empty Counter where no test
    of it ended (not reached or not selected)."""
    reached: Dict[str, Counter] = {f: Counter() for f in families}
    for test_id, outcome in results.items():
        reached.setdefault(test_family(test_id, families), Counter())[outcome] += 1
    return reached


def _op_and_dtype(test_id: str) -> Tuple[str, str]:
    module = test_id.split("::")[0].rsplit("/", 1)[-1][:-3]
    op = re.sub(r"^test_|_(triton|fused)$", "", module)   # test_<family>_<backend>.py -> <family>
    params = test_id.split("[", 1)[1] if "[" in test_id else ""
    if re.search(r"(^|[-_])cuda([-_\]]|$)", params):
        op += " (cuda)"
    found = _DTYPE.search(params)
    dtype = _DTYPE_INDEX.get(found.group(1), found.group(1)) if found else "-"
    return op, dtype


def _per_op(results: Dict[str, str]) -> List[str]:
    table: Dict[Tuple[str, str], Counter] = defaultdict(Counter)
    for test_id, outcome in results.items():
        table[_op_and_dtype(test_id)][outcome] += 1
    return [f"  {op:<28} {dtype:<9} " + ", ".join(f"{n} {o.lower()}" for o, n in sorted(c.items()))
            for (op, dtype), c in sorted(table.items())]


def _finished(log_path: str) -> bool:
    """Whether pytest printed its final line (else it was stopped by the time limit)."""
    if not os.path.exists(log_path):
        return False
    with open(log_path, errors="replace") as f:
        tail = f.read()[-4000:]
    return bool(re.search(r"=+ .*\b(passed|failed|error|no tests ran|deselected)\b.* in [\d.]+s", tail))


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


BASELINES = ("original", "original loop", "sdpa", "flex", "torch vectorised")


def is_baseline(provider: str) -> bool:
    """The originals and the peers (SDPA and FlexAttention, head-split ones included)."""
    return provider in BASELINES or provider.startswith(("sdpa ", "flex "))


def ratios(rows: Sequence[Dict[str, str]]) -> List[str]:
    """One line per (case, dtype, mode): each provider's time, its speed-up over each baseline and
    over the fastest of them (the speed targets compare with the best of the original and the peers)."""
    groups: Dict[Tuple[str, str, str], Dict[str, float]] = {}
    for r in rows:
        if r.get("status") == "ok" and r.get("section") != "ceiling" and r.get("ms"):
            key = (r["case"].replace(" flex", ""), r["dtype"], r["mode"])
            groups.setdefault(key, {})[r["provider"]] = float(r["ms"])
    lines = []
    for (case, dtype, mode), times in groups.items():
        ours = {p: t for p, t in times.items() if not is_baseline(p)}
        base = {p: t for p, t in times.items() if is_baseline(p)}
        parts = [f"{p} {t:.3g} ms" for p, t in times.items()]
        best = min(base, key=base.get) if base else None
        for p, t in ours.items():
            for b, tb in base.items():
                parts.append(f"{p} {tb / t:.2f}x vs {b}")
            if len(base) > 1:
                parts.append(f"{p} {base[best] / t:.2f}x vs the best baseline ({best})")
        lines.append(f"{case} {dtype} {mode}: " + "; ".join(parts))
    return lines



def summary(out_dir: str, notes: Sequence[str] = ()) -> int:
    lines: List[str] = ["# gpu_check summary", ""]
    lines += ["## environment", _read(os.path.join(out_dir, "env.txt")).strip(), ""]
    not_run: List[str] = list(notes)
    lines.append("## tests (-m gpu)")
    totals = Counter()
    families = op_families()
    for log, label in (("tests.log", "Triton tests"), ("cuda_tests.log", "cuda-backend tests")):
        path = os.path.join(out_dir, log)
        results = test_results(path)
        counts = Counter(results.values())
        uncollected = collection_errors(path)
        totals.update(counts)
        totals["collection errors"] += len(uncollected)
        state = "complete" if _finished(path) else ("not run" if not os.path.exists(path) else "STOPPED (time limit)")
        lines.append(f"{label}: {counts.get('PASSED', 0)} passed, {counts.get('FAILED', 0)} failed, "
                     f"{counts.get('ERROR', 0)} errors, {counts.get('SKIPPED', 0)} skipped, "
                     f"{len(uncollected)} collection errors ({state})")
        lines += _per_op(results)
        if state != "complete":
            not_run.append(f"{label}: {state}")
        for test_id, outcome in sorted(results.items()):
            if outcome in ("FAILED", "ERROR"):
                lines.append(f"  {outcome} {test_id}")
        lines += [f"  COLLECTION ERROR {f}" for f in uncollected]
        for reason, n in sorted(skip_reasons(path).items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  skipped {n}: {reason}")
        if state == "not run":
            continue
        reached = families_reached(results, families)
        ran = [f for f, c in reached.items() if c and set(c) - {"SKIPPED"}]
        only_skipped = [f for f, c in reached.items() if c and not set(c) - {"SKIPPED"}]
        missing = [f for f, c in reached.items() if not c]
        lines.append(f"  families reached: " + (", ".join(
            f"{f} ({', '.join(f'{n} {o.lower()}' for o, n in sorted(reached[f].items()))})"
            for f in ran + only_skipped) or "none"))
        lines.append(f"  families whose every test ended skipped: {', '.join(only_skipped) or 'none'}")
        why = "stopped by the time limit before any of their tests ended" if state != "complete" else \
            "none of their tests in the selection"
        lines.append(f"  families not reached: {', '.join(missing) or 'none'}" + (f" ({why})" if missing else ""))
        if missing and state != "complete":
            not_run.append(f"{label}: families not reached before the time limit: {', '.join(missing)}")
    failed = totals.get("FAILED", 0) + totals.get("ERROR", 0)
    lines.append(f"tests passed: {totals.get('PASSED', 0)}; failed: {failed}; skipped: {totals.get('SKIPPED', 0)}; "
                 f"collection errors: {totals.get('collection errors', 0)}")
    lines.append("")

    lines.append("## timings (median ms; Nx = speed-up of the first over the second)")
    rows: List[Dict[str, str]] = []
    headline = os.path.join(out_dir, "headline.csv")
    if os.path.exists(headline):
        with open(headline, newline="") as f:
            rows = list(csv.DictReader(f))
    for r in rows:
        if r.get("section") == "ceiling":
            figure = f"{r['gbps']} GB/s" if r.get("gbps") else f"{r['tflops']} TFLOP/s"
            lines.append(f"ceiling {r['case']} {r['dtype']}: {figure}")
    for r in rows:
        if r.get("section") != "ceiling" and r.get("status") == "ok" and (r.get("pct_ceiling") or r.get("peak_mib")):
            rate = f"{r['tflops']} TFLOP/s" if r.get("tflops") else (f"{r['gbps']} GB/s" if r.get("gbps") else "")
            lines.append(f"  {r['case']} {r['provider']} {r['dtype']} {r['mode']}: {r['ms']} ms {rate} "
                         f"({r.get('pct_ceiling') or '-'}% of ceiling), peak {r.get('peak_mib') or '-'} MiB")
    lines += ratios(rows)
    for r in rows:
        if r.get("status") in ("skipped", "error"):
            not_run.append(f"timing {r['case']} {r.get('provider', '')} {r['dtype']} {r.get('mode', '')}: "
                           f"{r['status']}: {r.get('note', '')}")
    lines.append(f"timing rows: {sum(r.get('status') == 'ok' for r in rows)} ok of {len(rows)}")
    lines.append("")

    lines.append("## compiled kernels (registers, spills, shared memory)")
    kernels_csv = os.path.join(out_dir, "kernels.csv")
    kernel_rows: List[Dict[str, str]] = []
    if os.path.exists(kernels_csv):
        with open(kernels_csv, newline="") as f:
            kernel_rows = list(csv.DictReader(f))
    spilling = [k for k in kernel_rows if (k.get("n_spills") not in ("", "0", None)) or
                (k.get("local_bytes") not in ("", "0", None))]
    lines.append(f"{len(kernel_rows)} compiled kernels, {len(spilling)} with spills or local memory")
    for k in spilling:
        lines.append(f"  spill {k['kernel']} warps={k['num_warps']} regs={k['n_regs']} spills={k['n_spills']} "
                     f"local={k['local_bytes']} shared={k['shared_bytes']}")
    if kernel_rows:
        most = max(kernel_rows, key=lambda k: int(k.get("shared_bytes") or 0))
        lines.append(f"  most shared memory: {most['kernel']} {most['shared_bytes']} B")
    lines.append("")
    lines.append("## did not run or did not fit")
    lines += [f"- {n}" for n in not_run] or ["- nothing"]
    with open(os.path.join(out_dir, "summary.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["env"]:
        return env()
    if argv[:1] == ["kernels"] and len(argv) == 4 and argv[2] == "--out":
        return kernels(argv[1], argv[3])
    if argv[:1] == ["summary"] and len(argv) >= 2:
        return summary(argv[1], argv[2:])
    print("usage: python -m bench.gpu_report env | kernels CACHE_DIR --out CSV | summary OUT [NOTE ...]",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
