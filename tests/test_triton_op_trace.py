"""The Triton ops are ``torch.library.triton_op``s on a GPU: torch.compile traces their kernel
launches (``wrap_triton``) into the graph, checked on a machine without a GPU by
tests/_triton_op_trace.py in a subprocess (the interpreter must be off when the kernels are
defined). Under the interpreter they are custom ops (``medattn_fast.ops._custom_op.traceable_triton``
says why); the fullgraph tests of each ``tests/test_<family>_triton.py`` cover that path."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("channel", "gaussian_axial", "gaussian_axial_from_scores", "window", "external",
            # position's variants and the gate's modes: their exact kernels (EXPECTED_KERNELS there)
            "position", "position_fused_backward", "position_transpose",
            "attention_gate_train", "attention_gate_eval", "attention_gate_grid")


def test_triton_ops_trace_their_kernel_launches():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-m", "tests._triton_op_trace"], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=600)
    report = res.stdout + res.stderr
    assert res.returncode == 0 and "0 failures" in report, report
    for family in FAMILIES:
        assert f"ok   {family}:" in report, report
    for case in FAMILIES[5:]:   # position and the gate, also under torch.compile(fullgraph=True)
        assert f"ok   {case} compiled:" in report, report


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the kernels are compiled, not interpreted")
def test_interpreted_triton_ops_are_custom_ops():
    """Under the interpreter (this process on a CPU) the ops stay custom ops: triton_op's fake kernel
    would run the interpreter on FakeTensors."""
    from medattn_fast.ops._custom_op import traceable_triton

    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert not traceable_triton()
    assert hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton"), torch.__version__
