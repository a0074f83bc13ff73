r"""Draw the README figures (PNG) from the committed benchmark results, without a plotting library.

    python -m bench.plot [--results bench/results] [--out bench/figures] [--device-filter STR]

Inputs are the ``bench/results/*.json`` files of :mod:`bench.run` (``{"environment", "command",
"date", "rows": [Row, ...]}``, rows as :class:`bench.harness.Row`) and of :mod:`bench.loss_curves`
(``{"environment", ..., "records": [...]}``). ``--device-filter`` keeps the files whose device
(``environment["device"]``) or file name contains the string. Figures, one PNG each:

* ``speedup_<op>__<results file>.png`` — per op family (all ops but the whole-model ones) and per
  results file: one group of horizontal bars per ``(shape, dtype, mode)``, one bar per provider, its
  speed relative to the case's reference provider, ``s = t_reference / t_provider``. The axis is
  logarithmic and the bars start at ``s = 1``: a bar's length is ``|log s|`` (to the right: faster,
  to the left: slower), so 4× is twice as long as 2×, and 0.5× as long as 2×. Each bar is labelled
  with ``s``; providers that could not run (``unavailable``/``error`` rows) are listed as such.
* ``speedup_models__<results file>.png`` — the same for the whole-network rows (ops ``models``,
  ``mtunet_model``, ``attention_unet_model``: ``bench/cases_models.py``,
  ``cases_mtunet_model.py``, ``cases_attention_unet_model.py``).
* ``pam_memory__<device key>.png`` — DANet PAM (``position_attention`` rows whose shape reads
  ``PAM B=.. C=.. HxW``) peak memory of each provider against the map, one panel per
  ``(B, C, dtype, mode)``: x is the number of positions N = H·W (the map's side squared; labelled
  with the map, log scale), y the peak MiB (log scale) — the N×N matrix makes the reference's curve
  twice as steep as an O(N) provider's.
* ``loss_curves__<device key>[__float64].png`` — the 20-step loss curves of each network and its
  reference twin (:mod:`bench.loss_curves`), with their largest relative difference.

Each figure's title names the device and the versions (torch, triton, CUDA) from the records.
Drawing is :mod:`bench._raster` (rectangles, lines, a 5×7 bitmap font at 2×) and
:func:`medattn_fast.png.write_png`.
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

import numpy as np

from bench._raster import BLACK, CELL_H, CELL_W, WHITE, Canvas, Color, log_ticks, text_size

ROOT = Path(__file__).resolve().parent.parent
MODEL_OPS = ("models", "mtunet_model", "attention_unet_model")
SCALE = 2  # font pixels -> image pixels
CHAR_W, LINE_H = CELL_W * SCALE, CELL_H * SCALE

GREY: Color = (150, 150, 150)
LIGHT: Color = (228, 228, 228)
# fixed colours for the providers the cases use; others cycle through _EXTRA
PROVIDER_COLORS: Dict[str, Color] = {
    "reference": (120, 120, 120), "torch": (31, 119, 180), "compile": (255, 127, 14), "auto": (44, 160, 44),
    "cpp": (214, 39, 40), "triton": (148, 103, 189), "cuda": (140, 86, 75), "sdpa": (227, 119, 194),
    "flex": (188, 189, 34), "fast": (23, 190, 207), "models": (0, 110, 110),
}
_EXTRA: Tuple[Color, ...] = ((60, 60, 160), (160, 60, 60), (60, 140, 60), (180, 140, 0))


def provider_color(name: str) -> Color:
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

    @property
    def device_key(self) -> str:
        """The device-and-versions part of the file name (``bench.run``'s key)."""
        return self.path.stem.split("__")[0]


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
# figure (a)/(b): speedup bars
# ------------------------------------------------------------------------------------------------

def ratio_label(s: float) -> str:
    return f"{s:.2f}×" if s < 10 else (f"{s:.1f}×" if s < 100 else f"{s:.0f}×")


def format_ms(ms: float) -> str:
    return f"{ms:.0f} ms" if ms >= 100 else f"{ms:.3g} ms"


def format_tick(v: float) -> str:
    """Axis numbers without exponents: 2000, 150, 1.5, 0.02."""
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def _short_status(status: str) -> str:
    return "unavailable" if status.startswith("unavailable") else ("error" if status.startswith("error") else status)


@dataclass
class BarBox:
    """Where a bar was drawn: pixel box ``[x0, x1) × [y0, y1)`` (for tests and callers)."""

    group: int
    provider: str
    ratio: float
    x0: int
    x1: int
    y0: int
    y1: int


def draw_speedups(title: str, subtitle: str, groups: Sequence[Group], *, plot_width: int = 520,
                  bar_height: int = 16) -> Tuple[np.ndarray, List[BarBox]]:
    """The bar chart of ``groups`` (see the module docstring): ``(pixels uint8 (H, W, 3), boxes)``."""
    ratios = [b.ratio for g in groups for b in g.bars if b.ratio]
    low = min(ratios + [1.0]) / 1.25
    high = max(ratios + [1.0]) * 1.25
    lo, hi = math.log10(low), math.log10(high)
    names = [b.provider for g in groups for b in g.bars] + ["provider"]
    label_w = max(len(n) for n in names) * CHAR_W + 16
    right_w = 11 * CHAR_W  # "unavailable" or a ratio label past the right end
    headings = [f"{g.shape}  {g.mode}  {g.dtype}  (reference {format_ms(g.reference_ms)})" for g in groups]
    left = 12
    width = max(left + label_w + plot_width + right_w + 12,
                max([text_size(t, SCALE)[0] for t in headings + [title, subtitle]] + [0]) + 2 * left)
    row_h = bar_height + 6
    axis_top = 12 + 2 * LINE_H + 8 + LINE_H + 6  # title, subtitle, gap, tick labels, gap
    body = sum(LINE_H + 6 + len(g.bars) * row_h + 10 for g in groups)
    height = axis_top + body + LINE_H + 10 + LINE_H + 12
    canvas = Canvas(width, height)
    canvas.text(left, 12, title, scale=SCALE)
    canvas.text(left, 12 + LINE_H, subtitle, color=(70, 70, 70), scale=SCALE)
    x_plot = left + label_w

    def xpos(s: float) -> int:
        return int(round(x_plot + (math.log10(s) - lo) / (hi - lo) * plot_width))

    # vertical grid at 1-2-5 ticks over the whole body; tick labels above and below
    body_top, body_bottom = axis_top, axis_top + body
    ticks = log_ticks(low, high)
    if len(ticks) < 4:  # a narrow range: denser ticks
        ticks = log_ticks(low, high, (1, 1.5, 2, 3, 5, 7))
    taken: List[Tuple[float, float]] = []  # label extents; powers of ten get theirs first
    for t in sorted(ticks, key=lambda v: (abs(math.log10(v) - round(math.log10(v))) > 1e-9, v)):
        x = xpos(t)
        canvas.rect(x, body_top, x + 1, body_bottom, LIGHT)
        label = f"{t:g}×"
        half = text_size(label, SCALE)[0] / 2 + CHAR_W / 2
        if any(a < x + half and x - half < b for a, b in taken):
            continue  # the grid line stays, the label would overlap a neighbour's
        taken.append((x - half, x + half))
        canvas.text(x, axis_top - LINE_H - 2, label, color=(90, 90, 90), scale=SCALE, anchor="center")
        canvas.text(x, body_bottom + 4, label, color=(90, 90, 90), scale=SCALE, anchor="center")
    one = xpos(1.0)
    canvas.rect(one, body_top, one + 2, body_bottom, BLACK)
    boxes: List[BarBox] = []
    y = body_top + 4
    for gi, (g, heading) in enumerate(zip(groups, headings)):
        hw, _ = text_size(heading, SCALE)
        canvas.rect(left - 4, y - 3, left + hw + 4, y + LINE_H - 2, WHITE)  # the heading over the grid lines
        canvas.text(left, y, heading, scale=SCALE)
        y += LINE_H + 6
        for bar in g.bars:
            canvas.text(x_plot - 8, y + (bar_height - 7 * SCALE) // 2 + 1, bar.provider, scale=SCALE, anchor="right")
            ty = y + (bar_height - 7 * SCALE) // 2 + 1
            if bar.ratio is None:
                canvas.text(one + 6, ty, _short_status(bar.status), color=GREY, scale=SCALE)
            else:
                end = xpos(bar.ratio)
                x0, x1 = (one, end) if end >= one else (end, one)
                canvas.rect(x0, y, x1, y + bar_height, provider_color(bar.provider))
                boxes.append(BarBox(gi, bar.provider, bar.ratio, x0, x1, y, y + bar_height))
                tx = (x1 + 6) if end >= one else (one + 6)
                canvas.text(tx, ty, ratio_label(bar.ratio), scale=SCALE)
            y += row_h
        y += 10
    caption = f"speed vs '{groups[0].reference if groups else 'reference'}' = its time / the provider's (log scale)"
    canvas.text(left, body_bottom + 4 + LINE_H + 6, caption, color=(70, 70, 70), scale=SCALE)
    return canvas.pixels, boxes


# ------------------------------------------------------------------------------------------------
# figure (c): PAM peak memory against the map
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


def _log_range(values: Sequence[float], pad: float = 1.6) -> Tuple[float, float]:
    low, high = min(values), max(values)
    return low / pad, high * pad


def draw_line_panels(title: str, subtitle: str, panels: Sequence[Tuple[str, Dict[str, List[Tuple[float, float]]]]],
                     *, x_log: bool, y_log: bool, x_labels: Optional[Dict[float, str]] = None,
                     x_name: str = "", y_name: str = "", styles: Optional[Dict[str, str]] = None,
                     plot_w: int = 560, plot_h: int = 240) -> Tuple[np.ndarray, List[Tuple[int, int, int, int]]]:
    """Stacked line/point panels: each ``(heading, {series: [(x, y), ...]})``, a legend at the right.
    ``x_labels`` names chosen x values (tick labels); ``styles[series]`` ``"dashed"`` draws it dashed.
    Returns ``(pixels, frames)``, ``frames[i] = (x0, y0, x1, y1)`` the plot area of panel i."""
    styles = styles or {}
    series_names = sorted({s for _, panel in panels for s in panel})
    legend_w = max([len(s) + 4 for s in series_names] + [len(y_name) + 4]) * CHAR_W
    left, y_axis_w = 12, 9 * CHAR_W
    width = max(left + y_axis_w + plot_w + 24 + legend_w + 12,
                max(text_size(t, SCALE)[0] for t in (title, subtitle)) + 2 * left)
    panel_h = LINE_H + 8 + plot_h + LINE_H + 8 + LINE_H + 16
    height = 12 + 2 * LINE_H + 12 + len(panels) * panel_h
    canvas = Canvas(width, height)
    canvas.text(left, 12, title, scale=SCALE)
    canvas.text(left, 12 + LINE_H, subtitle, color=(70, 70, 70), scale=SCALE)
    top = 12 + 2 * LINE_H + 12
    frames = []
    for heading, panel in panels:
        canvas.text(left, top, heading, scale=SCALE)
        px0, py0 = left + y_axis_w, top + LINE_H + 8
        px1, py1 = px0 + plot_w, py0 + plot_h
        frames.append((px0, py0, px1 + 1, py1 + 1))
        xs = [x for pts in panel.values() for x, _ in pts]
        ys = [y for pts in panel.values() for _, y in pts]
        fx = (math.log10 if x_log else float)
        fy = (math.log10 if y_log else float)
        if x_log:
            xa, xb = (fx(v) for v in _log_range(xs, 1.4))
        else:
            span = (max(xs) - min(xs)) or 1.0
            xa, xb = min(xs) - 0.04 * span, max(xs) + 0.04 * span
        if y_log:
            ylow, yhigh = _log_range(ys)
            ya, yb = fy(ylow), fy(yhigh)
        else:
            span = (max(ys) - min(ys)) or max(abs(max(ys)), 1e-12)
            ylow, yhigh = min(ys) - 0.08 * span, max(ys) + 0.08 * span
            ya, yb = ylow, yhigh

        def px(x: float) -> float:
            return px0 + (fx(x) - xa) / (xb - xa) * plot_w

        def py(y: float) -> float:
            return py1 - (fy(y) - ya) / (yb - ya) * plot_h

        # y grid and labels
        yticks = log_ticks(ylow, yhigh) if y_log else list(np.linspace(ylow, yhigh, 5))
        if y_log and len(yticks) > 8:
            yticks = log_ticks(ylow, yhigh, (1,))
        for t in yticks:
            y = py(t)
            canvas.rect(px0, y, px1, y + 1, LIGHT)
            canvas.text(px0 - 6, y - 7, format_tick(t), color=(90, 90, 90), scale=SCALE, anchor="right")
        # x ticks: the labelled values, else a few evenly spaced ones
        if x_labels:
            xticks = sorted(x_labels)
        elif all(float(x).is_integer() for x in xs):  # steps: whole numbers, about 5 of them
            every = max(1, int(math.ceil((max(xs) - min(xs)) / 5)))
            xticks = sorted(set(range(int(min(xs)), int(max(xs)) + 1, every)) | {int(max(xs))})
        else:
            xticks = list(np.linspace(min(xs), max(xs), min(6, len(set(xs)))))
        for t in xticks:
            if t not in xs and x_labels:
                continue
            x = px(t)
            canvas.rect(x, py0, x + 1, py1, LIGHT)
            label = x_labels[t] if x_labels else format_tick(t)
            canvas.text(x, py1 + 6, label, color=(90, 90, 90), scale=SCALE, anchor="center")
        canvas.rect(px0, py0, px0 + 1, py1 + 1, BLACK)
        canvas.rect(px0, py1, px1 + 1, py1 + 1, BLACK)
        canvas.text(px0, py1 + 6 + LINE_H + 4, x_name, color=(70, 70, 70), scale=SCALE)
        canvas.text(px1 + 24, py1 - LINE_H, f"y: {y_name}", color=(70, 70, 70), scale=SCALE)
        # dashed series last: drawn over the solid ones they may coincide with
        for name in sorted(series_names, key=lambda n: styles.get(n) == "dashed"):
            pts = panel.get(name)
            if not pts:
                continue
            color = provider_color(name)
            draw = canvas.dashed_line if styles.get(name) == "dashed" else canvas.line
            for (xa_, ya_), (xb_, yb_) in zip(pts, pts[1:]):
                draw(px(xa_), py(ya_), px(xb_), py(yb_), color, width=2)
            for x, y in pts:
                canvas.marker(px(x), py(y), color, size=7 if styles.get(name) != "dashed" else 9,
                              shape="square" if styles.get(name) != "dashed" else "diamond")
        ly = py0
        for name in series_names:
            if name not in panel:
                continue
            canvas.rect(px1 + 24, ly + 3, px1 + 24 + 2 * CHAR_W, ly + 11, provider_color(name))
            canvas.text(px1 + 24 + 3 * CHAR_W, ly, name, scale=SCALE)
            ly += LINE_H + 2
        top += panel_h
    return canvas.pixels, frames


def draw_pam_memory(title: str, subtitle: str, series) -> Tuple[np.ndarray, List[Tuple[int, int, int, int]]]:
    """The PAM memory panels of :func:`pam_memory_series`' output: ``(pixels, plot frames)``."""
    panels, labels = [], {}
    for (batch, channels, dtype, mode), provs in sorted(series.items()):
        panel = {p: [(float(n), mib) for n, _, mib in pts] for p, pts in provs.items()}
        for pts in provs.values():
            labels.update({float(n): spatial for n, spatial, _ in pts})
        panels.append((f"PAM B={batch} C={channels}  {mode}  {dtype}", panel))
    return draw_line_panels(title, subtitle, panels, x_log=True, y_log=True, x_labels=labels,
                            x_name="map (N = H·W positions, log)", y_name="peak MiB (log)")


def draw_loss_curves(title: str, subtitle: str, records: Sequence[dict]) -> Tuple[np.ndarray, list]:
    """One panel per :mod:`bench.loss_curves` record: both curves (fast dashed): ``(pixels, frames)``."""
    panels = []
    for r in records:
        panel = {"reference": [(float(t), v) for t, v in enumerate(r["reference_loss"])],
                 "fast": [(float(t), v) for t, v in enumerate(r["fast_loss"])]}
        noise = f"  ({r.get('dtype', 'float32')} noise {r['noise_rel_diff']:.1e})" if "noise_rel_diff" in r else ""
        panels.append((f"{r['model']}  B={r['batch']} {'x'.join(map(str, r['input']))}  "
                       f"max rel diff {r['max_rel_diff']:.1e}{noise}", panel))
    return draw_line_panels(title, subtitle, panels, x_log=False, y_log=False, x_name="step",
                            y_name="loss", styles={"fast": "dashed"}, plot_h=150)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def make_figures(results: Path, out: Path, device_filter: Optional[str] = None) -> List[Path]:
    """Write every figure the results under ``results`` allow into ``out``; returns the paths."""
    from medattn_fast.png import write_png

    out.mkdir(parents=True, exist_ok=True)
    written: List[Path] = []
    files = load_results(results, device_filter)
    pam_rows: Dict[str, Tuple[ResultFile, List[dict]]] = {}
    for f in files:
        env = environment_line(f.environment)
        if f.records:  # bench.loss_curves
            dtype = f.records[0].get("dtype", "float32")
            pixels, _ = draw_loss_curves(f"Loss curves, fast network vs reference twin ({f.records[0]['steps']} steps, "
                                      f"{f.records[0]['optimizer']}, {dtype})", env, f.records)
            suffix = "" if dtype == "float32" else f"__{dtype}"
            written.append(write_png(out / f"loss_curves__{f.device_key}{suffix}.png", pixels))
            continue
        ops = list(dict.fromkeys(r["op"] for r in f.rows))
        families = [(op, [op]) for op in ops if op not in MODEL_OPS]
        if any(op in MODEL_OPS for op in ops):
            families.append(("models", [op for op in ops if op in MODEL_OPS]))
        for name, members in families:
            groups = speedup_groups(f.rows, members)
            if not groups:
                continue
            pixels, _ = draw_speedups(f"Speed vs the reference: {name}", env, groups)
            written.append(write_png(out / f"speedup_{name}__{f.path.stem}.png", pixels))
        pam_rows.setdefault(f.device_key, (f, []))[1].extend(f.rows)
    for key, (f, rows) in pam_rows.items():
        series = pam_memory_series(rows)
        if series:
            pixels, _ = draw_pam_memory("DANet PAM peak memory vs map size", environment_line(f.environment), series)
            written.append(write_png(out / f"pam_memory__{key}.png", pixels))
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
