"""bench/headline.py, the `make bench` set: rows, summary and progress on toy cases (the real
networks take minutes; `make bench` runs them)."""
import io

import torch

from bench import headline

CPU = torch.device("cpu")


def _toy(label, original, fast, budget=0.05):
    def setup(device, dtype):
        x = torch.randn(256, 512, device=device, dtype=dtype, requires_grad=True)
        return (x,), {"original": original, "fast": fast}
    return headline.HeadlineCase(label, "256x512", setup, budget, "toy")


def test_rows_summary_and_progress_of_two_cases_and_a_failing_one():
    def broken(x):
        raise RuntimeError("no such kernel")

    cases = [_toy("square", lambda x: x * x, lambda x: x.pow(2)),
             _toy("off by one", lambda x: x * 2, lambda x: x * 2 + 1),
             _toy("broken", lambda x: x, broken)]
    stream = io.StringIO()
    progress = headline.Progress([c.budget_s for c in cases], stream=stream)
    rows = headline.run(CPU, cases, progress=progress)
    progress.finish()
    lines = stream.getvalue().splitlines()
    assert [line.split("  ")[-1] for line in lines] == ["square 256x512", "off by one 256x512", "broken 256x512"]
    assert lines[0].startswith("[....................] 1/3") and "ETA" in lines[0]
    by = {(r.extra["label"], r.provider): r for r in rows}
    assert by["square", "fast"].max_err == 0.0 and by["square", "fast"].median_ms > 0
    assert abs(by["off by one", "fast"].max_err - 1.0) < 1e-6
    assert by["off by one", "original"].extra["calls"] >= 2
    assert by["broken", "fast"].status.startswith("error: RuntimeError: no such kernel")
    summary = headline.summary_lines(rows)
    assert len(summary) == 2 + 3
    square = next(line for line in summary if line.startswith("square"))
    speed = by["square", "original"].median_ms / by["square", "fast"].median_ms
    assert f"{speed:.2f}x" in square and "0e+00" in square
    assert "error: RuntimeError" in next(line for line in summary if line.startswith("broken"))


def test_headline_set_has_every_network_and_each_op_family_once():
    cases = headline.headline_cases(CPU)
    labels = [c.label for c in cases]
    assert len(labels) == len(set(labels)) == 11
    for name in ("DANet head", "MT-UNet", "AttU_Net", "Oktay", "MONAI"):
        assert any(label.startswith(name) for label in labels), name
    assert sorted(c.family for c in cases[5:]) == sorted(
        ["position_attention", "channel_attention", "gaussian_axial", "window", "external", "attention_gate"])
    assert all("train step" in c.shape for c in cases[:5])
    # a quiet 2-core CPU measures the whole set in about three minutes
    assert sum(c.budget_s for c in cases) <= 180


def test_unavailable_backends_name_a_reason_and_skip_the_usable_ones():
    missing = headline.unavailable_backends()
    assert "torch" not in missing and "reference" not in missing
    assert all(reason for reason in missing.values())
    if not torch.cuda.is_available():
        assert "cuda" in missing
