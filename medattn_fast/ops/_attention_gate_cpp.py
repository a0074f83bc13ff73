r"""The ``cpp`` backend of the attention gate: the custom ops ``medattn::attention_gate_cpp_*`` around
``csrc/cpu/attention_gate.cpp``, declared by :func:`medattn_fast.ops._attention_gate_fused.define_custom_ops` (which lists them);
the plan around the kernels is :func:`medattn_fast.ops._attention_gate_fused.fused_gate`.
"""
from __future__ import annotations

from .. import backend as B
from . import _attention_gate_fused as fused

__all__ = ["KERNELS", "register"]


def _kernels():
    from .. import _build

    return _build.load("cpu", "attention_gate")   # built on first use


KERNELS = fused.define_custom_ops("cpp", _kernels)


def register(op: B.Op) -> None:
    """Adds the ``cpp`` backend to ``op``, the family's dispatcher (called by ``medattn_fast.ops``)."""
    op.register("cpp")(fused.fused_backend(KERNELS))
