"""Benchmark harness: the one runner of every benchmark — ``python -m bench.run`` (``make bench``,
``make bench-full``), the pytest-benchmark suite (``bench/test_benchmarks.py``) and the GPU check's
timing stage (``bench/gpu_check.sh`` -> ``python -m bench.run --gpu-check``: :func:`run_gpu_check`).
It times every provider of every case, in every mode, side by side in one run.

A case (``bench/cases_<family>.py``) supplies ``setup(device, dtype) -> (inputs, providers)``:
fresh random inputs and one callable per provider (``reference``, ``torch``, ``compile``, ``auto``,
each fused backend, peers such as ``sdpa``/``flex``). For each provider and mode the harness records

* median time after warm-up: ``triton.testing.do_bench`` on GPU (it flushes the L2 cache between
  calls and frees the inputs' ``.grad``; CUDA events when triton is absent), ``time.perf_counter``
  on CPU;
* peak memory above what was live before the call: ``torch.cuda.max_memory_allocated`` on GPU;
  on CPU the peak resident set (``VmHWM`` after resetting it through ``/proc/self/clear_refs``),
  which tracks live tensors only when glibc returns freed blocks at once — ``bench.run`` sets
  ``MALLOC_MMAP_THRESHOLD_`` for that and re-executes itself if needed;
* max abs error of the output vs the ``reference`` provider's, and TFLOP/s when the case gives FLOPs.

Modes: ``fwd`` (autograd recording), ``fwd+bwd`` (backward of a fixed random cotangent), ``no-grad``.

The GPU check (:func:`run_gpu_check`) times each family's ``gpu_check_cases(device, tiny)`` — the
real networks' shapes — against a wall-clock deadline, appending every row to a CSV
(:data:`GPU_CHECK_FIELDS`) the moment it is measured, after the device's ceilings (copy bandwidth,
matmul TFLOP/s); a case that no longer fits is a ``skipped`` row saying so.

Kernel variants are providers of their own, selected by passing a configuration
(:func:`with_kernel_config`, e.g. ``KernelConfig(position_backward="fused")``), never by setting
environment variables.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import gc
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

MODES = ("fwd", "fwd+bwd", "no-grad")


@dataclass
class Case:
    op: str
    shape: str
    setup: Callable[[torch.device, torch.dtype], Tuple[tuple, Dict[str, Callable]]]
    flops: Optional[float] = None  # forward FLOPs (backward counted as 2x forward)
    dtypes: Sequence[torch.dtype] = (torch.float32,)
    modes: Sequence[str] = MODES
    reference: str = "reference"
    devices: Sequence[str] = ("cpu", "cuda")
    note: str = ""
    # compulsory bytes of one forward in a dtype (each input read once, each output written once):
    # fwd/no-grad rows then report GB/s and its fraction of the device's measured copy bandwidth
    bytes_moved: Optional[Callable[[torch.dtype], float]] = None
    fwd_bwd_flops: float = 3.0      # FLOPs of fwd+bwd as a multiple of ``flops`` (backward ~2x forward)
    # the GPU check (run_gpu_check): wall seconds the case needs (it is skipped when fewer are left
    # before the deadline), the providers (name prefixes) ``--warm`` compiles ahead, and whether the
    # CPU dry run times it (False: built only, too slow on a CPU)
    estimate_s: float = 5.0
    warm: Sequence[str] = ()
    timed_in_dry_run: bool = True


@dataclass
class Row:
    op: str
    shape: str
    device: str
    dtype: str
    mode: str
    provider: str
    median_ms: Optional[float] = None
    peak_mib: Optional[float] = None
    max_err: Optional[float] = None
    tflops: Optional[float] = None
    status: str = "ok"
    extra: Dict[str, object] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------------

def _proc_status(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_cpu_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager measuring peak memory (bytes) above the level at entry."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak: Optional[int] = None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.ok = _reset_cpu_peak()
            self.base = _proc_status("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        elif self.ok and self.base is not None:
            hwm = _proc_status("VmHWM")
            self.peak = None if hwm is None else max(0, hwm - self.base)
        return False


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _run_once(fn: Callable, inputs: tuple, mode: str, cotangent: Optional[torch.Tensor]):
    if mode == "no-grad":
        with torch.no_grad():
            return fn(*inputs)
    out = fn(*inputs)
    if mode == "fwd+bwd" and out.requires_grad:
        out.backward(cotangent)
        for t in inputs:
            if isinstance(t, torch.Tensor):
                t.grad = None
    return out


SLOW_MS = 50.0


def _event_ms(fn: Callable, inputs: tuple, mode: str, cotangent) -> float:
    """Milliseconds of one call between two CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    _run_once(fn, inputs, mode, cotangent)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def _gpu_median_ms(fn: Callable, inputs: tuple, mode: str, cotangent, warmup_ms: float, rep_ms: float) -> float:
    """Median ms of one call on CUDA: ``triton.testing.do_bench`` (L2 flushed before each call,
    input grads set to None), or CUDA events around each call when triton cannot be imported or
    one call takes over ``SLOW_MS`` (do_bench would spend seconds estimating it: 3 calls, or 1
    over a second)."""
    grads = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    _run_once(fn, inputs, mode, cotangent)   # compiles, before the call that sizes the measurement
    torch.cuda.synchronize()
    first = _event_ms(fn, inputs, mode, cotangent)
    if first >= SLOW_MS:
        samples = [first] + [_event_ms(fn, inputs, mode, cotangent) for _ in range(2 if first < 1000 else 0)]
        return statistics.median(samples)
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return float(do_bench(lambda: _run_once(fn, inputs, mode, cotangent), warmup=max(1, int(warmup_ms)),
                              rep=max(1, int(rep_ms)), grad_to_none=grads or None, return_mode="median"))
    times: List[float] = [first]
    budget_start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - budget_start < rep_ms * 1e-3 and len(times) < 200):
        times.append(_event_ms(fn, inputs, mode, cotangent))
    return statistics.median(times)


