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
    from torch.utils import cpp_extension

    if not hasattr(cpp_extension, "FileLock"):
        # torch < 2.14: the file's existence is the lock (FileBaton), so it must be gone; torch 2.14
        # holds an OS lock on that file instead and leaves it in place, which blocks nothing
        assert not baton.exists()


def test_failed_build_warns_once_and_auto_falls_back(monkeypatch):
    monkeypatch.setattr(_build, "_modules", {})
    monkeypatch.setattr(_build, "_failures", {})
    monkeypatch.setattr(_build, "_warned", set())

    def broken(kind, family):
        raise RuntimeError("error: expected ';' before '}' token")

    monkeypatch.setattr(_build, "_build", broken)
    import medattn_fast.functional as MF
    from medattn_fast.backend import registered_ops

    q, k, v = (torch.randn(1, 3, 4, 2, dtype=torch.float64) for _ in range(3))
    shift = torch.tensor(0.5, dtype=torch.float64)
    op = registered_ops()["gaussian_axial"]
    # asking builds nothing: before the backend first runs, nothing is known against it
    assert B.cpp_reasons(q, family="gaussian_axial") == [] and op.why_not("cpp", q, k, v, shift) == []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = MF.gaussian_axial_attention(q, k, v, shift)   # auto: cpp first, its build fails, torch runs
        assert op.choose(q, k, v, shift) == "torch"
    torch.testing.assert_close(out, MF.gaussian_axial_attention(q, k, v, shift, backend="torch"))
    assert len([w for w in caught if "building the cpu extension of gaussian_axial failed" in str(w.message)]) == 1
    # the failure is now a reason, asked without building again
    r1, r2 = B.cpp_reasons(q, family="gaussian_axial"), op.why_not("cpp", q, k, v, shift)
    assert r1 == r2 and "expected ';'" in r1[0]
    with pytest.raises(RuntimeError, match="failed to build"):
        _build.load("cpu", "gaussian_axial")
    # a forced cpp call says why it cannot run
    with pytest.raises(B.BackendUnavailable, match="expected ';'"):
        MF.gaussian_axial_attention(q, k, v, shift, backend="cpp")


def test_a_forced_backend_whose_first_build_fails_raises_the_build_reason(monkeypatch):
    monkeypatch.setattr(_build, "_modules", {})
    monkeypatch.setattr(_build, "_failures", {})
    monkeypatch.setattr(_build, "_warned", set())
    monkeypatch.setattr(_build, "_build", lambda kind, family: (_ for _ in ()).throw(RuntimeError("ld: cannot find")))
    import medattn_fast.functional as MF

    x = torch.randn(1, 3, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(B.BackendUnavailable, match="backend 'cpp' cannot run this call: .*ld: cannot find"):
            MF.channel_attention(x, backend="cpp")


def test_predicates_build_nothing(monkeypatch):
    """Asking any backend of any op why it cannot run a call (what ``info``, ``verify`` and ``auto``
    do) never compiles an extension: building happens when a backend first runs."""
    monkeypatch.setattr(_build, "_modules", {})
    monkeypatch.setattr(_build, "_failures", {})
    built = []
    monkeypatch.setattr(_build, "_build", lambda kind, family: built.append((kind, family)))
    import medattn_fast.functional  # noqa: F401  (registers every op)

    q = torch.randn(1, 5, 3)
    for name, op in B.registered_ops().items():
        for backend in ("cpp", "cuda"):
            if backend in op.impls:
                assert op.impls[backend].reasons(q, q, q) == ([] if backend == "cpp" else [
                    "the cuda backend runs on CUDA tensors, got device cpu"]), name
    x = torch.randn(1, 3, 4, 4)
    assert B.registered_ops()["channel_attention"].available(x, negate=True, gamma=None, residual=None,
                                                              multiply=None)["cpp"] == []
    assert built == []


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
