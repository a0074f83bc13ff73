"""bench/plot.py: the figures of the benchmark results, drawn with matplotlib.

The figures are checked through matplotlib's own objects (the bars' extents in data coordinates,
the lines' points, the axis scales and texts), and the written files through their PNG header.
"""
import json
import math
import struct

import matplotlib
import pytest
import torch

from bench import plot

ENV = {"torch": "2.13.0+cpu", "triton": "3.9.0", "device": "cpu:x86_64", "threads": "2", "python": "3.11.7",
       "machine": "x86_64", "cpus": "2"}


def _png_size(data: bytes):
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _rows(op, shape, reference_ms, provider_ms, mode="fwd+bwd", peak=None, reference="reference"):
    rows = [dict(op=op, shape=shape, device="cpu", dtype="float32", mode=mode, provider=reference,
                 median_ms=reference_ms, peak_mib=None if peak is None else peak[reference], max_err=0.0,
                 tflops=None, status="ok", extra={})]
    for name, ms in provider_ms.items():
        rows.append(dict(op=op, shape=shape, device="cpu", dtype="float32", mode=mode, provider=name,
                         median_ms=ms, peak_mib=None if peak is None else peak.get(name), max_err=1e-7,
                         tflops=None, status="ok" if ms else "unavailable: needs CUDA", extra={}))
    return rows


def _texts(fig):
    return [t.get_text() for ax in fig.axes for t in ax.texts] + [t.get_text() for t in fig.texts]


def test_speedup_bars_span_from_one_to_the_ratio_on_a_log_axis():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    reference_ms = float(torch.empty(()).uniform_(5.0, 50.0, generator=gen))
    logs = {"torch": float(torch.empty(()).uniform_(0.4, 1.0, generator=gen)),
            "cpp": float(torch.empty(()).uniform_(1.6, 2.4, generator=gen)),
            "compile": -float(torch.empty(()).uniform_(0.5, 1.2, generator=gen))}
    provider_ms = {name: reference_ms / math.exp(v) for name, v in logs.items()}
    provider_ms["triton"] = None  # an unavailable provider: named in the caption, no bar
    groups = plot.speedup_groups(_rows("synthetic", "S B=1 7x11", reference_ms, provider_ms))
    assert len(groups) == 1 and [b.provider for b in groups[0].bars] == ["torch", "cpp", "compile", "triton"]
    fig = plot.speedup_figure("Speed vs the reference: synthetic", groups, ENV, "python -m bench.run --op x")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    bars = {p.get_label(): p for p in ax.patches}
    assert sorted(bars) == ["compile", "cpp", "torch"]
    for name, log_ratio in logs.items():
        x0, x1 = sorted((bars[name].get_x(), bars[name].get_x() + bars[name].get_width()))
        ratio = math.exp(log_ratio)
        # faster bars run from 1x to the ratio, the slower one from the ratio to 1x
        assert (x0, x1) == pytest.approx((1.0, ratio) if ratio >= 1 else (ratio, 1.0), rel=1e-12)
        assert plot.ratio_label(ratio) in _texts(fig)
        assert matplotlib.colors.to_hex(bars[name].get_facecolor()) == plot.provider_color(name)
    texts = " ".join(_texts(fig))
    assert "triton" in texts and "unavailable" in texts
    assert plot.environment_line(ENV) in texts and "python -m bench.run --op x" in texts
    # readable ticks: plain numbers with a unit, no exponents
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert labels and all(label.endswith("×") and "e" not in label and "^" not in label for label in labels)
    plot.plt.close(fig)


