"""A tiny nnU-Net v2 run with the attention-gated network through nnU-Net's Python API (fingerprint,
plan, preprocess, the gated configuration, 1 epoch x 2 iterations with the stock trainer, predict)
on synthetic anisotropic volumes: ``tests/_nnunet_e2e.py``, in a process of its own (nnU-Net < 2.8
reads its folders from the environment at import). About a minute on 2 cores."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("nnunetv2", reason="nnU-Net v2 not installed (pip install \"medattn-fast[nnunet]\")")


def test_plan_train_predict_with_the_gated_network(tmp_path):
    env = dict(os.environ)
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("_nnunet_e2e.py")), str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=600)
    lines = [l for l in run.stdout.splitlines() if l.startswith("E2E_RESULT ")]
    assert run.returncode == 0 and lines, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(lines[-1].split(" ", 1)[1])
    assert result["configuration"] == "3d_fullres_attngate"
    # the stock trainer built, trained and checkpointed the gated network; the predictor rebuilt it
    assert result["is_gated"] and result["trained_network"] == result["predictor_network"] == \
        "AttentionGatedPlainConvUNet"
    assert result["gate_norms"] == ["instance"] and result["gates"] == len(result["strides"]) - 1
    assert result["checkpoint_keys_with_gates"] > 0
    assert [1, 2, 2] in result["strides"]   # anisotropic: the thick-slice axis is not pooled at first
    assert result["data_identifier"] == "nnUNetPlans_3d_fullres"   # the parent's preprocessed data
    assert result["predictions"] == 4 and result["prediction_shape"] == [12, 40, 36]
    assert set(result["prediction_labels"]) <= {0, 1, 2}
