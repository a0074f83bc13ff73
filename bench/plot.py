r"""Draw the figures of the benchmark results with matplotlib (the optional ``bench`` extra).

    python -m bench.plot [--results bench/results] [--out bench/figures] [--device-filter STR]

Inputs are the ``bench/results/*.json`` files of :mod:`bench.run` (``{"environment", "command",
"date", "rows": [Row, ...]}``, rows as :class:`bench.harness.Row`) and of :mod:`bench.loss_curves`
(``{"environment", ..., "records": [...]}``). ``--device-filter`` keeps the files whose device
(``environment["device"]``) or file name contains the string. Figures (PNG), named after the
results file ``<what>_<device>.json`` they come from:

* ``headline_<device>.png`` — the headline run (``make bench``): per network and op, the speedup of
  the fast version over the original (log axis, bars from 1×) and its peak memory relative to the
  original's.
* ``speedup_<op>__<results>.png`` — per op family (the whole networks as ``models``) and results
  file: one group of horizontal bars per ``(shape, dtype, mode)``, one bar per provider, its speed
  relative to the case's reference provider ``t_reference / t_provider`` on a log axis starting at
  1× (right: faster, left: slower); providers that could not run are named in the caption.
* ``pam_memory__<results>.png`` — DANet PAM peak memory of each provider against the map size (N =
  H·W, log-log): the N×N matrix makes the reference's curve twice as steep as an O(N) provider's.
* ``loss_curves[-float64]_<device>.png`` — the loss curves of each network and its reference twin
  (:mod:`bench.loss_curves`), with their largest relative difference.

Every figure carries the device and versions (torch, triton, CUDA, threads) and the command.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL_OPS = ("models", "mtunet_model", "attention_unet_model", "networks")

# fixed colours for the providers the cases use (matplotlib's tab10); others take the next free one
PROVIDER_COLORS: Dict[str, str] = {
    "reference": "#7f7f7f", "original": "#7f7f7f", "torch": "#1f77b4", "compile": "#ff7f0e", "auto": "#2ca02c",
    "fast": "#2ca02c", "cpp": "#d62728", "triton": "#9467bd", "cuda": "#8c564b", "sdpa": "#e377c2",
    "flex": "#bcbd22", "models": "#17becf", "reference-vec": "#aec7e8",
}
_EXTRA = ("#393b79", "#843c39", "#637939", "#b5a000")


def provider_color(name: str) -> str:
    if name in PROVIDER_COLORS:
        return PROVIDER_COLORS[name]
    return _EXTRA[sum(map(ord, name)) % len(_EXTRA)]


# ------------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------------

@dataclass
class ResultFile:
    path: Path
    environment: Dict[str, str]
    command: str
    rows: List[dict] = field(default_factory=list)
    records: List[dict] = field(default_factory=list)


def load_results(directory: Path, device_filter: Optional[str] = None) -> List[ResultFile]:
    """Every results JSON under ``directory`` (sorted by name) whose device or name matches."""
    files = []
    for path in sorted(Path(directory).glob("*.json")):
        data = json.loads(path.read_text())
        env = data.get("environment", {})
        if device_filter and device_filter not in env.get("device", "") and device_filter not in path.name:
            continue
        files.append(ResultFile(path, env, data.get("command", ""), data.get("rows", []), data.get("records", [])))
    return files


def environment_line(env: Dict[str, str]) -> str:
    """``device, torch X, triton Y[, CUDA Z], N threads`` from a results file's environment."""
    parts = [env.get("device", "?"), f"torch {env.get('torch', '?')}", f"triton {env.get('triton', '?')}"]
    if env.get("cuda"):
        parts.append(f"CUDA {env['cuda']}")
    if env.get("threads"):
        parts.append(f"{env['threads']} threads")
    return ", ".join(parts)


@dataclass
class Bar:
    provider: str
    ratio: Optional[float]   # t_reference / t_provider; None: no time (see status)
    status: str


@dataclass
class Group:
    op: str
    shape: str
    dtype: str
    mode: str
    reference: str
    reference_ms: Optional[float]
    bars: List[Bar]


def speedup_groups(rows: Sequence[dict], ops: Optional[Sequence[str]] = None, reference: str = "reference") -> List[Group]:
    """One :class:`Group` per ``(op, shape, dtype, mode)`` of ``rows`` (in order of appearance)
    with a timed reference row; a bar per other provider: its ratio, or its status if untimed."""
    keys: List[Tuple[str, str, str, str]] = []
    by_key: Dict[Tuple[str, str, str, str], List[dict]] = {}
    for r in rows:
        if ops is not None and r["op"] not in ops:
            continue
        key = (r["op"], r["shape"], r["dtype"], r["mode"])
        if key not in by_key:
            keys.append(key)
            by_key[key] = []
        by_key[key].append(r)
    groups = []
    for key in keys:
        members = by_key[key]
        ref = next((r for r in members if r["provider"] == reference and r.get("median_ms")), None)
        if ref is None:
            continue
        bars = []
        for r in members:
            if r["provider"] == reference:
                continue
            ms = r.get("median_ms")
            ok = r.get("status", "ok") == "ok" and ms
            bars.append(Bar(r["provider"], ref["median_ms"] / ms if ok else None, r.get("status", "ok") if not ok else "ok"))
        groups.append(Group(*key, reference, ref["median_ms"], bars))
    return groups


