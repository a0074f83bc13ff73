r"""The ``triton`` backend of the attention gate: the custom ops ``medattn::attention_gate_triton_*`` around
``triton_kernels.gate``, declared by :func:`medattn_fast.ops._attention_gate_fused.define_custom_ops` (which lists them);
the plan around the kernels is :func:`medattn_fast.ops._attention_gate_fused.fused_gate`.
"""
from __future__ import annotations

from .. import backend as B
from . import _attention_gate_fused as fused

__all__ = ["KERNELS", "register"]


def _kernels():
    from ..triton_kernels import gate   # imported on first use: triton is optional

    return gate


KERNELS = fused.define_custom_ops("triton", _kernels)


def register(op: B.Op) -> None:
    """Adds the ``triton`` backend to ``op``, the family's dispatcher (called by ``medattn_fast.ops``)."""
    op.register("triton")(fused.fused_backend(KERNELS))
