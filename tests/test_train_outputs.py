"""What ``medattn-fast train`` writes for a person to read: the labelled snapshot and the progress
plot (matplotlib), the fallback without matplotlib (said once), and ``--tensorboard DIR``."""
from __future__ import annotations

import json
import struct
import sys

import numpy as np
import pytest

import medattn_fast.train as T
from medattn_fast import train_figures

from test_train import tiny_config

TWO_GATES = {"channels": (4, 8, 16), "strides": (2, 2)}


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.mark.skipif(not train_figures.matplotlib_available(), reason="matplotlib not installed")
def test_labelled_snapshot_and_progress_plot(tmp_path):
    result = T.train(tiny_config(tmp_path, steps=4, snapshot_every=2, model_kwargs=dict(TWO_GATES)))
    out = tmp_path / "run"
    assert result.step == 4
    # 3 panels + 2 gate levels at 2.6 in each (+0.6 in for the colour bars), 100 dpi
    assert _png_size(out / "snapshot_0000002.png") == (1360, 320)
    assert _png_size(out / "snapshot_0000004.png") == (1360, 320)
    assert _png_size(out / "progress.png") == (800, 550)


@pytest.mark.skipif(not train_figures.matplotlib_available(), reason="matplotlib not installed")
@pytest.mark.parametrize("dims", [2, 3])
def test_snapshot_figure_names_every_panel(dims):
    rng = np.random.default_rng(0)
    size = (16, 16) if dims == 2 else (6, 16, 16)
    half = tuple(s // 2 for s in size)
    label = rng.integers(0, 3, size)
    figure = train_figures.snapshot_figure(rng.normal(size=(1, *size)), label, label, [rng.random((1, *size)),
                                           rng.random((1, *half))], num_classes=3, step=7, dice=0.5)
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    where = " (slice 3 of 6)" if dims == 3 else ""
    res = "×".join(map(str, size))
    res_half = "×".join(map(str, half))
    assert titles == [f"image, channel 0{where}", "label", "prediction (Dice 0.500)", f"gate level 1: α {res}",
                      f"gate level 2: α {res_half}"]
    assert figure._suptitle.get_text() == "step 7"
    legend = [t.get_text() for ax in figure.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert legend == ["class 0", "class 1", "class 2"]
    # the α panels show the slice at the middle one's relative depth, on a fixed 0..1 scale
    alpha_image = figure.axes[3].get_images()[0]
    assert alpha_image.get_clim() == (0.0, 1.0)


@pytest.mark.skipif(not train_figures.matplotlib_available(), reason="matplotlib not installed")
def test_progress_figure_plots_the_log():
    records = [{"step": s, "loss": 1.0 / s, "dice": 0.1 * s, "images_per_s": 3.0 + s} for s in range(1, 6)]
    figure = train_figures.progress_figure(records)
    lines = {line.get_label(): line for ax in figure.axes for line in ax.get_lines()}
    loss, dice = lines["loss (CE + soft Dice)"], lines["Dice (foreground, batch)"]
    np.testing.assert_allclose(loss.get_xdata(), [1, 2, 3, 4, 5])
    np.testing.assert_allclose(loss.get_ydata(), [r["loss"] for r in records])
    np.testing.assert_allclose(dice.get_ydata(), [r["dice"] for r in records])


def test_without_matplotlib_the_strip_and_one_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_figures, "matplotlib_available", lambda: False)
    monkeypatch.setattr(T, "_told_without_matplotlib", False)
    T.train(tiny_config(tmp_path, steps=3, snapshot_every=1, model_kwargs=dict(TWO_GATES)))
    err = capsys.readouterr().err
    assert err.count("matplotlib is not installed") == 1
    out = tmp_path / "run"
    assert not (out / "progress.png").exists()
    # input, label, prediction, two attention maps: 16 px panels, 2 px gaps
    assert _png_size(out / "snapshot_0000003.png") == (5 * 16 + 4 * 2, 16)


def test_tensorboard_scalars_and_images(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard not installed (pip install \"medattn-fast[tensorboard]\")")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = tmp_path / "tb"
    T.train(tiny_config(tmp_path, steps=2, snapshot_every=2, model_kwargs=dict(TWO_GATES), tensorboard=str(board)))
    events = EventAccumulator(str(board), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    for name in ("loss", "dice", "images_per_s"):
        written = events.Scalars(f"train/{name}")
        assert [e.step for e in written] == [1, 2]
        np.testing.assert_allclose([e.value for e in written], [r[name] for r in log], rtol=1e-6)
    assert set(events.Tags()["images"]) == {"snapshot/image", "snapshot/label", "snapshot/prediction",
                                            "snapshot/attention_level_1", "snapshot/attention_level_2"}
    assert events.Images("snapshot/attention_level_2")[0].width == 8


def test_tensorboard_without_the_package_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ValueError, match="--tensorboard needs the tensorboard package"):
        T.train(tiny_config(tmp_path, steps=1, tensorboard=str(tmp_path / "tb")))
