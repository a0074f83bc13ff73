"""bench/plot.py: the README figures from results records, drawn without a plotting library.

The PNGs are decoded here (signature, IHDR, zlib IDAT, filter bytes) and the bars measured in
pixels: on the log axis a bar's length must be proportional to |log(speed ratio)|.
"""
import json
import math
import struct
import zlib

import numpy as np
import pytest
import torch

from bench import plot
from bench._raster import FONT, Canvas, text_size
from medattn_fast.png import encode_png

ENV = {"torch": "2.13.0+cpu", "triton": "3.9.0", "device": "cpu:x86_64", "threads": "2", "python": "3.11.7",
       "machine": "x86_64", "cpus": "2"}


def decode_png(data: bytes) -> np.ndarray:
    """RGB pixels of a PNG as medattn_fast.png writes it (8-bit RGB, filter 0 rows, no interlace)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height, depth, color_type, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, color_type, interlace) == (8, 2, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    rows = np.frombuffer(raw, np.uint8).reshape(height, 1 + 3 * width)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape(height, width, 3)


def _extent(pixels: np.ndarray, color) -> tuple:
    """(x0, x1, y0, y1) half-open bounding box of the pixels of exactly ``color``."""
    ys, xs = np.nonzero((pixels == np.array(color, np.uint8)).all(-1))
    assert len(xs), f"no pixel of colour {color}"
    return xs.min(), xs.max() + 1, ys.min(), ys.max() + 1


def _rows(op, shape, reference_ms, provider_ms, mode="fwd+bwd", peak=None):
    rows = [dict(op=op, shape=shape, device="cpu", dtype="float32", mode=mode, provider="reference",
                 median_ms=reference_ms, peak_mib=None if peak is None else peak["reference"], max_err=0.0,
                 tflops=None, status="ok", extra={})]
    for name, ms in provider_ms.items():
        rows.append(dict(op=op, shape=shape, device="cpu", dtype="float32", mode=mode, provider=name,
                         median_ms=ms, peak_mib=None if peak is None else peak.get(name), max_err=1e-7,
                         tflops=None, status="ok" if ms else "unavailable: needs CUDA", extra={}))
    return rows


def test_bar_lengths_follow_the_log_of_the_speed_ratios():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    reference_ms = float(torch.empty(()).uniform_(5.0, 50.0, generator=gen))
    # log-ratios apart enough that a linear axis would give very different lengths
    logs = {"torch": float(torch.empty(()).uniform_(0.4, 1.0, generator=gen)),
            "cpp": float(torch.empty(()).uniform_(1.6, 2.4, generator=gen)),
            "compile": -float(torch.empty(()).uniform_(0.5, 1.2, generator=gen))}
    provider_ms = {name: reference_ms / math.exp(v) for name, v in logs.items()}
    provider_ms["triton"] = None  # an unavailable provider: listed, no bar
    groups = plot.speedup_groups(_rows("synthetic", "S B=1 7x11", reference_ms, provider_ms))
    assert len(groups) == 1 and [b.provider for b in groups[0].bars] == ["torch", "cpp", "compile", "triton"]
    pixels, boxes = plot.draw_speedups("Speed vs the reference: synthetic", plot.environment_line(ENV), groups)
    data = encode_png(pixels)
    (width, height) = struct.unpack(">II", data[16:24])
    assert (height, width) == pixels.shape[:2]
    decoded = decode_png(data)
    np.testing.assert_array_equal(decoded, pixels)

    extents = {name: _extent(decoded, plot.provider_color(name)) for name in logs}
    lengths = {name: e[1] - e[0] for name, e in extents.items()}
    # bars start at the 1x line: faster ones to its right, the slower one to its left
    baseline = extents["torch"][0]
    assert extents["cpp"][0] == baseline and extents["compile"][1] == baseline
    # length ∝ |log ratio| (±2 px of rounding at each end)
    per_unit = lengths["cpp"] / logs["cpp"]
    for name in ("torch", "compile"):
        assert abs(lengths[name] - per_unit * abs(logs[name])) <= 2.5, (name, lengths, logs)
    assert {b.provider for b in boxes} == set(logs)
    for box in boxes:
        assert (box.x0, box.x1) == tuple(extents[box.provider][:2])
        assert box.ratio == pytest.approx(math.exp(logs[box.provider]))
    # the unavailable provider has no bar anywhere
    assert not (decoded == np.array(plot.provider_color("triton"), np.uint8)).all(-1).any()


def test_pam_memory_series_parses_maps_and_skips_missing_peaks():
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
    assert panel["reference"][1][2] == pytest.approx(48 ** 4 / 2**16)
    pixels, (frame,) = plot.draw_pam_memory("PAM", plot.environment_line(ENV), series)
    assert pixels.dtype == np.uint8 and pixels.ndim == 3
    x0, y0, x1, y1 = frame
    area = pixels[y0:y1, x0:x1]
    # log-log axes: the reference (N² bytes) must rise twice as steeply as cpp (N bytes)
    slopes = {}
    for name in ("reference", "cpp"):
        ys, xs = np.nonzero((area == np.array(plot.provider_color(name), np.uint8)).all(-1))
        left, right = xs < xs.min() + 4, xs > xs.max() - 4   # the two end markers
        slopes[name] = (ys[left].mean() - ys[right].mean()) / (xs[right].mean() - xs[left].mean())
    assert slopes["reference"] / slopes["cpp"] == pytest.approx(2.0, rel=0.1)


def test_cli_writes_decodable_figures_with_device_in_the_title(tmp_path):
    results, out = tmp_path / "results", tmp_path / "figures"
    results.mkdir()
    rows = _rows("position_attention", "PAM B=2 C=64 48x48", 40.0, {"cpp": 20.0}, peak={"reference": 80.0, "cpp": 3.0})
    rows += _rows("models", "DAUNet B=2 64x64 train", 300.0, {"fast": 200.0})
    (results / "cpu-x86-64-torch2.13.0-cpu-triton3.9.0__position.json").write_text(
        json.dumps({"environment": ENV, "command": "python -m bench.run --op position", "date": "", "rows": rows}))
    curve = [float(v) for v in torch.linspace(2.0, 1.0, 5)]
    record = {"model": "DAUNet", "config": "", "batch": 2, "input": [1, 32, 32], "classes": 3, "steps": 5,
              "optimizer": "SGD lr=0.01 momentum=0.9", "dtype": "float32", "reference_loss": curve,
              "fast_loss": curve, "max_rel_diff": 0.0, "max_rel_diff_step": 0, "reference_s": 1.0, "fast_s": 1.0}
    (results / "cpu-x86-64-torch2.13.0-cpu-triton3.9.0__loss_curves.json").write_text(
        json.dumps({"environment": ENV, "command": "", "date": "", "records": [record]}))
    assert plot.main(["--results", str(results), "--out", str(out), "--device-filter", "no-such-device"]) == 1
    assert plot.main(["--results", str(results), "--out", str(out), "--device-filter", "cpu"]) == 0
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["loss_curves__cpu-x86-64-torch2.13.0-cpu-triton3.9.0.png",
                     "pam_memory__cpu-x86-64-torch2.13.0-cpu-triton3.9.0.png",
                     "speedup_models__cpu-x86-64-torch2.13.0-cpu-triton3.9.0__position.png",
                     "speedup_position_attention__cpu-x86-64-torch2.13.0-cpu-triton3.9.0__position.png"]
    for name in names:
        decode_png((out / name).read_bytes())
    # the subtitle (device and versions) is drawn: compare with the same text drawn alone
    figure = decode_png((out / names[3]).read_bytes())
    line = plot.environment_line(ENV)
    assert "torch 2.13.0+cpu" in line and "triton 3.9.0" in line and line.startswith("cpu:x86_64")
    w, h = text_size(line, plot.SCALE)
    alone = Canvas(w, h)
    alone.text(0, 0, line, color=(70, 70, 70), scale=plot.SCALE)
    y = 12 + plot.LINE_H
    np.testing.assert_array_equal(figure[y:y + h, 12:12 + w], alone.pixels)


def test_font_has_the_figure_symbols_and_unknown_characters_fall_back():
    for ch in "0123456789azAZ.,:×x%/-+()=²·":
        assert ch in FONT and FONT[ch].shape == (8, 5)
    a, b = Canvas(20, 20), Canvas(20, 20)
    a.text(0, 0, "€")
    b.text(0, 0, "?")
    np.testing.assert_array_equal(a.pixels, b.pixels)
