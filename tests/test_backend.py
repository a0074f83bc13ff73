"""Backend selection, per-op dispatch with reasons, info()."""
import logging

import pytest
import torch

import medattn_fast
from medattn_fast import backend as B


def _toy_op(name="toy"):
    op = B.Op(name)

    @op.register("torch")
    def _torch(x):
        return x * 2

    @op.register("reference")
    def _ref(x):
        return x + x

    @op.register("cpp", reasons=lambda x: ["cpp is switched off for this test"])
    def _cpp(x):  # pragma: no cover - never chosen
        raise AssertionError("a backend whose predicate refuses must not run")

    return op


def test_default_is_auto(monkeypatch):
    monkeypatch.delenv("MEDATTN_BACKEND", raising=False)
    assert medattn_fast.get_backend() == "auto"


def test_env_variable(monkeypatch):
    monkeypatch.setenv("MEDATTN_BACKEND", "torch")
    assert medattn_fast.get_backend() == "torch"


def test_set_backend_wins_over_env_and_context_wins_over_set(monkeypatch):
    monkeypatch.setenv("MEDATTN_BACKEND", "torch")
    medattn_fast.set_backend("reference")
    assert medattn_fast.get_backend() == "reference"
    with medattn_fast.use_backend("cpp"):
        assert medattn_fast.get_backend() == "cpp"
        with medattn_fast.use_backend("torch"):
            assert medattn_fast.get_backend() == "torch"
        assert medattn_fast.get_backend() == "cpp"
    assert medattn_fast.get_backend() == "reference"


def test_unknown_backend_name():
    with pytest.raises(ValueError, match=r"backend: expected one of .*got 'cudnn'"):
        medattn_fast.set_backend("cudnn")
    with pytest.raises(ValueError, match="got 'fast'"):
        with medattn_fast.use_backend("fast"):
            pass


def test_auto_falls_through_and_logs_reasons(caplog):
    op = _toy_op()
    x = torch.randn(3)
    with caplog.at_level(logging.DEBUG, logger="medattn_fast"):
        assert op.choose(x) == "torch"
    assert "cpp is switched off for this test" in caplog.text
    torch.testing.assert_close(op(x), x * 2)


def test_auto_order_hook_reorders_one_call():
    """``Op.auto_order`` (a measured per-call preference) replaces the default order for the calls
    where it returns one, and leaves the others alone."""
    op = _toy_op()
    op.auto_order = lambda x: ("reference", "torch") if x.numel() > 4 else None
    assert op.choose(torch.randn(8)) == "reference"
    assert op.choose(torch.randn(3)) == "torch"
    with medattn_fast.use_backend("torch"):       # a forced backend ignores the preference
        assert op.choose(torch.randn(8)) == "torch"


def test_forced_backend_that_cannot_run_raises_with_reasons():
    op = _toy_op()
    with pytest.raises(B.BackendUnavailable, match="toy: backend 'cpp' cannot run this call: cpp is switched off"):
        op(torch.randn(3), backend="cpp")
    with medattn_fast.use_backend("triton"):
        with pytest.raises(B.BackendUnavailable, match="toy has no triton implementation"):
            op(torch.randn(3))


def test_forced_backend_runs_that_backend():
    op = _toy_op()
    with medattn_fast.use_backend("reference"):
        assert op.choose(torch.randn(2)) == "reference"


def test_available_lists_every_backend():
    avail = _toy_op().available(torch.randn(2))
    assert avail["torch"] == [] and avail["reference"] == []
    assert avail["cpp"] == ["cpp is switched off for this test"]
    assert avail["cuda"] == ["toy has no cuda implementation"]


def test_triton_reasons_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reasons = B.triton_reasons(torch.randn(2))
    assert any("needs CUDA tensors" in r for r in reasons)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert B.triton_reasons(torch.randn(2)) == []
    assert any("float32/bfloat16" in r for r in B.triton_reasons(torch.randn(2, dtype=torch.float64)))


def test_cpp_and_cuda_reasons_name_the_device():
    meta = torch.empty(2, device="meta")
    assert "runs on CPU tensors" in B.cpp_reasons(meta, family="gaussian_axial")[0]
    assert "runs on CUDA tensors" in B.cuda_reasons(torch.randn(2), family="gaussian_axial")[0]
    assert "no cpu kernel for nonexistent" in B.cpp_reasons(torch.randn(2), family="nonexistent")[0]   # a fact: no build


def test_info_lists_backends_with_reasons():
    data = medattn_fast.info()
    assert set(data["backends"]) == {"reference", "torch", "triton", "cuda", "cpp"}
    assert data["torch"] == torch.__version__
    if not torch.cuda.is_available():
        assert "CUDA" in data["backends"]["cuda"] or "cuda" in data["backends"]["cuda"]


def test_nn_namespace_exports_the_modules_the_readme_names():
    """``from medattn_fast.nn import PositionAttention`` (README "Modules") works for every module."""
    import medattn_fast.nn as mnn
    from medattn_fast.nn import attention, attention_gate, mtunet

    for name in ("PositionAttention", "ChannelAttention", "DualAttention", "AttentionGate", "WindowAttention",
                 "ExternalAttention", "GaussianAxialAttention"):
        cls = getattr(mnn, name)
        assert issubclass(cls, torch.nn.Module)
        assert cls is getattr({"AttentionGate": attention_gate}.get(name) or
                              (mtunet if hasattr(mtunet, name) else attention), name)
    assert sorted(mnn.__all__) == sorted(set(mnn.__all__))
