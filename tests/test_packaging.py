"""Packaging: what a wheel installs, where the kernels are imported from, and the warn-once fall-back
when this installation cannot build the C++ kernels (the wheel itself is built and used from a venv
outside the tree by the CI stage ``.ci/wheel``)."""
import logging
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest
import torch

import medattn_fast
from medattn_fast import _build
from medattn_fast import backend as B

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_listed_for_the_wheel():
    """pyproject lists the packages explicitly (two of them are mapped from top-level folders), so
    a new subpackage must be added there or the wheel silently lacks it."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "medattn_fast").rglob("__init__.py")}
    assert on_disk - listed == set(), f"add to [tool.setuptools] packages in pyproject.toml: {sorted(on_disk - listed)}"
    assert config["package-dir"] == {"medattn_fast.triton_kernels": "triton_kernels", "medattn_fast._csrc": "csrc"}
    assert not any(p.split(".")[0] != "medattn_fast" for p in listed), listed


def test_triton_kernels_import_from_this_tree_under_the_package_name():
    """Triton ships its own top-level ``triton_kernels``: ours is ``medattn_fast.triton_kernels``,
    taken from the same tree as the package (here the checkout's top-level folder)."""
    code = ("import sys, medattn_fast, medattn_fast.triton_kernels as K, medattn_fast.ops.position\n"
            "print(K.__path__[0]); assert 'triton_kernels' not in sys.modules, 'a top-level triton_kernels was imported'")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT)
    assert Path(out.stdout.strip()).resolve() == ROOT / "triton_kernels"
    assert _build.CSRC == ROOT / "csrc"


@pytest.fixture
def fresh_build_state(monkeypatch):
    monkeypatch.setattr(_build, "_modules", {})
    monkeypatch.setattr(_build, "_failures", {})
    monkeypatch.setattr(_build, "_warned", set())
    monkeypatch.delenv("MEDATTN_NO_BUILD", raising=False)


def test_missing_sources_warn_once_naming_the_backend_and_the_fix(fresh_build_state, monkeypatch, tmp_path):
    monkeypatch.setattr(_build, "CSRC", tmp_path / "not-installed")
    q, k, v = (torch.randn(1, 5, 3) for _ in range(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = medattn_fast.functional.position_attention(q, k, v)        # auto: cpp, then torch
        medattn_fast.functional.channel_attention(torch.randn(1, 3, 4, 4))  # another family: no second warning
    torch.testing.assert_close(out, medattn_fast.functional.position_attention(q, k, v, backend="reference"))
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "csrc sources not found" in messages[0] and "'cpp' backend" in messages[0]
    assert "Fix: reinstall medattn-fast" in messages[0]
    assert B.registered_ops()["position_attention"].choose(q, k, v) != "cpp"


@pytest.mark.parametrize("setup", ["no_build", "meta_device"])
def test_deliberate_or_call_specific_reasons_do_not_warn(fresh_build_state, monkeypatch, caplog, setup):
    """``MEDATTN_NO_BUILD=1`` is the user's choice and a tensor on another device is about one call:
    ``auto`` falls through with a DEBUG log, no warning."""
    device = "cpu"
    if setup == "no_build":
        monkeypatch.setenv("MEDATTN_NO_BUILD", "1")
    else:
        device = "meta"
    q, k, v = (torch.randn(1, 5, 3, device=device) for _ in range(3))
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG, logger="medattn_fast"):
        warnings.simplefilter("always")
        B.registered_ops()["position_attention"].choose(q, k, v, scale=1.0, transpose=False, gamma=None,
                                                        residual=None, multiply=None, chunk_size=None,
                                                        channels_first=False)
    assert [w for w in caught if issubclass(w.category, RuntimeWarning)] == []
    assert "auto skips cpp" in caplog.text
