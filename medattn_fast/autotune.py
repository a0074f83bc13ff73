r"""``auto`` by measurement: the autotune behind :meth:`medattn_fast.backend.Op.choose`.

On the first call of an op for a **key**, ``auto`` times every candidate that can run the call and
keeps the fastest, in memory and in an on-disk cache, and uses it for every later call with that
key — like ``torch.backends.cudnn.benchmark``.

Key (one string, :func:`call_key`): the op's name; the device (``torch.cuda.get_device_name`` or
``"cpu"``); grad or not (grad mode on and any input requires grad: the measurement then times the
backward too); the family's own part (the gate: ``train`` when any BatchNorm normalises with batch
statistics, else ``eval``); and the call's signature: every tensor's dtype and **shape bucket** (each
size rounded up to a power of two: 48 and 64 share a bucket, 65 does not), the structure of its
argument bundles (which optional tensors are present) and its scalar options (``mode``,
``num_heads``, ...). Within a bucket the cached pick is checked against the call's own capability
predicates before it runs (a kernel limit may fall inside a bucket); a pick that cannot run the call
falls back to the static order.

Candidates: every backend of ``auto``'s order for the device that can run the call (no reasons, made
ready to run), never ``reference``; and where the family declares kernel variants (position
attention's Triton backward: ``separate``/``fused``), one candidate per variant, run under
:func:`medattn_fast.use_kernel_config` — unless the user chose that variant explicitly
(:func:`use_kernel_config`, :func:`set_kernel_config` or its environment variable), which then wins.
With one candidate nothing is timed.

Measurement (:func:`measure`): on deep copies of the real inputs (every tensor, also inside
NamedTuples/dataclasses such as the gate's ``GateParams`` with its BatchNorm running buffers; views
keep their strides and offsets, inputs that share memory keep sharing it), ``warmup`` runs, then
``repeats`` timed runs of the forward and — when the key says grad — the backward with a random
``grad_out`` (from a private generator), the candidates taking turns run by run; the median wins, a tie goes to the earlier candidate of the
static order. The caller's outputs, gradients, RNG state (CPU and CUDA, ``torch.random.fork_rng``) and
BatchNorm running statistics are untouched. Clock: ``time.perf_counter`` on CPU, CUDA events on CUDA
(after a synchronize); :func:`set_clock` injects another (tests).

Never timed (a cached pick is used if the in-memory cache has one, else the static order): under
``torch.compile`` tracing (static order only: the key's Python would have to be traced), TorchScript,
``torch.cuda`` graph capture, on fake/meta tensors or tensor subclasses, while exporting (``portable``,
handled before ``auto``), and where the family says a call must not be (the gate with a
``SyncBatchNorm`` process group: a timing run would issue collectives that other ranks do not). A
forced backend (``use_backend``/``set_backend``/``MEDATTN_BACKEND``) never tunes.

Disk cache: ``$MEDATTN_CACHE_DIR`` (default ``~/.cache/medattn_fast``), one JSON file per device,
``autotune-<device>.json``; each entry carries the versions it was measured with (torch, triton,
medattn_fast, CUDA) and an entry of other versions is re-measured. Writes are atomic (a temporary file,
then ``os.replace``); a file that cannot be read is warned about once and ignored (then rewritten).

``MEDATTN_AUTOTUNE=0`` switches it off: ``auto`` takes the static order (``auto_cpu``/``auto_cuda`` of
the family's row in ``ops/_families.py``). On by default, on CPU too: there it decides between the
``cpp`` kernels and the ``torch`` composite, which replaced the gate's hand-measured training-step order.
``medattn-fast tune`` fills the cache ahead of time, ``medattn-fast info`` prints it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

log = logging.getLogger("medattn_fast")

ENV_AUTOTUNE = "MEDATTN_AUTOTUNE"
ENV_CACHE_DIR = "MEDATTN_CACHE_DIR"
WARMUP = 1
REPEATS = 3

__all__ = ["Choice", "cache_dir", "cache_entries", "cache_path", "call_key", "clear_memory", "enabled",
           "measure", "measure_all", "spent", "set_clock", "set_enabled", "versions"]


# --------------------------------------------------------------------------------------------
# switches
# --------------------------------------------------------------------------------------------

_enabled_override: Optional[bool] = None
_clock: Optional[Callable[[], float]] = None


def enabled() -> bool:
    """Whether ``auto`` measures: :func:`set_enabled` > ``MEDATTN_AUTOTUNE`` (``0``/``off``/``false``:
    no) > on."""
    if _enabled_override is not None:
        return _enabled_override
    return os.environ.get(ENV_AUTOTUNE, "1").strip().lower() not in ("0", "off", "false", "no")


def set_enabled(value: Optional[bool]) -> None:
    """Switch the autotune on or off for this process (None: back to ``MEDATTN_AUTOTUNE``)."""
    global _enabled_override
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"set_enabled: expected a bool or None, got {value!r}")
    _enabled_override = value


def set_clock(fn: Optional[Callable[[], float]]) -> None:
    """The clock the measurement reads (seconds, any origin); None: the default (``perf_counter``
    on CPU, CUDA events on CUDA). A custom clock is read after a CUDA synchronize."""
    global _clock
    if fn is not None and not callable(fn):
        raise TypeError(f"set_clock: expected a callable returning seconds or None, got {fn!r}")
    _clock = fn


# --------------------------------------------------------------------------------------------
# choices and keys
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Choice:
    """A backend, and the kernel-config fields it runs with (``variant``: (field, value) pairs;
    empty: the configuration in force)."""

    backend: str
    variant: Tuple[Tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        if not self.variant:
            return self.backend
        return self.backend + "[" + ",".join(f"{k}={v}" for k, v in self.variant) + "]"

    def to_json(self) -> Dict[str, Any]:
        return {"backend": self.backend, "variant": dict(self.variant)}

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "Choice":
        return cls(str(data["backend"]), tuple(sorted((str(k), v) for k, v in dict(data.get("variant") or {}).items())))


def bucket(size: int) -> int:
    """``size`` rounded up to a power of two (0 stays 0)."""
    size = int(size)
    return 0 if size <= 0 else 1 << (size - 1).bit_length()


def _walk(value, parts: List[str], tensors: List[torch.Tensor]) -> None:
    """Appends ``value``'s signature to ``parts`` and its tensors to ``tensors`` (one pass: this runs
    on every ``auto`` call)."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        parts.append(_DTYPE_NAMES.get(value.dtype) or str(value.dtype))
        parts.append(str([bucket(s) for s in value.shape]))
    elif value is None or isinstance(value, (bool, int, float, str)):
        parts.append(repr(value))
    elif isinstance(value, (tuple, list)):
        parts.append(type(value).__name__ + "(" if hasattr(value, "_fields") else "(")
        for v in value:
            _walk(v, parts, tensors)
            parts.append(",")
        parts.append(")")
    elif isinstance(value, dict):
        parts.append("{")
        for k in sorted(value):
            parts.append(f"{k}:")
            _walk(value[k], parts, tensors)
            parts.append(",")
        parts.append("}")
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        parts.append(type(value).__name__ + "(")
        for f in dataclasses.fields(value):
            _walk(getattr(value, f.name), parts, tensors)
            parts.append(",")
        parts.append(")")
    elif isinstance(value, torch.dtype):
        parts.append(str(value))
    else:
        parts.append(type(value).__name__)   # an object (a process group ...): its type, never its address


