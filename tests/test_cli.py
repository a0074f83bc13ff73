"""The medattn-fast command line: info, build, verify, bench (a quick run of one case)."""
import json
import subprocess
import sys
from pathlib import Path

import torch

from medattn_fast import cli

ROOT = Path(__file__).resolve().parent.parent


def test_info_lists_backends_with_reasons(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("reference", "torch", "triton", "cuda", "cpp"):
        assert f"  {name}" in out
    assert torch.__version__ in out
    if not torch.cuda.is_available():
        assert "no CUDA support" in out  # why the cuda backend is missing


def test_build_reports_each_extension(capsys):
    status = cli.main(["build"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "cpu/gaussian_axial" in out and "built" in out
    assert "cuda" in out


def test_verify_passes_on_cpu(capsys):
    status = cli.main(["verify", "--device", "cpu"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "FAIL" not in out.split("verify:")[0]
    assert " cpp " in out and " torch " in out


def test_console_script_entry_point():
    res = subprocess.run([sys.executable, "-m", "medattn_fast.cli", "info"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "backends:" in res.stdout


def test_bench_writes_csv_and_json(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "medattn_fast.cli", "bench", "--op", "gaussian_axial", "--shape", "GaussianTrans B=1 7x7",
         "--provider", "reference", "--provider", "torch", "--mode", "fwd", "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["gaussian_axial_cpu.csv", "gaussian_axial_cpu.json"]
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert data["environment"]["torch"] == torch.__version__
    rows = [r for r in data["rows"] if r["status"] == "ok"]
    assert {r["provider"] for r in rows} == {"reference", "torch"}
    assert all(r["median_ms"] > 0 for r in rows)