# ------------------------------------------------------------------------------------------------
# PAM rows
# ------------------------------------------------------------------------------------------------

_PAM = re.compile(r"^PAM B=(\d+) C=(\d+) (\d+(?:x\d+)+)$")


def pam_memory_series(rows: Sequence[dict]) -> Dict[Tuple[str, str, str, str], Dict[str, List[Tuple[int, str, float]]]]:
    """``{(B, C, dtype, mode): {provider: [(N, map, peak MiB), ...]}}`` of the PAM rows with a
    positive peak (sorted by N; a map seen twice keeps its last measurement)."""
    out: Dict[Tuple[str, str, str, str], Dict[str, Dict[str, Tuple[int, str, float]]]] = {}
    for r in rows:
        m = _PAM.match(r.get("shape", ""))
        if r.get("op") != "position_attention" or not m or r.get("status", "ok") != "ok" or not r.get("peak_mib"):
            continue
        batch, channels, spatial = m.groups()
        n = math.prod(int(s) for s in spatial.split("x"))
        key = (batch, channels, r["dtype"], r["mode"])
        out.setdefault(key, {}).setdefault(r["provider"], {})[spatial] = (n, spatial, float(r["peak_mib"]))
    return {k: {p: sorted(pts.values()) for p, pts in provs.items()} for k, provs in out.items()}


# ------------------------------------------------------------------------------------------------
# drawing helpers
# ------------------------------------------------------------------------------------------------

def ratio_label(s: float) -> str:
    return f"{s:.2f}×" if s < 10 else (f"{s:.1f}×" if s < 100 else f"{s:.0f}×")


def format_ms(ms: float) -> str:
    return f"{ms / 1e3:.2f} s" if ms >= 1000 else (f"{ms:.0f} ms" if ms >= 100 else f"{ms:.3g} ms")


def _plain_number(v: float, _pos=None) -> str:
    """Axis numbers as people write them: 0.5, 1, 2, 10, 200 (no exponents)."""
    if v <= 0:
        return ""
    return f"{v:.0f}" if v >= 10 else f"{v:g}"


def _log_axis(axis, unit: str = "") -> None:
    """A log axis ticked at 1-2-5 values, labelled without exponents (``unit`` appended)."""
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_minor_formatter(NullFormatter())
    axis.set_major_formatter(FuncFormatter(lambda v, pos: _plain_number(v) + (unit if _plain_number(v) else "")))


def _footer(fig, env: Dict[str, str], command: str = "") -> None:
    text = environment_line(env) + (f"\n{command}" if command else "")
    fig.text(0.01, 0.005, text, fontsize=7.5, color="#444444", va="bottom", ha="left")


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# speedup bars
# ------------------------------------------------------------------------------------------------

