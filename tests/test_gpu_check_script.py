"""bench/gpu_check.sh, the one-call GPU check, dry-run on the CPU so that it cannot rot between GPU
sessions: MEDATTN_GPU_TEST_DEVICE=cpu runs the same stages (environment, background build, the
``-m gpu`` tests narrowed to one fast case, the headline timings at toy shapes with the Triton
kernels interpreted, the kernel list, the summary) and the summary must report what ran.

The script needs bash and coreutils' ``timeout``; the figures of a dry run mean nothing.
"""
import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"
# the -m gpu tests that the interpreter runs in seconds: float32 is not plain TF32 (toy sizes on the CPU)
DRY_RUN_TESTS = "test_gpu_fp32_is_not_plain_tf32"

needs_shell = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                 reason="needs bash and coreutils timeout")


@needs_shell
def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


@needs_shell
def test_dry_run_writes_every_stage_and_a_summary(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_WORK": str(work), "MEDATTN_GPU_TEST_DEVICE": "cpu",
           "GPU_CHECK_LIMIT_S": "300", "GPU_CHECK_TESTS_K": DRY_RUN_TESTS, "PYTHON": sys.executable}
    env.pop("PYTHONPATH", None)   # the script sets PYTHONPATH=. itself, as on a bare GPU machine
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=330, env=env,
                            cwd=str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files   # the device tool brings back 8 files at most
    for name in ("env.txt", "build.log", "tests.log", "headline.csv", "headline.log", "kernels.csv",
                 "summary.txt"):
        assert name in files, (name, files)

    summary = (out / "summary.txt").read_text()
    passed = re.search(r"^tests passed: (\d+); failed: (\d+)$", summary, re.M)
    assert passed and int(passed.group(1)) == 2 and passed.group(2) == "0", summary
    assert re.search(r"^  fp32_precision +- +2 passed$", summary, re.M), summary   # the per-op, per-dtype table
    assert "torch 2." in summary and "triton" in summary                   # the environment
    assert "cuda-backend tests not run" in summary                         # said, not hidden

    with open(out / "headline.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ceilings = {r["dtype"] for r in rows if r["section"] == "ceiling" and r["status"] == "ok"}
    assert {"bfloat16", "float32", "tf32"} <= ceilings
    timed = {(r["section"], r["provider"]) for r in rows if r["status"] == "ok" and float(r["ms"]) > 0}
    for section, provider in [("position", "triton"), ("position", "triton ieee"), ("position", "triton p16"),
                              ("position", "sdpa"), ("position", "original"), ("channel", "triton"),
                              ("attention_gate", "triton"), ("gaussian_axial", "original loop"),
                              ("window", "triton"), ("external", "triton")]:
        assert (section, provider) in timed, (section, provider)
    assert not [r for r in rows if r["status"] == "error"], [r for r in rows if r["status"] == "error"]
    assert re.search(r"PAM B=1 C=16 8x8 float32 fwd\+bwd: .*triton [\d.]+x vs original", summary)
