"""bench/gpu_check.sh, the one-call GPU check, dry-run on the CPU so that it cannot rot between GPU
sessions: MEDATTN_GPU_TEST_DEVICE=cpu runs the same stages (environment, background build, the
whole ``-m gpu`` selection with the Triton kernels interpreted, the headline timings at toy shapes,
the kernel list, the summary) and the summary must report what ran: no failed, errored or
uncollected test, every float16 case the interpreter refuses shown as a skip with the backend's
reason, every op family reached before the time limit.

One run of the script (its GPU_CHECK_LIMIT_S=300: about 150 s, the tests stage stopped at its 120 s
by a test at a model's shapes in the interpreter) checks all of it; the summary's parsing and the
dry run's refusal and order rules are checked on their own, in milliseconds.

The script needs bash and coreutils' ``timeout``; the figures of a dry run mean nothing.
"""
import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import medattn_fast
from bench import gpu_report
from medattn_fast.ops.position import position_attention

import conftest
from _tolerance import dry_run_dtype_refusal, dry_run_refusal

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"
INTERPRETER_REASON = "the Triton interpreter on CPU supports float32/bfloat16, got torch.float16"
INTERPRETER_REFUSAL = f"backend 'triton' cannot run this call: {INTERPRETER_REASON}"

needs_shell = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                 reason="needs bash and coreutils timeout")


@needs_shell
def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def _stage(summary: str, label: str) -> str:
    """The lines of one test stage of the summary (from its "label: ..." line to the next stage)."""
    start = summary.index(f"{label}: ")
    end = min(i for i in (summary.find("\ncuda-backend tests: ", start + 1), summary.find("\ntests passed: ", start))
              if i > 0)
    return summary[start:end]