def speedup_figure(title: str, groups: Sequence[Group], env: Dict[str, str], command: str = ""):
    """Horizontal bars, one group per :class:`Group`, one bar per provider: ``t_ref / t``, on a log
    x axis from 1× (the reference). Returns the figure; ``fig.axes[0].patches`` are the bars (in
    group order, providers in row order), each with ``get_label()`` = the provider."""
    heights = sum(len([b for b in g.bars if b.ratio]) + 1 for g in groups)
    fig, ax = plt.subplots(figsize=(8.5, 2.0 + 0.24 * heights))
    y, yticks, ylabels, missing = 0.0, [], [], []
    ratios = [b.ratio for g in groups for b in g.bars if b.ratio]
    for g in groups:
        ax.text(1.0, y - 0.15, f"  {g.shape}  {g.mode}  {g.dtype}  (reference {format_ms(g.reference_ms)})",
                fontsize=8, fontweight="bold", va="bottom", ha="left")
        y += 0.35
        for b in g.bars:
            if b.ratio is None:
                missing.append(f"{b.provider} ({g.shape}, {g.mode}): {b.status.split(':')[0]}")
                continue
            left, width = (1.0, b.ratio - 1.0) if b.ratio >= 1 else (b.ratio, 1.0 - b.ratio)
            bar = ax.barh(y, width, left=left, height=0.8, color=provider_color(b.provider))[0]
            bar.set_label(b.provider)
            ax.text(max(b.ratio, 1.0) * 1.03, y, ratio_label(b.ratio), va="center", fontsize=7.5)
            yticks.append(y)
            ylabels.append(b.provider)
            y += 1.0
        y += 0.4
    ax.set_xscale("log")
    low, high = min(ratios + [1.0]) / 1.3, max(ratios + [1.0]) * 1.6
    ax.set_xlim(low, high)
    _log_axis(ax.xaxis, "×")
    ax.axvline(1.0, color="black", linewidth=1.0)
    ax.set_yticks(yticks, ylabels, fontsize=8)
    ax.set_ylim(y, -0.6)
    ax.grid(axis="x", which="major", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    ax.set_xlabel("speed relative to the reference = t_reference / t_provider (log scale; right: faster)")
    ax.set_title(title, fontsize=10, loc="left")
    if missing:
        ax.text(0.0, -0.12 - 0.02 * len(missing), "not run: " + "; ".join(sorted(set(missing)))[:300],
                transform=ax.transAxes, fontsize=7, color="#666666", wrap=True)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    _footer(fig, env, command)
    return fig


# ------------------------------------------------------------------------------------------------
# the headline figure
# ------------------------------------------------------------------------------------------------

def headline_pairs(rows: Sequence[dict]) -> List[Tuple[str, float, Optional[float]]]:
    """``(label + shape, speedup, memory ratio)`` per headline case with both rows timed."""
    cases: Dict[Tuple[str, str], Dict[str, dict]] = {}
    for r in rows:
        label = (r.get("extra") or {}).get("label", r["op"])
        cases.setdefault((label, r["shape"]), {})[r["provider"]] = r
    out = []
    for (label, shape), pair in cases.items():
        o, f = pair.get("original"), pair.get("fast")
        if not o or not f or o.get("status") != "ok" or f.get("status") != "ok":
            continue
        memory = f["peak_mib"] / o["peak_mib"] if o.get("peak_mib") and f.get("peak_mib") is not None else None
        out.append((f"{label}\n{shape}", o["median_ms"] / f["median_ms"], memory))
    return out


def headline_figure(results_json: Path, out_dir: Path) -> Path:
    """``out_dir/<results stem>.png``: two panels — speedup and peak-memory ratio of the fast
    version per network and op (log axes, bars from 1×)."""
    data = json.loads(Path(results_json).read_text())
    pairs = headline_pairs(data["rows"])
    fig, (ax_speed, ax_mem) = plt.subplots(1, 2, figsize=(10, 1.2 + 0.42 * max(len(pairs), 1)), sharey=True)
    ys = list(range(len(pairs)))
    for ax, values, title, unit in ((ax_speed, [p[1] for p in pairs], "training step speedup (original / fast time)", "×"),
                                    (ax_mem, [p[2] for p in pairs], "peak memory, fast / original", "×")):
        floor = 0.01  # a peak below 1% of the original's (the CPU reading counts 4 KiB pages) is drawn there
        shown = [max(v, floor) for v in values if v is not None]
        for y, v in zip(ys, values):
            if v is None:
                continue
            drawn = max(v, floor)
            left, width = (1.0, drawn - 1.0) if drawn >= 1 else (drawn, 1.0 - drawn)
            good = v >= 1 if ax is ax_speed else v <= 1
            ax.barh(y, width, left=left, height=0.65, color="#2ca02c" if good else "#d62728")
            ax.text(max(drawn, 1.0) * 1.04, y, ratio_label(v) if v >= floor else f"<{floor:g}×", va="center", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlim(min(shown + [1.0]) / 1.5, max(shown + [1.0]) * 1.8)
        _log_axis(ax.xaxis, unit)
        ax.axvline(1.0, color="black", linewidth=1.0)
        ax.grid(axis="x", color="#dddddd", linewidth=0.6)
        ax.set_axisbelow(True)
        ax.set_title(title, fontsize=9.5)
    ax_speed.set_yticks(ys, [p[0] for p in pairs], fontsize=7.5)
    ax_speed.set_ylim(len(pairs) - 0.5, -0.5)
    ax_mem.set_xlabel("lower is better (log scale)", fontsize=8)
    ax_speed.set_xlabel("higher is better (log scale)", fontsize=8)
    fig.suptitle("medattn-fast vs the originals, same weights, float32", fontsize=10.5, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    _footer(fig, data.get("environment", {}), data.get("command", ""))
    return _save(fig, Path(out_dir) / f"{Path(results_json).stem}.png")


# ------------------------------------------------------------------------------------------------
# PAM peak memory against the map; loss curves
# ------------------------------------------------------------------------------------------------

def pam_memory_figure(series, env: Dict[str, str], command: str = ""):
    """One panel per ``(B, C, dtype, mode)`` of :func:`pam_memory_series`: peak MiB per provider
    against N (log-log), x ticks labelled with the maps. Returns the figure; each line's
    ``get_label()`` is its provider and ``get_xydata()`` its ``(N, MiB)`` points."""
    keys = sorted(series)
    fig, axes = plt.subplots(len(keys), 1, figsize=(7.5, 1.0 + 3.0 * len(keys)), squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        batch, channels, dtype, mode = key
        labels = {}
        for provider, pts in sorted(series[key].items()):
            ax.plot([n for n, _, _ in pts], [mib for _, _, mib in pts], marker="o", label=provider,
                    color=provider_color(provider), linestyle="--" if provider in ("torch", "sdpa") else "-")
            labels.update({n: spatial for n, spatial, _ in pts})
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sorted(labels), [labels[n] for n in sorted(labels)])
        ax.xaxis.set_minor_formatter(NullFormatter())
        _log_axis(ax.yaxis, "")
        ax.set_xlabel("feature map H×W (N = H·W positions, log scale)")
        ax.set_ylabel("peak memory (MiB, log scale)")
        ax.set_title(f"DANet PAM B={batch} C={channels}, {mode}, {dtype}", fontsize=9.5, loc="left")
        ax.grid(which="major", color="#dddddd", linewidth=0.6)
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    _footer(fig, env, command)
    return fig


def loss_curves_figure(records: Sequence[dict], env: Dict[str, str], command: str = ""):
    """One panel per :mod:`bench.loss_curves` record: the reference's and the fast network's loss
    per step (fast dashed), with their largest relative difference and the noise floor."""
    fig, axes = plt.subplots(len(records), 1, figsize=(7.5, 0.8 + 2.1 * len(records)), squeeze=False)
    for ax, r in zip(axes[:, 0], records):
        steps = range(len(r["reference_loss"]))
        ax.plot(steps, r["reference_loss"], color=provider_color("reference"), label="reference", linewidth=2)
        ax.plot(steps, r["fast_loss"], color=provider_color("fast"), label="fast", linestyle="--")
        noise = f", {r.get('dtype', 'float32')} noise {r['noise_rel_diff']:.1e}" if "noise_rel_diff" in r else ""
        ax.set_title(f"{r['model']}  B={r['batch']} {'x'.join(map(str, r['input']))}: "
                     f"max relative difference {r['max_rel_diff']:.1e}{noise}", fontsize=8.5, loc="left")
        ax.set_ylabel("loss")
        ax.grid(color="#eeeeee", linewidth=0.6)
        ax.legend(fontsize=7.5)
    axes[-1, 0].set_xlabel("training step")
    first = records[0] if records else {}
    fig.suptitle(f"Loss curves, fast network vs reference twin ({first.get('optimizer', '')}, "
                 f"{first.get('dtype', 'float32')})", fontsize=10, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    _footer(fig, env, command)
    return fig


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

def make_figures(results: Path, out: Path, device_filter: Optional[str] = None) -> List[Path]:
    """Write every figure the results under ``results`` allow into ``out``; returns the paths."""
    written: List[Path] = []
    for f in load_results(results, device_filter):
        stem = f.path.stem
        if f.records:  # bench.loss_curves
            written.append(_save(loss_curves_figure(f.records, f.environment, f.command), out / f"{stem}.png"))
            continue
        if headline_pairs(f.rows) and all(r["provider"] in ("original", "fast") for r in f.rows):
            written.append(headline_figure(f.path, out))
            continue
        ops = list(dict.fromkeys(r["op"] for r in f.rows))
        families = [(op, [op]) for op in ops if op not in MODEL_OPS]
        if any(op in MODEL_OPS for op in ops):
            families.append(("models", [op for op in ops if op in MODEL_OPS]))
        for name, members in families:
            for reference in ("reference", "original"):
                groups = speedup_groups(f.rows, members, reference)
                if groups:
                    fig = speedup_figure(f"Speed vs the {reference}: {name}", groups, f.environment, f.command)
                    written.append(_save(fig, out / f"speedup_{name}__{stem}.png"))
        series = pam_memory_series(f.rows)
        if any(len(pts) > 1 for provs in series.values() for pts in provs.values()):  # a curve, not a point
            written.append(_save(pam_memory_figure(series, f.environment, f.command), out / f"pam_memory__{stem}.png"))
    return written


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"), help="directory of results JSON files")
    ap.add_argument("--out", default=str(ROOT / "bench" / "figures"), help="directory for the PNG files")
    ap.add_argument("--device-filter", default=None, help="only results whose device or file name contains this")
    args = ap.parse_args(argv)
    written = make_figures(Path(args.results), Path(args.out), args.device_filter)
    for path in written:
        print(f"wrote {path}")
    if not written:
        print(f"no figures: no matching results under {args.results}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
