"""Triton kernels of the gate (``triton_kernels/attention_gate.py``, a tile of every channel in registers:
the table's limit) as the ``triton`` backend, through the shared custom-op factory and plan of
``_attention_gate_fused``: ops ``medattn::attention_gate_triton_*``."""
from . import _attention_gate_fused as fused
from ._custom_op import triton_module

KERNELS = fused.define_custom_ops("triton", triton_module("attention_gate"), precision_argument=True)
register = fused.registrar("triton", KERNELS)   # called by medattn_fast.ops
