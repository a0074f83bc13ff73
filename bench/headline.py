"""``make bench`` / ``medattn-fast bench``: the headline answer in minutes — what the fast blocks buy
on the originals' whole networks and on each op, on this machine.

Rows (training steps: forward + backward of a random cotangent, train mode):

* each whole network of :mod:`bench.cases_networks`, the original against the same network with
  its attention blocks swapped for the fast ones (same weights);
* one row per op family at a real network's shape, the original module (``reference``) against
  the drop-in on the default backend (``auto``).

:func:`gpu_check_cases` is the GPU check's set (``bench/gpu_check.sh``): every family's rows at the
real networks' shapes, timed by :func:`bench.harness.run_gpu_check` against a deadline.

Each row is measured within a time budget (:func:`bench.harness.measure_within_budget`: the two
providers interleaved, at least three calls each), so the whole set takes about 3 minutes on a
quiet 2-core CPU. A progress line names the case being run with an ETA; the summary gives per row
the speedup (original time / fast time), the peak-memory ratio (fast / original) and the max abs
error of the fast output vs the original's; backends this device cannot run are listed once with
their reason. Everything else — every provider (``torch``, ``compile``, each fused backend), mode,
dtype and shape — is ``make bench-full`` (``--all``).
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from bench.harness import Row, measure_within_budget
from medattn_fast._progress import StatusLine, format_duration, progress_bar  # noqa: F401 (format_duration: bench.run)


@dataclass
class HeadlineCase:
    label: str           # the network or op, as the summary names it
    shape: str
    setup: Callable      # (device, dtype) -> (inputs, {"original": fn, "fast": fn})
    budget_s: float      # seconds of measurement on a quiet 2-core CPU (also the ETA's weight)
    family: str          # results' "op" column


def _pick(setup: Callable, original: str = "reference", fast: str = "auto") -> Callable:
    """A case setup reduced to its ``original`` and ``fast`` providers (the others never run)."""
    def picked(device: torch.device, dtype: torch.dtype):
        inputs, providers = setup(device, dtype)
        return inputs, {"original": providers[original], "fast": providers[fast]}
    return picked


def op_cases(device: torch.device) -> List[HeadlineCase]:
    """One training-step row per op family, at the shape a real network gives it (GPU: the
    network's training batch; CPU: one image)."""
    from bench import cases_attention_gate, cases_channel, cases_external, cases_gaussian_axial
    from bench import cases_position, cases_window

    cuda = device.type == "cuda"
    b_danet, side_danet = (8, 96) if cuda else (1, 32)
    b_mt = 12 if cuda else 1
    b_gate = 8 if cuda else 1
    danet = f"B={b_danet} C=512 {side_danet}x{side_danet}"
    return [
        HeadlineCase("position (DANet PAM)", danet, _pick(cases_position._setup_pam(b_danet, 512, (side_danet,) * 2)),
                     6, "position_attention"),
        HeadlineCase("channel (DANet CAM)", danet, _pick(cases_channel._setup_cam(b_danet, 512, (side_danet,) * 2)),
                     6, "channel_attention"),
        HeadlineCase("gaussian_axial (MT-UNet)", f"B={b_mt} 7x7 D=256",
                     _pick(cases_gaussian_axial._setup_scores(b_mt, 7, 7, 256)), 6, "gaussian_axial"),
        HeadlineCase("window (MT-UNet)", f"B={b_mt} 28x28 C=256 ws=4", _pick(cases_window._setup(b_mt, 28, 256)),
                     6, "window"),
        HeadlineCase("external (MT-UNet)", f"B={b_mt} N=784 C=256", _pick(cases_external._setup(b_mt, 784, 256)),
                     6, "external"),
        HeadlineCase("attention_gate (U-Net top)", f"B={b_gate} C=64 224x224",
                     _pick(cases_attention_gate._setup_additive(b_gate, 64, (224, 224), True)), 8, "attention_gate"),
    ]


# seconds of measurement per network on a quiet 2-core CPU (a training step there takes
# ~0.5 s (DANet head at 32²) to ~7 s (MT-UNet at 224²); three calls of each provider at least)
_NETWORK_BUDGET_S = {"DANet head C=512": 10, "MT-UNet": 45, "AttU_Net (LeeJunHyun)": 25,
                     "Oktay CT 3-D grid gate": 15, "MONAI AttentionUnet 3-D": 15}


def network_cases(device: torch.device) -> List[HeadlineCase]:
    from bench import cases_networks

    out = []
    for case in cases_networks.network_cases(device, training_only=True):
        budget = _NETWORK_BUDGET_S.get(case.op, 15) if device.type == "cpu" else 10
        out.append(HeadlineCase(case.op, case.shape, case.setup, budget, case.op))
    return out


def headline_cases(device: torch.device) -> List[HeadlineCase]:
    ops = op_cases(device)
    if device.type == "cuda":
        for case in ops:
            case.budget_s = 3
    return network_cases(device) + ops


def gpu_check_cases(device: torch.device, tiny: bool = False) -> list:
    """The GPU check's rows (``python -m bench.run --gpu-check``, run by ``bench/gpu_check.sh``) in
    priority order: each family's ``gpu_check_cases`` (``bench/cases_<family>.py``: the real
    networks' shapes; ``tiny``: toy ones for the CPU dry run), the MT-UNet training step, then
    FlexAttention's PAM rows last, only if time is left."""
    from bench import (cases_attention_gate, cases_channel, cases_external, cases_gaussian_axial, cases_networks,
                       cases_position, cases_window)

    return [*cases_position.gpu_check_cases(device, tiny), *cases_channel.gpu_check_cases(device, tiny),
            *cases_attention_gate.gpu_check_cases(device, tiny), *cases_gaussian_axial.gpu_check_cases(device, tiny),
            *cases_window.gpu_check_cases(device, tiny), *cases_external.gpu_check_cases(device, tiny),
            *cases_networks.gpu_check_cases(device, tiny), *cases_position.flex_check_cases(device, tiny)]


# ------------------------------------------------------------------------------------------------
# progress
# ------------------------------------------------------------------------------------------------

class Progress:
    """One line per case (or one line rewritten in place on a terminal): ``[i/n] elapsed, ETA,
    the case``. The ETA scales the remaining cases' budgets by how far the finished ones ran over
    or under theirs."""

    def __init__(self, weights: Sequence[float], stream=None):
        self.weights = list(weights)
        self.line = StatusLine(stream or sys.stdout)
        self.start = time.perf_counter()
        self.done = 0

    def eta_s(self) -> float:
        elapsed = time.perf_counter() - self.start
        done_w = sum(self.weights[: self.done])
        left_w = sum(self.weights[self.done:])
        rate = elapsed / done_w if done_w > 0 else 1.0
        return left_w * rate

    def begin(self, label: str) -> None:
        n = len(self.weights)
        elapsed = time.perf_counter() - self.start
        self.line.show(f"{progress_bar(self.done, n, 20)} {self.done + 1}/{n}  {format_duration(elapsed)} elapsed, "
                       f"ETA {format_duration(self.eta_s())}  {label}")

    def end(self) -> None:
        self.done += 1

    def finish(self) -> float:
        self.line.close(keep=False)
        return time.perf_counter() - self.start


# ------------------------------------------------------------------------------------------------
# running and summarising
# ------------------------------------------------------------------------------------------------

def run(device: torch.device, cases: Sequence[HeadlineCase], dtype: torch.dtype = torch.float32,
        progress: Optional[Progress] = None, budget_scale: float = 1.0) -> List[Row]:
    """Rows ``original`` and ``fast`` (mode ``fwd+bwd``) for every case; a case that fails gives
    ``error`` rows and the run goes on."""
    progress = progress or Progress([c.budget_s for c in cases])
    dname = str(dtype).replace("torch.", "")
    rows: List[Row] = []
    for case in cases:
        progress.begin(f"{case.label} {case.shape}")
        try:
            inputs, providers = case.setup(device, dtype)
            result = measure_within_budget(providers, inputs, "fwd+bwd", device, case.budget_s * budget_scale)
            err = (result["fast"].output.double() - result["original"].output.double()).abs().max().item()
            for name, m in result.items():
                rows.append(Row(case.family, case.shape, device.type, dname, "fwd+bwd", name, median_ms=m.median_ms,
                                peak_mib=m.peak_mib, max_err=err if name == "fast" else 0.0,
                                extra={"label": case.label, "calls": m.calls}))
            del inputs, providers, result
        except Exception as exc:  # reported in the summary, the other rows still run
            for name in ("original", "fast"):
                rows.append(Row(case.family, case.shape, device.type, dname, "fwd+bwd", name,
                                status=f"error: {type(exc).__name__}: {str(exc)[:200]}", extra={"label": case.label}))
        progress.end()
    return rows


def format_time(ms: Optional[float]) -> str:
    if ms is None:
        return "-"
    return f"{ms / 1e3:.2f} s" if ms >= 1000 else (f"{ms:.0f} ms" if ms >= 10 else f"{ms:.2f} ms")


def format_mib(mib: Optional[float]) -> str:
    if mib is None:
        return "-"
    return f"{mib / 1024:.2f} GiB" if mib >= 1024 else f"{mib:.0f} MiB" if mib >= 10 else f"{mib:.1f} MiB"


def summary_lines(rows: Sequence[Row]) -> List[str]:
    """One line per case: original and fast time, speedup, peak memory of both and their ratio,
    max error (or the error that stopped the case)."""
    by_case: Dict[Tuple[str, str], Dict[str, Row]] = {}
    for r in rows:
        by_case.setdefault((r.extra.get("label", r.op), r.shape), {})[r.provider] = r
    width = max([len(label) for label, _ in by_case] + [len("network / op")])
    swidth = max([len(shape) for _, shape in by_case] + [len("shape")])
    head = (f"{'network / op':<{width}}  {'shape':<{swidth}}  {'original':>9}  {'fast':>9}  {'speedup':>7}  "
            f"{'peak original':>13}  {'peak fast':>9}  {'memory':>6}  {'max err':>7}")
    lines = [head, "-" * len(head)]
    for (label, shape), pair in by_case.items():
        o, f = pair.get("original"), pair.get("fast")
        if o is None or f is None or o.status != "ok" or f.status != "ok":
            status = next(r.status for r in (o, f) if r is not None and r.status != "ok")
            lines.append(f"{label:<{width}}  {shape:<{swidth}}  {status}")
            continue
        speed = o.median_ms / f.median_ms
        memory = "-"
        if o.peak_mib and f.peak_mib is not None:  # the CPU reading counts 4 KiB pages
            memory = f"{f.peak_mib / o.peak_mib:.2f}x" if f.peak_mib >= 0.01 * o.peak_mib else "<0.01x"
        err = f"{f.max_err:.0e}" if f.max_err is not None and math.isfinite(f.max_err) else "nan"
        lines.append(f"{label:<{width}}  {shape:<{swidth}}  {format_time(o.median_ms):>9}  {format_time(f.median_ms):>9}  "
                     f"{speed:>6.2f}x  {format_mib(o.peak_mib):>13}  {format_mib(f.peak_mib):>9}  {memory:>6}  {err:>7}")
    return lines


def unavailable_backends() -> Dict[str, str]:
    """Backends this device cannot run, with the reason (``medattn-fast info``'s); a C++ backend
    that is merely not built yet is not one of them."""
    from medattn_fast.backend import info

    out = {}
    for name, status in info()["backends"].items():
        if status.startswith("available") or "not built yet" in status:
            continue
        out[name] = status
    return out