@needs_shell
def test_dry_run_of_every_gpu_test_writes_every_stage_and_a_clean_summary(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    # the timing stage's auto rows measure the cpp backend: its extensions are built here, outside the
    # script's time limit, into the build folder the script's dry run reuses (this process's)
    from medattn_fast import _build

    for family in _build.families("cpu"):
        assert _build.unavailable_reason("cpu", family) is None, family
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_WORK": str(work), "MEDATTN_GPU_TEST_DEVICE": "cpu",
           "GPU_CHECK_LIMIT_S": "300", "PYTHON": sys.executable}
    env.pop("PYTHONPATH", None)   # the script sets PYTHONPATH=. itself, as on a bare GPU machine
    env.pop("GPU_CHECK_TESTS_K", None)   # the whole -m gpu selection
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=330, env=env,
                            cwd=str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files   # the device tool brings back 8 files at most
    for name in ("env.txt", "build.log", "tests.log", "headline.csv", "headline.log", "kernels.csv",
                 "summary.txt"):
        assert name in files, (name, files)

    summary = (out / "summary.txt").read_text()
    totals = re.search(r"^tests passed: (\d+); failed: (\d+); skipped: (\d+); collection errors: (\d+)$",
                       summary, re.M)
    assert totals, summary
    passed, failed, skipped, uncollected = map(int, totals.groups())
    assert failed == 0 and uncollected == 0, summary      # no failed, errored or uncollected test
    assert passed >= 1 and skipped >= 1, summary
    triton = _stage(summary, "Triton tests")
    assert re.search(r"^  attention_gate\S* +float32 +\d+ passed$", triton, re.M), triton   # (the gate file's name)

    # every float16 case that ended is a skip, and the backend's refusal is shown as its reason
    fp16_skips = sum(int(n) for n in re.findall(r"^  \S+ +float16 +(\d+) skipped$", triton, re.M))
    assert fp16_skips >= 1 and not re.search(r"^  \S+ +float16 +.*(passed|failed|error)", triton, re.M), triton
    # (asked of the backend before a float16 case runs, or its refusal during the call)
    shown = sum(int(n) for n in re.findall(r"^  skipped (\d+): dry run on the CPU \(MEDATTN_GPU_TEST_DEVICE=cpu\): "
                                           r".*backend 'triton' .*: " + re.escape(INTERPRETER_REASON) + "$",
                                           triton, re.M))
    assert shown >= fp16_skips, triton     # (test_gpu_fp16_large_map_is_finite: float16 without a dtype id)

    # every op family reached before the time limit (the float16 cases come first, one file at a time)
    families = gpu_report.op_families()
    assert {"attention_gate", "channel", "external", "gaussian_axial", "position", "window"} <= set(families)
    assert re.search(r"^  families not reached: none$", triton, re.M), triton
    reached = re.search(r"^  families reached: (.*)$", triton, re.M).group(1)
    for family in families:
        assert f"{family} (" in reached, (family, triton)
    # and each family ran at least one test to a pass (the -m gpu tests take small shapes in the dry run)
    assert re.search(r"^  families whose every test ended skipped: none$", triton, re.M), triton
    assert "torch 2." in summary and "triton" in summary                   # the environment
    assert "cuda-backend tests not run" in summary                         # said, not hidden

    with open(out / "headline.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ceilings = {r["dtype"] for r in rows if r["section"] == "ceiling" and r["status"] == "ok"}
    assert {"bfloat16", "float32", "tf32"} <= ceilings
    timed = {(r["section"], r["provider"]) for r in rows if r["status"] == "ok" and float(r["ms"]) > 0}
    for section, provider in [("position", "triton"), ("position", "triton ieee"), ("position", "triton tf32-P"),
                              ("position", "triton hoist"), ("position", "triton dv128"), ("position", "auto"),
                              ("position", "sdpa 8 heads"), ("position", "sdpa 4 heads"),
                              ("position", "sdpa"), ("position", "original"), ("channel", "triton"),
                              ("attention_gate", "triton"), ("gaussian_axial", "original loop"),
                              ("window", "triton"), ("external", "triton")]:
        assert (section, provider) in timed, (section, provider)
    assert not [r for r in rows if r["status"] == "error"], [r for r in rows if r["status"] == "error"]
    assert re.search(r"PAM B=1 C=16 8x8 float32 fwd\+bwd: .*triton [\d.]+x vs original", summary)


# ---------------------------------------------------------------------------------------------
# the summary's parsing, on logs written here (a GPU run's xdist lines, a stopped dry run's)
# ---------------------------------------------------------------------------------------------
REFUSAL = f"dry run on the CPU (MEDATTN_GPU_TEST_DEVICE=cpu): window: {INTERPRETER_REFUSAL}"
XDIST_LOG = f"""\
============================= test session starts ==============================
[gw0] [ 20%] PASSED tests/test_attention_gate_fused.py::test_gpu_matches_pytorch_error[2d-odd-eval-torch.float32-triton]
[gw1] [ 40%] FAILED tests/test_window_triton.py::test_gpu_mtunet_shapes_within_twice_torch_error[mask-float32]
[gw0] [ 60%] SKIPPED tests/test_window_triton.py::test_gpu_mtunet_shapes_within_twice_torch_error[mask-float16]
[gw1] [ 80%] SKIPPED tests/test_window_triton.py::test_gpu_mtunet_shapes_within_twice_torch_error[mtunet-float16]
[gw0] [100%] PASSED tests/test_fp32_precision.py::test_gpu_fp32_is_not_plain_tf32[position]
==================================== ERRORS ====================================
_________________ ERROR collecting tests/test_channel_triton.py _________________
E   ImportError: cannot import name 'channel_attention'
=========================== short test summary info ============================
SKIPPED [2] tests/conftest.py:89: {REFUSAL}
FAILED tests/test_window_triton.py::test_gpu_mtunet_shapes_within_twice_torch_error[mask-float32] - AssertionError
ERROR tests/test_channel_triton.py - ImportError: cannot import name 'channel_attention'
============= 1 failed, 2 passed, 2 skipped, 1 error in 12.00s ==============
"""
STOPPED_LOG = f"""\
collecting ... collected 9 items / 4 deselected / 5 selected

tests/test_attention_gate_fused.py::test_gpu_matches_pytorch_error[2d-odd-eval-torch.float16-triton] SKIPPED ({REFUSAL.replace("window", "attention_gate")}) [ 20%]
tests/test_window_triton.py::test_gpu_mtunet_shapes_within_twice_torch_error[mask-float16] SKIPPED ({REFUSAL}) [ 40%]
tests/test_attention_gate_fused.py::test_gpu_matches_pytorch_error[2d-odd-eval-torch.float32-triton] PASSED [ 60%]
tests/test_window_triton.py::test_gpu_mtunet_shapes_within_twice_torch_error[mask-float32] """


def test_summary_counts_skips_by_reason_collection_errors_and_families(tmp_path):
    (tmp_path / "tests.log").write_text(XDIST_LOG)
    gpu_report.summary(str(tmp_path))
    summary = (tmp_path / "summary.txt").read_text()
    assert "Triton tests: 2 passed, 1 failed, 0 errors, 2 skipped, 1 collection errors (complete)" in summary
    assert f"  skipped 2: {REFUSAL}\n" in summary                 # the short summary's count and whole reason
    assert "  COLLECTION ERROR tests/test_channel_triton.py\n" in summary
    assert "  families reached: attention_gate (1 passed), position (1 passed), window (1 failed, 2 skipped)\n" \
        in summary
    # channel's file did not import, the other families have no test in this log: not reached, and
    # (the run complete) said to be outside the selection, not cut by the time limit
    assert "  families not reached: channel, external, gaussian_axial (none of their tests in the selection)\n" \
        in summary
    assert "tests passed: 2; failed: 1; skipped: 2; collection errors: 1\n" in summary


def test_summary_of_a_stopped_run_names_the_families_not_reached(tmp_path):
    (tmp_path / "tests.log").write_text(STOPPED_LOG)
    gpu_report.summary(str(tmp_path))
    summary = (tmp_path / "summary.txt").read_text()
    assert "Triton tests: 1 passed, 0 failed, 0 errors, 2 skipped, 0 collection errors (STOPPED (time limit))" \
        in summary
    assert f"  skipped 1: {REFUSAL}\n" in summary                 # from the -v lines: no short summary
    assert "  families whose every test ended skipped: window\n" in summary
    assert "  families not reached: channel, external, gaussian_axial, position (stopped by the time limit " \
           "before any of their tests ended)\n" in summary
    assert "- Triton tests: families not reached before the time limit: channel, external, gaussian_axial, " \
           "position\n" in summary


# ---------------------------------------------------------------------------------------------
# the dry run's rules in tests/conftest.py and tests/_tolerance.py
# ---------------------------------------------------------------------------------------------
def _refusal(*args, **kwargs) -> medattn_fast.BackendUnavailable:
    with pytest.raises(medattn_fast.BackendUnavailable) as info:
        position_attention(*args, backend="triton", **kwargs)
    return info.value


def test_only_the_dry_run_devices_refusals_become_skips(monkeypatch):
    half = torch.randn(1, 3, 4, dtype=torch.float16)
    refused_on_cpu = _refusal(half, half, half)
    wide = torch.randn(1, 3, 300, dtype=torch.float16)
    refused_anywhere = _refusal(wide, wide, torch.randn(1, 3, 4, dtype=torch.float16))   # dk > 256 too
    double = torch.randn(1, 3, 4, dtype=torch.float64)
    float64 = _refusal(double, double, double)     # refused on a GPU as well

    monkeypatch.setenv("MEDATTN_GPU_TEST_DEVICE", "cpu")
    reason = dry_run_refusal(refused_on_cpu)
    assert reason == f"dry run on the CPU (MEDATTN_GPU_TEST_DEVICE=cpu): {refused_on_cpu}"
    assert INTERPRETER_REFUSAL in reason
    try:
        raise RuntimeError("wrapped") from refused_on_cpu
    except RuntimeError as wrapped:
        assert dry_run_refusal(wrapped) == reason
    assert dry_run_refusal(refused_anywhere) is None
    assert dry_run_refusal(float64) is None
    assert dry_run_refusal(AssertionError("error 0.1 > bound 0.01")) is None

    monkeypatch.setenv("MEDATTN_GPU_TEST_DEVICE", "cuda")   # on a GPU a refusal is a failure
    assert dry_run_refusal(refused_on_cpu) is None


def test_the_dry_run_skips_a_dtype_before_the_run_only_where_its_backend_refuses_it_on_the_cpu(monkeypatch):
    monkeypatch.setenv("MEDATTN_GPU_TEST_DEVICE", "cpu")
    assert dry_run_dtype_refusal(torch.float16) == (
        f"dry run on the CPU (MEDATTN_GPU_TEST_DEVICE=cpu): backend 'triton' refuses every torch.float16 call there: "
        f"{INTERPRETER_REASON}")
    assert "the cuda backend runs on CUDA tensors, got device cpu" in dry_run_dtype_refusal(torch.float32, "cuda")
    for dtype in (torch.float32, torch.bfloat16, torch.float64):   # float64: refused on a GPU as well
        assert dry_run_dtype_refusal(dtype) is None, dtype
    assert dry_run_dtype_refusal(torch.float16, "torch") is None
    monkeypatch.setenv("MEDATTN_GPU_TEST_DEVICE", "cuda")
    assert dry_run_dtype_refusal(torch.float16) is None


def _item(nodeid: str, **params) -> SimpleNamespace:
    return SimpleNamespace(nodeid=nodeid, name=nodeid.split("::")[1], callspec=SimpleNamespace(params=params),
                           get_closest_marker=lambda name: name == "gpu" or None)


def test_dry_run_runs_the_float16_cases_first_then_the_rest_one_file_at_a_time(monkeypatch):
    gate = [_item(f"tests/test_a.py::test_gate[{i}-{d}]", dtype=d) for i in range(3)
            for d in (torch.float32, torch.float16)]
    window = [_item(f"tests/test_w.py::test_window[{d}]", dtype=d) for d in (torch.float32, torch.float16)]
    window.append(_item("tests/test_w.py::test_fp16_case"))
    precision = [_item(f"tests/test_p.py::test_precision[{op}]", op=op) for op in ("channel", "position")]
    plain = SimpleNamespace(nodeid="tests/test_b.py::test_cpu", name="test_cpu", get_closest_marker=lambda name: None)
    items = [plain] + gate + precision + window
    monkeypatch.setenv("MEDATTN_GPU_TEST_DEVICE", "cpu")
    conftest.pytest_collection_modifyitems(None, items)
    assert [i.nodeid for i in items] == [
        "tests/test_b.py::test_cpu",
        "tests/test_a.py::test_gate[0-torch.float16]", "tests/test_w.py::test_window[torch.float16]",
        "tests/test_a.py::test_gate[1-torch.float16]", "tests/test_w.py::test_fp16_case",
        "tests/test_a.py::test_gate[2-torch.float16]",
        # then the rest, again one of each file in turn: every family passes a test early
        "tests/test_a.py::test_gate[0-torch.float32]", "tests/test_p.py::test_precision[channel]",
        "tests/test_w.py::test_window[torch.float32]",
        "tests/test_a.py::test_gate[1-torch.float32]", "tests/test_p.py::test_precision[position]",
        "tests/test_a.py::test_gate[2-torch.float32]",
    ]
