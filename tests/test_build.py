"""The lazy csrc build: never at import, a lock a killed build cannot leave stuck, warn-once fallback."""
import subprocess
import sys
import warnings

import pytest
import torch

from medattn_fast import _build
from medattn_fast import backend as B


def test_import_builds_nothing():
    code = ("import medattn_fast, medattn_fast.functional, medattn_fast.nn, medattn_fast.compat; "
            "from medattn_fast import _build; assert not _build._modules and not _build._failures, "
            "(_build._modules, _build._failures)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_fullgraph_compile_as_the_first_call_loads_the_extension():
    """A fresh process whose first fused call is inside ``torch.compile(fullgraph=True)``: dispatch
    asks whether the cpp extension is available, which loads it under locks dynamo cannot trace —
    evaluated once at trace time (``assume_constant_result``), not a graph break."""
    code = (
        "import torch, medattn_fast.functional as MF\n"
        "from medattn_fast import _build\n"
        "assert not _build._modules\n"
        "x = torch.randn(1, 8, 6, 6); y = torch.randn(1, 8, 6, 6)\n"
        "f = torch.compile(lambda x: MF.channel_attention(x, backend='cpp'), backend='aot_eager', fullgraph=True)\n"
        "torch.testing.assert_close(f(x), MF.channel_attention(x, backend='reference'))\n"
        "torch.testing.assert_close(f(y), MF.channel_attention(y, backend='reference'))\n"
        "assert ('cpu', 'channel') in _build._modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600)


def test_cpu_extension_builds_and_a_stale_lock_does_not_block(tmp_path, monkeypatch):
    """A build killed mid-way leaves torch's baton file behind; the next build must not wait on it."""
    assert _build.unavailable_reason("cpu", "gaussian_axial") is None
    baton = _build.build_dir() / _build.module_name("cpu", "gaussian_axial") / "lock"
    baton.write_text("left by a killed build")
    module = _build._build("cpu", "gaussian_axial")  # would wait forever on the baton without flock+cleanup
    assert hasattr(module, "gaussian_axial_scores_forward")
    assert not baton.exists()


def test_failed_build_warns_once_and_auto_falls_back(monkeypatch):
    monkeypatch.setattr(_build, "_modules", {})
    monkeypatch.setattr(_build, "_failures", {})
    monkeypatch.setattr(_build, "_warned", set())

    def broken(kind, family):
        raise RuntimeError("error: expected ';' before '}' token")

    monkeypatch.setattr(_build, "_build", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r1 = B.cpp_reasons(torch.randn(2), family="gaussian_axial")
        r2 = B.cpp_reasons(torch.randn(2), family="gaussian_axial")
    assert len([w for w in caught if "building the cpu extension of gaussian_axial failed" in str(w.message)]) == 1
    assert r1 == r2 and "expected ';'" in r1[0]
    with pytest.raises(RuntimeError, match="failed to build"):
        _build.load("cpu", "gaussian_axial")
    # auto falls back to the torch backend; a forced cpp call says why it cannot run
    import medattn_fast.functional as MF
    from medattn_fast.backend import registered_ops

    q, k, v = (torch.randn(1, 3, 4, 2, dtype=torch.float64) for _ in range(3))
    shift = torch.tensor(0.5, dtype=torch.float64)
    assert registered_ops()["gaussian_axial"].choose(q, k, v, shift) == "torch"
    with pytest.raises(B.BackendUnavailable, match="expected ';'"):
        MF.gaussian_axial_attention(q, k, v, shift, backend="cpp")


def test_no_build_switch(monkeypatch):
    monkeypatch.setattr(_build, "_modules", {})
    monkeypatch.setattr(_build, "_failures", {})
    monkeypatch.setenv("MEDATTN_NO_BUILD", "1")
    assert "MEDATTN_NO_BUILD" in _build.unavailable_reason("cpu", "gaussian_axial")


def test_cuda_sources_skipped_without_cuda_torch():
    reason = _build._precondition("cuda") or ""
    if torch.version.cuda is None:
        assert "no CUDA support, CUDA sources skipped" in reason
    else:
        assert "no CUDA support" not in reason


def test_build_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDATTN_BUILD_DIR", str(tmp_path))
    assert str(_build.build_dir()).startswith(str(tmp_path))
