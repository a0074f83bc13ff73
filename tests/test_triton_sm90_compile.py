"""Every Triton kernel compiles for an H100 (sm_90), checked on a machine without a GPU.

The interpreter tests run the kernels' Python; this one runs Triton's real compiler down to a
cubin (``ptxas`` from the triton wheel) for every kernel specialisation the ops reach, forward and
backward, in float32 and bfloat16 — see tests/_sm90_compile.py for how and for what it cannot
show. A subprocess, because the interpreter (TRITON_INTERPRET=1, set by conftest.py on CPU) must
be off when the kernels are defined.
"""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_triton_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-m", "tests._sm90_compile", "--dtypes", "float32,bfloat16"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    report = res.stdout + res.stderr
    assert res.returncode == 0, report
    assert "0 failures" in report, report
    for op in ("position_attention", "channel_attention", "gaussian_axial", "window_attention",
               "external_attention", "attention_gate"):
        assert f"ok   {op}" in report, report