def test_pam_memory_lines_carry_the_measured_points():
    rows = []
    for side in (32, 48):
        rows += _rows("position_attention", f"PAM B=2 C=64 {side}x{side}", 10.0, {"cpp": 5.0, "triton": None},
                      peak={"reference": side ** 4 / 2**16, "cpp": side ** 2 / 2**10})
    rows += _rows("position_attention", "seed001 B=2 C=64 64x64", 10.0, {"cpp": 5.0},
                  peak={"reference": 1.0, "cpp": 1.0})
    series = plot.pam_memory_series(rows)
    assert list(series) == [("2", "64", "float32", "fwd+bwd")]
    panel = series[("2", "64", "float32", "fwd+bwd")]
    assert sorted(panel) == ["cpp", "reference"]
    assert [(n, m) for n, m, _ in panel["reference"]] == [(1024, "32x32"), (2304, "48x48")]
    fig = plot.pam_memory_figure(series, ENV)
    ax = fig.axes[0]
    assert (ax.get_xscale(), ax.get_yscale()) == ("log", "log")
    lines = {line.get_label(): line.get_xydata() for line in ax.get_lines()}
    assert lines["reference"].tolist() == [[1024, 32 ** 4 / 2**16], [2304, 48 ** 4 / 2**16]]
    # on log-log axes the reference (N² bytes) rises twice as steeply as cpp (N bytes)
    slope = {k: math.log(v[1, 1] / v[0, 1]) / math.log(v[1, 0] / v[0, 0]) for k, v in lines.items()}
    assert slope["reference"] / slope["cpp"] == pytest.approx(2.0)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["32x32", "48x48"]
    plot.plt.close(fig)


def test_headline_figure_shows_each_speedup_and_memory_ratio(tmp_path):
    rows = []
    expected = {}
    for label, shape, o_ms, f_ms, o_mib, f_mib in (("MT-UNet", "B=1 3x224x224 train step", 4000.0, 1000.0, 900.0, 300.0),
                                                  ("position (DANet PAM)", "B=1 C=512 32x32", 20.0, 25.0, 64.0, 8.0)):
        for provider, ms, mib in (("original", o_ms, o_mib), ("fast", f_ms, f_mib)):
            rows.append(dict(op=label, shape=shape, device="cpu", dtype="float32", mode="fwd+bwd", provider=provider,
                             median_ms=ms, peak_mib=mib, max_err=0.0, tflops=None, status="ok",
                             extra={"label": label}))
        expected[f"{label}\n{shape}"] = (o_ms / f_ms, f_mib / o_mib)
    path = tmp_path / "headline_cpu.json"
    path.write_text(json.dumps({"environment": ENV, "command": "python -m bench.run", "date": "", "rows": rows}))
    assert [(k, s, m) for k, s, m in plot.headline_pairs(rows)] == [(k, *v) for k, v in expected.items()]
    png = plot.headline_figure(path, tmp_path / "figures")
    assert png.name == "headline_cpu.png" and min(_png_size(png.read_bytes())) > 200


def test_cli_writes_figures_named_after_the_results(tmp_path):
    results, out = tmp_path / "results", tmp_path / "figures"
    results.mkdir()
    rows = _rows("position_attention", "PAM B=2 C=64 48x48", 40.0, {"cpp": 20.0}, peak={"reference": 80.0, "cpp": 3.0})
    rows += _rows("position_attention", "PAM B=2 C=64 32x32", 20.0, {"cpp": 10.0}, peak={"reference": 20.0, "cpp": 1.5})
    rows += _rows("models", "DAUNet B=2 64x64 train", 300.0, {"fast": 200.0})
    (results / "position_cpu.json").write_text(
        json.dumps({"environment": ENV, "command": "python -m bench.run --op position", "date": "", "rows": rows}))
    curve = [float(v) for v in torch.linspace(2.0, 1.0, 5)]
    record = {"model": "DAUNet", "config": "", "batch": 2, "input": [1, 32, 32], "classes": 3, "steps": 5,
              "optimizer": "SGD lr=0.01 momentum=0.9", "dtype": "float32", "reference_loss": curve,
              "fast_loss": curve, "max_rel_diff": 0.0, "max_rel_diff_step": 0, "reference_s": 1.0, "fast_s": 1.0}
    (results / "loss_curves_cpu.json").write_text(
        json.dumps({"environment": ENV, "command": "", "date": "", "records": [record]}))
    assert plot.main(["--results", str(results), "--out", str(out), "--device-filter", "no-such-device"]) == 1
    assert plot.main(["--results", str(results), "--out", str(out), "--device-filter", "cpu"]) == 0
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["loss_curves_cpu.png", "pam_memory__position_cpu.png", "speedup_models__position_cpu.png",
                     "speedup_position_attention__position_cpu.png"]
    for name in names:
        width, height = _png_size((out / name).read_bytes())
        assert width > 300 and height > 150
