"""bench/gpu_session.sh (the staged GPU lease script) parses, lists its stages and refuses an
unknown one; its GPU work itself can only run on a GPU machine."""
import os
import shutil
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu_session.sh"
bash = shutil.which("bash") or "/bin/bash"


def _run(*args, **env):
    return subprocess.run([bash, str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


def test_script_parses():
    assert subprocess.run([bash, "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_no_stage_prints_the_stages(tmp_path):
    result = _run(OUT=str(tmp_path))
    assert result.returncode == 2
    for stage in ("env", "tests", "verify", "bench-ops", "bench-models", "loss-curves"):
        assert stage in result.stdout


def test_unknown_stage_is_refused(tmp_path):
    result = _run("bogus", OUT=str(tmp_path))
    assert result.returncode == 2 and "unknown stage 'bogus'" in result.stderr


def test_stages_run_their_commands_and_log_under_out(tmp_path):
    """With PYTHON=echo every stage's commands print instead of running: the control flow, the
    per-stage logs under $OUT and the exit status are exercised without a GPU."""
    result = _run("tests", "verify", OUT=str(tmp_path), PYTHON="echo")
    assert result.returncode == 0, result.stderr
    assert "-m pytest -q -m gpu" in (tmp_path / "tests.log").read_text()
    assert "verify --device cuda" in (tmp_path / "verify.log").read_text()
    failing = _run("tests", OUT=str(tmp_path), PYTHON="false")
    assert failing.returncode == 1
