r"""The ``cpp`` backend of the attention gate: ``csrc/cpu/attention_gate.cpp`` (ATen ``parallel_for``
over blocks of positions, float32 accumulation, float64 kept) behind the five custom ops
``medattn::attention_gate_cpp_*`` that :func:`._attention_gate_fused.define_custom_ops` declares and
:func:`._attention_gate_fused.fused_gate` runs."""
from . import _attention_gate_fused as fused
from ._custom_op import extension

KERNELS = fused.define_custom_ops("cpp", extension("cpu", "attention_gate"))
register = fused.registrar("cpp", KERNELS)   # called by medattn_fast.ops with the family's dispatcher