def time_fn(fn: Callable, inputs: tuple, mode: str, device: torch.device, cotangent=None,
            warmup: int = 2, min_time_s: float = 0.5, max_reps: int = 50, min_reps: int = 3) -> float:
    """Median milliseconds of ``fn`` in ``mode`` after ``warmup`` calls, at least ``min_reps``
    timed calls (on CUDA: :func:`_gpu_median_ms` over ``min_time_s``)."""
    if device.type == "cuda":
        return _gpu_median_ms(fn, inputs, mode, cotangent, warmup_ms=25 * max(1, warmup), rep_ms=1e3 * min_time_s)
    for _ in range(warmup):
        _run_once(fn, inputs, mode, cotangent)
    times: List[float] = []
    budget_start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - budget_start < min_time_s and len(times) < max_reps):
        t0 = time.perf_counter()
        _run_once(fn, inputs, mode, cotangent)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@dataclass
class Measurement:
    median_ms: float
    peak_mib: Optional[float]
    output: torch.Tensor
    calls: int


def measure_within_budget(providers: Dict[str, Callable], inputs: tuple, mode: str, device: torch.device,
                          budget_s: float, min_rounds: int = 1, max_rounds: int = 15,
                          min_batch_s: float = 0.02) -> Dict[str, Measurement]:
    """Time, peak memory and output of each provider in about ``budget_s`` seconds, the providers
    interleaved round-robin (drifting load on a shared machine hits them alike).

    Per provider: a warm-up call (its output is the one compared), a call under
    :class:`PeakMemory` that also sizes the batch of calls lasting ``min_batch_s``, then rounds —
    each times one batch of every provider — as many as the budget left allows, between
    ``min_rounds`` and ``max_rounds``. The median is over the timed call and the rounds'
    per-call times, so a network step of seconds needs three calls, an op of milliseconds gets
    fifteen rounds of many calls."""
    start = time.perf_counter()
    names = list(providers)
    outputs, cots, first, peaks, samples = {}, {}, {}, {}, {}
    for name in names:
        fn = providers[name]
        if mode == "no-grad":
            with torch.no_grad():
                out = fn(*inputs)
        else:
            out = fn(*inputs)
        cots[name] = torch.randn_like(out) if mode == "fwd+bwd" else None
        if cots[name] is not None and out.requires_grad:
            out.backward(cots[name])
        outputs[name] = out.detach()
        for t in inputs:
            if isinstance(t, torch.Tensor):
                t.grad = None
        _zero_module_grads(providers)
        _sync(device)
        with PeakMemory(device) as pm:
            t0 = time.perf_counter()
            _run_once(fn, inputs, mode, cots[name])
            _sync(device)
            first[name] = time.perf_counter() - t0
        _zero_module_grads(providers)
        peaks[name] = None if pm.peak is None else pm.peak / 2**20
        samples[name] = [first[name] * 1e3]
    reps = {n: max(1, int(min_batch_s / max(first[n], 1e-6))) for n in names}
    per_round = sum(first[n] * reps[n] for n in names)
    left = budget_s - (time.perf_counter() - start)
    rounds = int(min(max_rounds, max(min_rounds, left // max(per_round, 1e-6))))
    for _ in range(rounds):
        for name in names:
            fn = providers[name]
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(reps[name]):
                _run_once(fn, inputs, mode, cots[name])
            _sync(device)
            samples[name].append((time.perf_counter() - t0) * 1e3 / reps[name])
        _zero_module_grads(providers)
    return {n: Measurement(statistics.median(samples[n]), peaks[n], outputs[n], 1 + reps[n] * rounds)
            for n in names}


def within(fn: Callable, context: Callable) -> Callable:
    """Provider calling ``fn`` (a module or a function) inside ``with context():``. Keeps the module
    visible as ``__self__`` so the harness frees its ``.grad`` between modes."""
    def run(*args):
        with context():
            return fn(*args)

    owner = fn if isinstance(fn, torch.nn.Module) else getattr(fn, "__self__", None)
    if isinstance(owner, torch.nn.Module):
        run.__self__ = owner
    return run


def with_backend(fn: Callable, backend: str) -> Callable:
    """Provider calling ``fn`` under ``medattn_fast.use_backend(backend)`` (see :func:`within`)."""
    import medattn_fast

    return within(fn, lambda: medattn_fast.use_backend(backend))


def auto_provider(fn: Callable) -> Callable:
    """Provider calling ``fn`` on ``auto`` (whatever backend or environment is in force; see
    :func:`within`), whose row says what ``auto`` ran: ``picks`` holds each op's pick during the
    provider's last call (``medattn_fast.backend.recording_auto_picks``) and ``row_note()`` says it,
    e.g. ``auto ran position_attention: triton``."""
    import medattn_fast
    from medattn_fast import backend as B

    picks: Dict[str, str] = {}

    @contextlib.contextmanager
    def on_auto():
        with B.recording_auto_picks() as recorded, medattn_fast.use_backend("auto"):
            yield
        picks.clear()
        picks.update(recorded)

    run = within(fn, on_auto)
    run.picks = picks
    run.row_note = lambda: "auto ran " + (", ".join(f"{op}: {b}" for op, b in sorted(picks.items()))
                                          or "no medattn op")
    return run


def with_kernel_config(fn: Callable, config) -> Callable:
    """Provider calling ``fn`` with the kernel variants of ``config`` (a
    :class:`medattn_fast.KernelConfig`, under ``medattn_fast.use_kernel_config``): how a benchmark
    times a variant, side by side with the default, without touching the environment."""
    import medattn_fast

    if not isinstance(config, medattn_fast.KernelConfig):
        raise TypeError(f"with_kernel_config: config must be a medattn_fast.KernelConfig, got {type(config).__name__}")
    return within(fn, lambda: medattn_fast.use_kernel_config(config))


def owned_by(fn: Callable, module: torch.nn.Module) -> Callable:
    """``fn`` marked as using ``module``'s parameters, so that the harness frees their ``.grad``
    between calls (a lambda around a module call hides the module otherwise)."""
    def run(*args):
        return fn(*args)

    run.__self__ = module
    return run


def fast_twin(original: torch.nn.Module) -> torch.nn.Module:
    """The package's drop-in for an original block or network: a deep copy after
    :func:`medattn_fast.convert` (same parameters, the attention blocks swapped); raises if
    ``convert`` swapped nothing (a "fast" provider that is the original would compare it with itself)."""
    from medattn_fast.convert import convert

    holder = torch.nn.Sequential(copy.deepcopy(original))   # convert swaps children: give the block a parent
    report = convert(holder)
    if not report.swapped:
        raise RuntimeError(f"convert() swapped nothing in {type(original).__name__}: {report.skipped}")
    return holder[0]


def token_block_check_case(device: torch.device, op: str, shape: str, make_original: Callable[[], torch.nn.Module],
                           batch: int, tokens: int, channels: int, forward_flops: float, tiny: bool) -> Case:
    """A GPU-check case of an MT-UNet token block ((B, N, C) -> (B, N, C); window and external
    attention): its drop-in (:func:`fast_twin`) on ``triton`` vs the original, bf16 and fp32."""
    def setup(device: torch.device, dtype: torch.dtype):
        original = make_original().to(device=device, dtype=dtype)
        fast = fast_twin(original)
        x = torch.randn(batch, tokens, channels, device=device, dtype=dtype, requires_grad=True)
        return (x,), {"triton": with_backend(fast, "triton"), "auto": auto_provider(fast), "original": original.forward}

    return Case(op=op, shape=shape, setup=setup, flops=forward_flops, dtypes=(torch.bfloat16, torch.float32),
                modes=("no-grad", "fwd+bwd"), estimate_s=2 if tiny else 8, warm=("triton",),
                note="flops: projections + attention products (fwd); 3x for fwd+bwd")


def _zero_module_grads(providers: Dict[str, Callable]) -> None:
    """Parameters captured by module providers accumulate .grad across reps; free them."""
    for fn in providers.values():
        mod = getattr(fn, "__self__", None)
        if isinstance(mod, torch.nn.Module):
            mod.zero_grad(set_to_none=True)


def run_case(case: Case, device: torch.device, dtype: torch.dtype, providers_filter=None,
             modes_filter=None, quick: bool = False, interleave: bool = False) -> List[Row]:
    """Rows for every provider x mode of ``case``. ``interleave``: time the providers round-robin
    (:func:`time_interleaved`) instead of one after the other."""
    from medattn_fast import BackendUnavailable

    rows: List[Row] = []
    inputs, providers = case.setup(device, dtype)
    dname = str(dtype).replace("torch.", "")
    # the reference output (forward) for the error column
    ref_out = None
    if case.reference in providers:
        try:
            with torch.no_grad():
                ref_out = providers[case.reference](*inputs).double()
        except Exception as exc:  # pragma: no cover - reported as a row below
            ref_out = None
            print(f"  reference failed: {exc}")
    modes = [m for m in case.modes if not modes_filter or m in modes_filter]
    timed = []
    for pname, fn in providers.items():
        if providers_filter and pname not in providers_filter:
            continue
        err = None
        try:
            with torch.no_grad():
                out = fn(*inputs)
            if ref_out is not None:
                err = (out.double() - ref_out).abs().max().item()
            cot = torch.randn_like(out)
        except BackendUnavailable as exc:
            for mode in modes:
                rows.append(Row(case.op, case.shape, device.type, dname, mode, pname, status=f"unavailable: {exc}"))
            continue
        except Exception as exc:
            for mode in modes:
                rows.append(Row(case.op, case.shape, device.type, dname, mode, pname,
                                status=f"error: {type(exc).__name__}: {str(exc)[:200]}"))
            continue
        for mode in modes:
            row = Row(case.op, case.shape, device.type, dname, mode, pname, max_err=err)
            try:
                if not interleave:
                    row.median_ms = time_fn(fn, inputs, mode, device, cot,
                                            warmup=1 if quick else 2, min_time_s=0.2 if quick else 1.0)
                with PeakMemory(device) as pm:
                    _run_once(fn, inputs, mode, cot)
                _zero_module_grads(providers)
                row.peak_mib = None if pm.peak is None else pm.peak / 2**20
                timed.append((row, fn, cot))
            except BackendUnavailable as exc:  # a provider that runs some modes only (no backward here)
                row.status = f"unavailable: {exc}"
            except Exception as exc:
                row.status = f"error: {type(exc).__name__}: {str(exc)[:200]}"
            rows.append(row)
    if interleave:
        for mode in modes:
            entries = [(row, fn, cot) for row, fn, cot in timed if row.mode == mode]
            times = time_interleaved([(fn, cot) for _, fn, cot in entries], inputs, mode, device,
                                     rounds=7 if quick else 15)
            for (row, _, _), ms in zip(entries, times):
                row.median_ms = ms
    for row in rows:
        if row.median_ms and case.flops:
            mult = {"fwd": 1.0, "no-grad": 1.0, "fwd+bwd": case.fwd_bwd_flops}[row.mode]
            row.tflops = case.flops * mult / (row.median_ms * 1e-3) / 1e12
        if row.median_ms and case.bytes_moved and row.mode in ("fwd", "no-grad"):
            gbps = case.bytes_moved(dtype) / (row.median_ms * 1e-3) / 1e9
            row.extra["GB/s"] = gbps
            row.extra["of_copy"] = gbps / copy_bandwidth(device)
    return rows


_COPY_GBPS: Dict[str, float] = {}


def copy_bandwidth(device: torch.device) -> float:
    """The device's measured copy bandwidth in GB/s (bytes read + bytes written) of a tensor far
    larger than the caches (1 GiB on CUDA, 256 MiB on CPU), median after warm-up; once per run."""
    key = str(device)
    if key not in _COPY_GBPS:
        numel = (2**28 if device.type == "cuda" else 2**26)
        src = torch.randn(numel, device=device)
        dst = torch.empty_like(src)
        ms = time_fn(lambda a: dst.copy_(a), (src,), "no-grad", device, min_time_s=0.3)
        _COPY_GBPS[key] = 2 * numel * src.element_size() / (ms * 1e-3) / 1e9
    return _COPY_GBPS[key]


def measured_copy_bandwidth(device: torch.device) -> Optional[float]:
    """The copy bandwidth :func:`copy_bandwidth` measured in this run, or None (no case needed it)."""
    return _COPY_GBPS.get(str(device))


def time_interleaved(entries, inputs: tuple, mode: str, device: torch.device, rounds: int = 15,
                     min_batch_s: float = 0.02) -> List[float]:
    """Median ms per call of each ``(fn, cotangent)``, timed round-robin: every round times every
    provider once (a batch of calls lasting >= ``min_batch_s``), so drifting machine load hits all
    providers alike and their ratios stay meaningful on a shared machine."""
    reps = []
    for fn, cot in entries:  # warm-up, and the batch size that lasts min_batch_s
        _run_once(fn, inputs, mode, cot)
        _sync(device)
        t0 = time.perf_counter()
        _run_once(fn, inputs, mode, cot)
        _sync(device)
        reps.append(max(1, int(min_batch_s / max(time.perf_counter() - t0, 1e-6))))
    samples: List[List[float]] = [[] for _ in entries]
    for _ in range(rounds):
        for i, (fn, cot) in enumerate(entries):
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(reps[i]):
                _run_once(fn, inputs, mode, cot)
            _sync(device)
            samples[i].append((time.perf_counter() - t0) * 1e3 / reps[i])
    return [statistics.median(x) for x in samples]


def environment() -> Dict[str, str]:
    import platform

    env = {"torch": torch.__version__, "python": platform.python_version(),
           "machine": platform.machine(), "cpus": str(os.cpu_count()),
           "threads": str(torch.get_num_threads())}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = "none"
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
        env["cuda"] = str(torch.version.cuda)
    else:
        env["device"] = "cpu:" + (platform.processor() or platform.machine())
    return env


def speedups(rows: List[Row], baseline: str = "reference") -> Dict[Tuple, float]:
    """(op, shape, device, dtype, mode, provider) -> baseline_time / provider_time."""
    base = {(r.op, r.shape, r.device, r.dtype, r.mode): r.median_ms for r in rows
            if r.provider == baseline and r.median_ms}
    out = {}
    for r in rows:
        b = base.get((r.op, r.shape, r.device, r.dtype, r.mode))
        if b and r.median_ms:
            out[(r.op, r.shape, r.device, r.dtype, r.mode, r.provider)] = b / r.median_ms
    return out


def _bandwidth(row: Row) -> str:
    if "GB/s" not in row.extra:
        return ""
    return f"{row.extra['GB/s']:.0f} GB/s = {row.extra['of_copy']:.0%} of copy"


def format_table(rows: List[Row]) -> str:
    sp = speedups(rows)
    header = f"{'op':<20}{'shape':<34}{'dtype':<9}{'mode':<9}{'provider':<11}{'ms':>10}{'x ref':>8}{'peak MiB':>10}{'max err':>10}{'TFLOP/s':>9}  status"
    lines = [header, "-" * len(header)]
    for r in rows:
        key = (r.op, r.shape, r.device, r.dtype, r.mode, r.provider)
        lines.append(
            f"{r.op:<20}{r.shape:<34}{r.dtype:<9}{r.mode:<9}{r.provider:<11}"
            f"{(f'{r.median_ms:.3f}' if r.median_ms is not None else '-'):>10}"
            f"{(f'{sp[key]:.1f}' if key in sp else '-'):>8}"
            f"{(f'{r.peak_mib:.1f}' if r.peak_mib is not None else '-'):>10}"
            f"{(f'{r.max_err:.1e}' if r.max_err is not None and math.isfinite(r.max_err) else ('-' if r.max_err is None else 'nan')):>10}"
            f"{(f'{r.tflops:.3f}' if r.tflops is not None else '-'):>9}  {r.status if r.status != 'ok' else _bandwidth(r)}"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# the GPU check: rows against a deadline, appended to a CSV one by one
# ------------------------------------------------------------------------------------------------

GPU_CHECK_FIELDS = ["section", "case", "provider", "dtype", "mode", "ms", "tflops", "gbps", "pct_ceiling",
                    "peak_mib", "status", "note"]


class CsvRows:
    """Appends :data:`GPU_CHECK_FIELDS` rows to a CSV, flushed and fsynced one by one (a kill loses
    nothing already measured), and echoes them to stdout. ``path=None``: echo only."""

    def __init__(self, path: Optional[str]):
        self.rows: List[Dict[str, object]] = []
        self._file = self._writer = None
        if path:
            new = not os.path.exists(path) or os.path.getsize(path) == 0
            self._file = open(path, "a", newline="")
            self._writer = csv.DictWriter(self._file, fieldnames=GPU_CHECK_FIELDS)
            if new:
                self._writer.writeheader()
                self._file.flush()

    def row(self, **values) -> None:
        row = {k: values.get(k, "") for k in GPU_CHECK_FIELDS}
        for k in ("ms", "tflops", "gbps", "pct_ceiling", "peak_mib"):
            if isinstance(row[k], float):
                row[k] = f"{row[k]:.4g}" if math.isfinite(row[k]) else ""
        self.rows.append(row)
        if self._writer is not None:
            self._writer.writerow(row)
            self._file.flush()
            os.fsync(self._file.fileno())
        print(" | ".join(str(row[k]) for k in GPU_CHECK_FIELDS if row[k] != ""), flush=True)


@dataclass
class Ceilings:
    """The device's measured ceilings: copy GB/s (bytes read + written) and matmul TFLOP/s per
    ``"bfloat16"``, ``"float32"`` (no TF32) and ``"tf32"``."""

    copy_gbps: float = float("nan")
    matmul_tflops: Dict[str, float] = field(default_factory=dict)

    def matmul_for(self, dtype: torch.dtype) -> float:
        if dtype in (torch.bfloat16, torch.float16):
            return self.matmul_tflops.get("bfloat16", float("nan"))
        return self.matmul_tflops.get("tf32", float("nan"))


def measure_ceilings(device: torch.device, rows: CsvRows, tiny: bool) -> Ceilings:
    """A 1 GiB device-to-device copy and 8192³ matmuls in bf16, fp32 (``highest``: no TF32) and
    TF32 (``tiny``: toy sizes, for the CPU dry run), each written as a ``ceiling`` row."""
    ceilings = Ceilings()
    timing = dict(warmup=1, min_time_s=0.0 if tiny else 0.1, min_reps=1 if tiny else 3)
    n_copy = 2 ** 12 if tiny else 2 ** 28                 # 1 GiB of float32, far over L2
    src = torch.randn(n_copy, device=device)
    dst = torch.empty_like(src)
    ms = time_fn(lambda a: dst.copy_(a), (src,), "no-grad", device, **timing)
    ceilings.copy_gbps = 2 * src.numel() * 4 / (ms * 1e-3) / 1e9
    rows.row(section="ceiling", case=f"copy {n_copy * 4 / 2**20:.0f} MiB", provider="torch", dtype="float32",
             mode="copy", ms=ms, gbps=ceilings.copy_gbps, status="ok", note="bytes read + written")
    del src, dst
    m = 64 if tiny else 8192
    for name, dtype, tf32 in (("bfloat16", torch.bfloat16, False), ("float32", torch.float32, False),
                              ("tf32", torch.float32, True)):
        a = torch.randn(m, m, device=device, dtype=dtype)
        b = torch.randn(m, m, device=device, dtype=dtype)
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            ms = time_fn(lambda a, b: a @ b, (a, b), "no-grad", device, **timing)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
        ceilings.matmul_tflops[name] = 2 * m ** 3 / (ms * 1e-3) / 1e12
        rows.row(section="ceiling", case=f"matmul {m}^3", provider="torch", dtype=name, mode="mm", ms=ms,
                 tflops=ceilings.matmul_tflops[name], status="ok")
        del a, b
    return ceilings


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_gpu_check_case(case: Case, device: torch.device, rows: CsvRows, ceilings: Ceilings, deadline: float,
                       tiny: bool = False, warm: bool = False) -> None:
    """Time every provider of ``case`` in each dtype and mode, one CSV row each, while the
    ``deadline`` (epoch seconds) allows. ``tiny`` (the CPU dry run): one dtype (position: both),
    the last mode, one timed call. ``warm``: only call the providers named in ``case.warm`` once
    per mode (fills Triton's cache), no rows."""
    dtypes, modes = case.dtypes, case.modes
    if tiny:   # the dry run exercises every path once
        dtypes = dtypes if case.op == "position" else dtypes[-1:]
        modes = modes[-1:]
    for dtype in dtypes:
        dname = str(dtype).replace("torch.", "")
        left = deadline - time.time()
        if left < case.estimate_s:
            if not warm:
                rows.row(section=case.op, case=case.shape, dtype=dname, status="skipped",
                         note=f"did not fit: {left:.0f} s left, needs ~{case.estimate_s:.0f} s")
            continue
        try:
            torch.manual_seed(0)
            inputs, providers = case.setup(device, dtype)
        except Exception as exc:  # noqa: BLE001 - a row per failure, the run goes on
            if not warm:
                rows.row(section=case.op, case=case.shape, dtype=dname, status="error", note=_describe(exc))
            continue
        if tiny and not case.timed_in_dry_run:
            if not warm:
                rows.row(section=case.op, case=case.shape, dtype=dname, status="skipped",
                         note="dry run: built, not timed (too slow on the CPU)")
            continue
        for name, fn in providers.items():
            if warm and not any(name.startswith(prefix) for prefix in case.warm):
                continue
            cotangent = None
            for mode in modes:
                if deadline - time.time() < 1.0 and not warm:
                    rows.row(section=case.op, case=case.shape, provider=name, dtype=dname, mode=mode,
                             status="skipped", note="did not fit: deadline reached")
                    continue
                try:
                    if cotangent is None:   # the first (compiling) call, which also shapes the cotangent
                        with torch.no_grad():
                            cotangent = torch.randn_like(fn(*inputs))
                    if warm:
                        _run_once(fn, inputs, mode, cotangent)
                        _zero_module_grads(providers)
                        _sync(device)
                        continue
                    ms = time_fn(fn, inputs, mode, device, cotangent, warmup=0 if tiny else 1,
                                 min_time_s=0.0 if tiny else 0.1, min_reps=1 if tiny else 3)
                    peak = None
                    if device.type == "cuda":
                        with PeakMemory(device) as pm:
                            _run_once(fn, inputs, mode, cotangent)
                        peak = pm.peak / 2 ** 20
                    _zero_module_grads(providers)
                except Exception as exc:  # noqa: BLE001 - OOM, unavailable backend, compile error
                    if not warm:
                        rows.row(section=case.op, case=case.shape, provider=name, dtype=dname, mode=mode,
                                 status="error", note=_describe(exc))
                    _zero_module_grads(providers)
                    _free(device)
                    continue
                flops = None
                if case.flops:
                    flops = case.flops * (case.fwd_bwd_flops if mode == "fwd+bwd" else 1.0)
                tflops = flops / (ms * 1e-3) / 1e12 if flops else None
                moved = case.bytes_moved(dtype) if (case.bytes_moved and mode != "fwd+bwd") else None
                gbps = moved / (ms * 1e-3) / 1e9 if moved else None
                pct = None
                if gbps is not None:
                    pct = 100 * gbps / ceilings.copy_gbps
                elif tflops is not None:
                    pct = 100 * tflops / ceilings.matmul_for(dtype)
                note = case.note
                if hasattr(fn, "row_note"):   # e.g. which backend auto ran (auto_provider)
                    note = "; ".join(part for part in (fn.row_note(), note) if part)
                rows.row(section=case.op, case=case.shape, provider=name, dtype=dname, mode=mode, ms=ms,
                         tflops="" if tflops is None else tflops, gbps="" if gbps is None else gbps,
                         pct_ceiling=pct if pct is not None and math.isfinite(pct) else "",
                         peak_mib="" if peak is None else peak, status="ok", note=note)
        del inputs, providers
        _free(device)


def run_gpu_check(cases: Sequence[Case], device: torch.device, csv_path: Optional[str], deadline: float,
                  tiny: bool = False, warm: bool = False) -> List[Dict[str, object]]:
    """The GPU check's timing stage: the ceilings, then every case in order (priority first)
    against ``deadline``; the rows written to ``csv_path`` one by one (``warm``: the fused
    providers called once each, nothing written). Returns the rows."""
    rows = CsvRows(None if warm else csv_path)
    ceilings = Ceilings() if warm else measure_ceilings(device, rows, tiny)
    for case in cases:
        if warm and not case.warm:
            continue
        run_gpu_check_case(case, device, rows, ceilings, deadline, tiny=tiny, warm=warm)
    return rows.rows
