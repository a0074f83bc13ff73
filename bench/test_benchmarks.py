"""The benchmark cases of every op family as a pytest-benchmark suite: a thin pytest front end
over the case list of ``python -m bench.run`` (:func:`bench.run.select_cases`), timed with the
harness's calls (:mod:`bench.harness`).

    pytest bench --benchmark-only                                  every case, provider, dtype, mode
    pytest bench --benchmark-only -k "position and cpp and fwd+bwd"   a selection
    pytest bench --benchmark-only --benchmark-autosave             saved under .benchmarks/
    pytest bench --benchmark-only --benchmark-compare              against the last saved run
    pytest bench --benchmark-only --benchmark-json out.json

One test per (case, dtype, mode, provider) of ``bench/cases_<family>.py`` for the six op families
(position, channel, gaussian_axial, window, external, attention_gate), on CUDA when it is present,
else on the CPU. pytest-benchmark times the call (on CUDA with a synchronisation inside the timed
function). What it has no equivalent for is kept from :mod:`bench.harness` and stored in each
benchmark's ``extra_info``: the peak memory of one call above the memory live before it
(``peak_mib``: CUDA allocator peak, or the CPU resident-set peak), the max abs error of the output
against the case's reference provider (``max_err``), and on CUDA the median time of
``triton.testing.do_bench`` (``do_bench_ms``: L2 flushed between calls). Providers this device
cannot run (a fused backend without its device or build) are skipped with the backend's reason.
Interleaved timing of providers (robust ratios on a shared machine) stays ``python -m bench.run
--interleave``. ``MEDATTN_BENCH_FAMILIES=position,channel`` collects only those families (``-k``
selects after every case has been set up once to learn its providers).
"""
from __future__ import annotations

import ctypes
import gc
import os
from typing import Dict, List, NamedTuple, Tuple

import pytest
import torch

from bench.harness import Case, PeakMemory, _run_once, _sync, time_fn
from bench.run import select_cases
from medattn_fast import BackendUnavailable

FAMILIES = ("position", "channel", "gaussian_axial", "window", "external", "attention_gate")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _return_freed_memory_at_once() -> None:
    """glibc keeps freed blocks below a dynamic threshold in the heap, hiding the live-tensor
    peak from the resident-set reading; a fixed threshold returns them at once (what
    ``bench.run`` does through ``MALLOC_MMAP_THRESHOLD_``)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 131072)
    libc.mallopt(m_trim_threshold, 131072)


class Entry(NamedTuple):
    case: Case
    dtype: torch.dtype
    mode: str
    provider: str


def _id(entry: Entry) -> str:
    dtype = str(entry.dtype).replace("torch.", "")
    shape = entry.case.shape.replace(" ", "_")
    return f"{entry.case.op}-{shape}-{dtype}-{entry.mode}-{entry.provider}"


def _entries() -> List[Entry]:
    """Every (case, dtype, mode, provider): each case is set up once here to learn its
    providers (their objects are dropped at once; the test sets the case up again)."""
    out: List[Entry] = []
    chosen = [f for f in os.environ.get("MEDATTN_BENCH_FAMILIES", "").split(",") if f] or FAMILIES
    unknown = sorted(set(chosen) - set(FAMILIES))
    if unknown:
        raise ValueError(f"MEDATTN_BENCH_FAMILIES: unknown families {unknown}; known: {list(FAMILIES)}")
    for case in select_cases(DEVICE, list(chosen)):
        for dtype in case.dtypes:
            _, providers = case.setup(DEVICE, dtype)
            names = list(providers)
            del providers
            for mode in case.modes:
                out.extend(Entry(case, dtype, mode, name) for name in names)
    gc.collect()
    return out


_ENTRIES = _entries()
_LAST: Dict[Tuple[int, torch.dtype], tuple] = {}


def _setup(case: Case, dtype: torch.dtype):
    """The case's inputs and providers, kept while consecutive tests use the same case."""
    key = (id(case), dtype)
    if key not in _LAST:
        _LAST.clear()
        gc.collect()
        torch.manual_seed(0)
        _LAST[key] = case.setup(DEVICE, dtype)
    return _LAST[key]


@pytest.fixture(scope="module", autouse=True)
def _memory_reading():
    _return_freed_memory_at_once()
    yield
    _LAST.clear()


@pytest.mark.parametrize("entry", _ENTRIES, ids=_id)
def test_case(benchmark, entry: Entry):
    case, dtype, mode, provider = entry
    inputs, providers = _setup(case, dtype)
    fn = providers[provider]
    try:
        with torch.no_grad():
            out = fn(*inputs)
    except BackendUnavailable as exc:
        pytest.skip(f"{provider} cannot run on {DEVICE.type}: {exc}")
    max_err = None
    if case.reference in providers and provider != case.reference:
        with torch.no_grad():
            reference = providers[case.reference](*inputs)
        max_err = (out.double() - reference.double()).abs().max().item()
    cotangent = torch.randn_like(out)
    _run_once(fn, inputs, mode, cotangent)  # warm-up (compiles, caches) before the memory reading
    with PeakMemory(DEVICE) as peak:
        _run_once(fn, inputs, mode, cotangent)
    benchmark.extra_info.update(
        op=case.op, shape=case.shape, dtype=str(dtype).replace("torch.", ""), mode=mode, provider=provider,
        device=torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
        peak_mib=None if peak.peak is None else peak.peak / 2**20, max_err=max_err)
    if DEVICE.type == "cuda":
        benchmark.extra_info["do_bench_ms"] = time_fn(fn, inputs, mode, DEVICE, cotangent, min_time_s=0.1)

    def call():
        _run_once(fn, inputs, mode, cotangent)
        _sync(DEVICE)

    benchmark(call)
    assert max_err is None or max_err == max_err, f"{provider}: NaN in the output"
