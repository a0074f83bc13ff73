"""The table of op families (``medattn_fast/ops/_families.py``) is what dispatch reads and what
``medattn-fast info`` prints, and its capability limits are the kernels' own numbers."""
from __future__ import annotations

from pathlib import Path

import torch

import medattn_fast
from medattn_fast import backend as B
from medattn_fast.ops._families import FAMILIES, family_of
from medattn_fast.ops.attention_gate import GateParams

ROOT = Path(__file__).resolve().parents[1]


def test_every_dispatcher_is_configured_by_its_row():
    ops = B.registered_ops()
    rows = {name: family for family in FAMILIES for name in family.dispatchers}
    assert set(ops) == set(rows)
    for name, op in ops.items():
        family = rows[name]
        assert (op.family, tuple(op.auto_cpu), tuple(op.auto_cuda), op.export_backend, op.auto_order,
                tuple(op.limits), op.tune_key, op.tune_variants) == (
                    family.name, family.auto_cpu, family.auto_cuda, family.export_backend, family.auto_order,
                    family.limits, family.tune_key, family.tune_variants), name
        assert set(op.impls) == {"reference", "torch", *family.backends}, name


def test_one_name_per_family_from_module_to_kernel_file():
    """``ops/<family>.py``, ``ops/_<family>_<backend>.py`` and the kernels
    (``csrc/cpu/<family>.cpp``, ``csrc/cuda/<family>.cu``, ``triton_kernels/<family>.py``) all carry
    the family's name; the custom ops are ``medattn::<family>_<backend>_...``."""
    for family in FAMILIES:
        assert (ROOT / "medattn_fast" / "ops" / f"{family.name}.py").is_file()
        for backend in family.backends:
            assert (ROOT / "medattn_fast" / "ops" / f"_{family.name}_{backend}.py").is_file()
            kernels = {"cpp": f"csrc/cpu/{family.name}.cpp", "cuda": f"csrc/cuda/{family.name}.cu",
                       "triton": f"triton_kernels/{family.name}.py"}[backend]
            assert (ROOT / kernels).is_file(), kernels
            ops = [n for n in dir(torch.ops.medattn) if n.startswith(f"{family.name}_{backend}_")]
            assert ops, (family.name, backend)


def _limit(family: str, what: str):
    return next(limit for limit in family_of_name(family).limits if getattr(limit, "what", None) == what)


def family_of_name(name: str):
    return next(f for f in FAMILIES if f.name == name)


def test_the_limits_are_the_kernels_own():
    """A kernel's constant changes its row's limit with it (this test fails until both agree)."""
    from medattn_fast.triton_kernels import attention_gate as gate
    from medattn_fast.triton_kernels import external, gaussian_axial, position, window

    assert _limit("position", "dk").maximum == position.MAX_HEAD_DIM
    assert _limit("window", "head dim").maximum == window.MAX_HEAD_DIM
    assert _limit("window", "window_size").maximum == window.MAX_WINDOW
    assert _limit("external", "head dim").maximum == external.MAX_HEAD_DIM
    assert _limit("external", "memory slots").maximum == external.MAX_SLOTS
    assert _limit("gaussian_axial", "H and W").maximum == gaussian_axial.MAX_LINE
    assert _limit("attention_gate", "channels of the gate pass (Cx; C_int in grid mode)").maximum == gate.MAX_CHANNELS
    # the cuda gate has no width limit in the table: its kernels' shared memory is static, a fixed tile
    # of W (no dynamic shared memory sized by the widths, no opt-in beyond the default 48 KB)
    source = (ROOT / "csrc" / "cuda" / "attention_gate.cu").read_text()
    assert "extern __shared__" not in source and "MaxDynamicSharedMemorySize" not in source
    assert not [limit for limit in family_of("attention_gate").limits if limit.backend == "cuda"]


def _gate_call(cx: int, ci: int):
    x, g = torch.randn(1, cx, 2, 2), torch.randn(1, 3, 2, 2)
    params = GateParams(torch.randn(ci, cx, 1, 1), None, torch.randn(ci, 3, 1, 1), None, torch.randn(1, ci, 1, 1),
                        None)
    return (x, g, params), dict(mode="additive", double_sigmoid=False, return_alpha=False)


def test_a_limit_is_a_reason_of_its_backend_only():
    """The Triton gate holds a tile of every channel in registers (triton_kernels/attention_gate.py
    refuses more than MAX_CHANNELS at launch): dispatch says so before, and only for triton."""
    op = B.registered_ops()["attention_gate"]
    args, kw = _gate_call(1025, 2)
    assert any("channels of the gate pass (Cx; C_int in grid mode) <= 1024, got 1025" in r
               for r in op.why_not("triton", *args, **kw))
    assert op.why_not("torch", *args, **kw) == []
    args, kw = _gate_call(1024, 2)
    assert not any("channels" in r for r in op.why_not("triton", *args, **kw))


def test_info_prints_the_table():
    rows = medattn_fast.info()["ops"]
    assert set(rows) == set(B.registered_ops())
    gate = rows["attention_gate"]
    assert gate["family"] == "attention_gate" and gate["auto on CUDA"] == ["triton", "cuda", "torch"]
    assert gate["per-call order"] is None and gate["autotune key"].startswith("train/eval")
    assert rows["position_attention"]["autotune variants"].startswith("Triton: the separate and the fused")
    assert not any(limit.startswith("cuda:") for limit in gate["limits"])
    assert rows["position_attention"]["export"] == "reference"
    assert family_of("gaussian_axial_from_scores").name == "gaussian_axial"