_DTYPE_NAMES = {d: str(d).replace("torch.", "") for d in (torch.float32, torch.float16, torch.bfloat16,
                                                          torch.float64, torch.int64, torch.int32, torch.bool)}


def signature(args: Sequence, kwargs: Dict[str, Any]) -> Tuple[str, List[torch.Tensor]]:
    """The call's signature (dtypes, shape buckets, structure, scalar options) and its tensors."""
    parts: List[str] = []
    tensors: List[torch.Tensor] = []
    _walk(tuple(args), parts, tensors)
    parts.append("|")
    _walk(dict(kwargs), parts, tensors)
    return "".join(parts), tensors


def device_name(tensors: Sequence[torch.Tensor]) -> str:
    """The CUDA device's name, ``"cpu"``, or another device type (``"meta"``: never measured, never
    stored, so such a call takes the static order)."""
    for t in tensors:
        if t.device.type == "cuda":
            return torch.cuda.get_device_name(t.device)
    for t in tensors:
        if t.device.type != "cpu":
            return t.device.type
    return "cpu"


def wants_grad(tensors: Sequence[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def call_key(op_name: str, args: Sequence, kwargs: Dict[str, Any], *, extra: str = "") -> Tuple[str, str, bool]:
    """(key, device, grad) of one call (see the module docstring)."""
    sig, tensors = signature(args, kwargs)
    device = device_name(tensors)
    grad = wants_grad(tensors)
    return "|".join((op_name, device, "grad" if grad else "nograd", extra or "-", sig)), device, grad


# --------------------------------------------------------------------------------------------
# versions and the on-disk cache
# --------------------------------------------------------------------------------------------

_VERSIONS: Optional[Dict[str, Optional[str]]] = None


def versions() -> Dict[str, Optional[str]]:
    """The versions an entry is valid for: torch, triton, medattn_fast, CUDA (read once)."""
    global _VERSIONS
    if _VERSIONS is None:
        _VERSIONS = _read_versions()
    return _VERSIONS


def _read_versions() -> Dict[str, Optional[str]]:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # pragma: no cover - depends on the install
        triton_version = None
    # the package's version, read from the loaded package (importing it here would be an import cycle:
    # medattn_fast -> backend -> autotune -> medattn_fast)
    package_version = getattr(sys.modules.get(__name__.rpartition(".")[0]), "__version__", None)
    return {"torch": str(torch.__version__), "triton": triton_version and str(triton_version),
            "medattn_fast": package_version and str(package_version), "cuda": torch.version.cuda and str(torch.version.cuda)}


def cache_dir() -> Path:
    return Path(os.environ.get(ENV_CACHE_DIR) or Path.home() / ".cache" / "medattn_fast")


def _slug(device: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in device) or "unknown"


def cache_path(device: str) -> Path:
    """The cache file of ``device`` (``"cpu"`` or a CUDA device name)."""
    return cache_dir() / f"autotune-{_slug(device)}.json"


_lock = threading.Lock()
_memory: Dict[Path, Dict[str, Dict[str, Any]]] = {}   # file -> key -> entry (as on disk)
_warned: set = set()
_single: Dict[str, Choice] = {}                       # key -> the only candidate that could run it




def clear_memory() -> None:
    """Forget what was read or measured in this process (the files stay)."""
    with _lock:
        _memory.clear()
        _warned.clear()
        _single.clear()


def _read(path: Path) -> Dict[str, Dict[str, Any]]:
    """The entries of ``path`` ({} when it is missing; a file that cannot be read warns once)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        return _corrupt(path, f"{type(exc).__name__}: {exc}")
    try:
        data = json.loads(text)
        entries = data["entries"]
        if not isinstance(entries, dict) or not all(isinstance(e, dict) and "pick" in e for e in entries.values()):
            raise ValueError("entries must map keys to objects with a 'pick'")
        return entries
    except Exception as exc:
        return _corrupt(path, f"{type(exc).__name__}: {exc}")


def _corrupt(path: Path, why: str) -> Dict[str, Dict[str, Any]]:
    if path not in _warned:
        _warned.add(path)
        warnings.warn(f"medattn_fast autotune: ignoring the cache file {path} ({why}); it is re-measured "
                      "and rewritten", RuntimeWarning, stacklevel=3)
    return {}


def _entries(path: Path) -> Dict[str, Dict[str, Any]]:
    with _lock:
        if path not in _memory:
            _memory[path] = _read(path)
        return _memory[path]


def cache_entries(device: str) -> Dict[str, Dict[str, Any]]:
    """Every entry of ``device``'s cache (memory and disk): key -> {pick, times_ms, versions, ...}."""
    return {k: {f: v for f, v in e.items() if f != _PARSED} for k, e in _entries(cache_path(device)).items()}


def lookup(device: str, key: str) -> Optional[Choice]:
    """The cached pick for ``key``, or None (none, or measured with other versions)."""
    entry = _entries(cache_path(device)).get(key)
    if entry is None or entry.get("versions") != versions():
        return None
    choice = entry.get(_PARSED)
    if choice is None:
        try:
            choice = entry[_PARSED] = Choice.from_json(entry["pick"])
        except Exception:
            return None
    return choice


_PARSED = " parsed"    # an entry's pick as a Choice, in memory only (never written)


def _store(device: str, key: str, entry: Dict[str, Any]) -> None:
    path = cache_path(device)
    with _lock:
        entries = _memory.setdefault(path, {})
        entries[key] = entry
        on_disk = _read(path) if path.exists() else {}
        on_disk.update(entries)        # keep what another process wrote meanwhile
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
            written = {k: {f: v for f, v in e.items() if f != _PARSED} for k, e in on_disk.items()}
            with os.fdopen(fd, "w") as f:
                json.dump({"device": device, "entries": written}, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except OSError as exc:
            if ("write", path) not in _warned:
                _warned.add(("write", path))
                warnings.warn(f"medattn_fast autotune: cannot write the cache file {path} ({exc}); picks are "
                              "kept in memory only", RuntimeWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------

def _tensors(value, out: List[torch.Tensor]) -> List[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        out.append(value)
    elif isinstance(value, (tuple, list)):
        for v in value:
            _tensors(v, out)
    elif isinstance(value, dict):
        for v in value.values():
            _tensors(v, out)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            _tensors(getattr(value, f.name), out)
    return out


def all_tensors(*values) -> List[torch.Tensor]:
    """Every tensor in ``values``, looking into tuples, NamedTuples, lists, dicts and dataclasses."""
    out: List[torch.Tensor] = []
    for v in values:
        _tensors(v, out)
    return out


def deep_clone(value, _storages: Optional[Dict[int, Any]] = None):
    """A copy of ``value`` with every tensor copied (detached leaves with the same ``requires_grad``,
    strides, storage offset and dtype; tensors that share memory share the copy's), through tuples,
    NamedTuples, lists, dicts and dataclasses; anything else is kept as it is."""
    storages = {} if _storages is None else _storages
    if isinstance(value, torch.Tensor):
        with torch.no_grad():
            if value.layout == torch.strided:
                storage = value.untyped_storage()
                key = storage.data_ptr()
                if key not in storages:
                    storages[key] = storage.clone()
                copy = torch.empty(0, dtype=value.dtype, device=value.device).set_(
                    storages[key], value.storage_offset(), value.size(), value.stride())
            else:
                copy = value.detach().clone()
        return copy.requires_grad_(value.requires_grad) if value.is_floating_point() or value.is_complex() else copy
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)._make(deep_clone(v, storages) for v in value)
    if isinstance(value, (tuple, list)):
        return type(value)(deep_clone(v, storages) for v in value)
    if isinstance(value, dict):
        return {k: deep_clone(v, storages) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: deep_clone(getattr(value, f.name), storages)
                                             for f in dataclasses.fields(value) if f.init})
    return value


class _Timer:
    """Seconds of one region: the injected clock, or perf_counter (CPU) / CUDA events."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def region(self, out: List[float]) -> Iterator[None]:
        self._sync()
        if _clock is None and self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1000.0)
            return
        clock = _clock or time.perf_counter
        t0 = clock()
        yield
        self._sync()
        out.append(clock() - t0)


def measure_all(runs: Dict[str, Callable[..., Any]], args: Sequence, kwargs: Dict[str, Any], *, grad: bool,
                warmup: int = WARMUP, repeats: int = REPEATS) -> Tuple[Dict[str, float], Dict[str, Exception]]:
    """Median seconds of each ``runs[label](*args, **kwargs)`` (forward, and backward with a random
    ``grad_out`` when ``grad``) on one deep copy of the arguments, after ``warmup`` runs (at least one:
    it makes the random ``grad_out``). The candidates take turns, one run each per round, so a load
    that comes and goes falls on all of them alike. Returns (times, the exception of each candidate
    that failed: it drops out). The caller's tensors and gradients are untouched (the caller's RNG
    state too: ``grad_out`` comes from a private generator)."""
    warmup = max(1, int(warmup))
    cargs, ckwargs = deep_clone((tuple(args), dict(kwargs)))   # only BN running buffers change in place
    leaves = [t for t in all_tensors(cargs, ckwargs) if t.requires_grad] if grad else []
    timer = _Timer(any(t.device.type == "cuda" for t in leaves or all_tensors(cargs, ckwargs)))
    grad_outs: Dict[str, List[torch.Tensor]] = {}
    times: Dict[str, List[float]] = {label: [] for label in runs}
    failed: Dict[str, Exception] = {}
    for i in range(warmup + repeats):
        for label, run in runs.items():
            if label in failed:
                continue
            try:
                with timer.region(times[label] if i >= warmup else []):
                    result = run(*cargs, **ckwargs)
                    if leaves:
                        outs = [t for t in all_tensors(result) if t.requires_grad]
                        if label not in grad_outs:    # made once, in the first (warm-up) run
                            generator = torch.Generator().manual_seed(0)
                            grad_outs[label] = [torch.randn(t.shape, generator=generator, dtype=torch.float32).to(t)
                                                for t in outs]
                        if outs:
                            torch.autograd.grad(outs, leaves, grad_outs[label], allow_unused=True)
                    del result
            except Exception as exc:     # a candidate that fails here is not a candidate
                failed[label] = exc
    return {label: statistics.median(t) for label, t in times.items() if label not in failed and t}, failed


def measure(run: Callable[..., Any], args: Sequence, kwargs: Dict[str, Any], *, grad: bool,
            warmup: int = WARMUP, repeats: int = REPEATS) -> float:
    """Median seconds of one function (:func:`measure_all` of one candidate; its exception is raised)."""
    times, failed = measure_all({"run": run}, args, kwargs, grad=grad, warmup=warmup, repeats=repeats)
    if failed:
        raise failed["run"]
    return times["run"]


# --------------------------------------------------------------------------------------------
# the decision
# --------------------------------------------------------------------------------------------

def _is_plain(t: torch.Tensor) -> bool:
    return type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type != "meta"


def may_measure(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether timing is allowed now (see the module docstring's "never timed")."""
    if torch.compiler.is_compiling() or torch.jit.is_scripting() or torch.jit.is_tracing():
        return False
    if not all(_is_plain(t) for t in tensors):
        return False
    if any(t.device.type == "cuda" for t in tensors) and torch.cuda.is_current_stream_capturing():
        return False
    return True


_recording: Optional[List[Tuple[str, str, Choice, bool]]] = None
_spent = {"measured keys": 0, "seconds": 0.0}


def spent() -> Dict[str, float]:
    """What measuring cost this process so far: keys measured, and seconds spent (wall clock)."""
    return dict(_spent)


@contextlib.contextmanager
def record() -> Iterator[List[Tuple[str, str, Choice, bool]]]:
    """Collects (device, key, pick, measured now) of every tuned call made inside (``medattn-fast tune``)."""
    global _recording
    previous, _recording = _recording, []
    try:
        yield _recording
    finally:
        _recording = previous


def _note(device: str, key: str, choice: Choice, measured: bool) -> Choice:
    if _recording is not None and not any(r[1] == key for r in _recording):
        _recording.append((device, key, choice, measured))
    return choice


def choose(op, candidates: Callable[[], Sequence[Choice]], static: Choice, args: Sequence,
           kwargs: Dict[str, Any], *, extra: str, can_run: Callable[[Choice], bool]) -> Choice:
    """The measured pick for this call of ``op``: the cached one (``static`` if the cached one cannot
    run this call: a limit inside the shape bucket), else — on a miss, when timing is allowed —
    the fastest of ``candidates()`` (in static order; a tie goes to the earlier), measured now and
    cached; else ``static``."""
    if torch.compiler.is_compiling():
        return static
    key, device, grad = call_key(op.name, args, kwargs, extra=extra)
    cached = _single.get(key) or lookup(device, key)
    if cached is not None:
        return _note(device, key, cached if cached == static or can_run(cached) else static, False)
    tensors = all_tensors(args, kwargs)
    if not may_measure(tensors):
        return static
    candidates = list(candidates())
    if len(candidates) < 2:               # one can run: remembered in memory, nothing to time or store
        _single[key] = static
        return static
    started = time.perf_counter()
    with torch.random.fork_rng(devices=sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})):
        times, failed = measure_all({c.label: op.runner(c) for c in candidates}, args, kwargs, grad=grad)
    for label, exc in failed.items():
        log.warning("%s: autotune could not time %s (%s: %s); it is left out", op.name, label,
                    type(exc).__name__, exc)
    _spent["measured keys"] += 1
    _spent["seconds"] += time.perf_counter() - started
    timed = [c for c in candidates if c.label in times]
    if not timed:
        return static
    best = min(timed, key=lambda c: (times[c.label], candidates.index(c)))
    log.info("%s: autotune picks %s for %s (%s)", op.name, best.label, key,
             ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in times.items()))
    _store(device, key, {"pick": best.to_json(), "label": best.label, "op": op.name,
                         "times_ms": {k: round(v * 1e3, 6) for k, v in times.items()},
                         "versions": versions(), "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return _note(device, key, best, True)
