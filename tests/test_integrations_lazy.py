"""The framework integrations are imported only when asked for: ``import medattn_fast`` and the
command line's parser never load them (nor nnU-Net), and without nnU-Net installed the nnU-Net
integration says what to install at the first use of one of its names."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_import_and_cli_leave_the_integrations_alone():
    out = _run("""
        import sys, medattn_fast, medattn_fast.nn, medattn_fast.models
        from medattn_fast.cli import main
        try:
            main(["nnunet", "--help"])
        except SystemExit:
            pass
        loaded = sorted(m for m in sys.modules
                        if m.startswith(("nnunetv2", "dynamic_network_architectures", "medattn_fast.integrations.nnunet.")))
        print("LOADED", loaded)
    """)
    assert "LOADED ['medattn_fast.integrations.nnunet.cli']" in out


def test_a_missing_nnunet_is_named_at_first_use():
    out = _run("""
        import sys
        sys.modules["dynamic_network_architectures"] = None   # as if not installed
        import medattn_fast.integrations.nnunet as integration
        try:
            integration.AttentionGatedPlainConvUNet
        except ImportError as exc:
            print("ERROR", exc)
    """)
    assert 'ERROR medattn_fast.integrations.nnunet needs nnU-Net\'s networks' in out and "medattn-fast[nnunet]" in out
