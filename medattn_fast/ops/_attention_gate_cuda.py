r"""The ``cuda`` backend: ``csrc/cuda/attention_gate.cu``, whose blocks stage x, W_x and a
(Ci + 1)-row buffer in shared memory — past what a block can hold the table's ``GateSharedMemory``
limit (``ops/_families.py``) sends ``auto`` elsewhere. Its custom ops, ``medattn::attention_gate_cuda_*``,
and the plan around them are the ones every fused gate backend shares (``_attention_gate_fused``).
"""
from . import _attention_gate_fused as fused
from ._custom_op import extension

KERNELS = fused.define_custom_ops("cuda", extension("cuda", "attention_gate"))

# medattn_fast.ops calls this with the family's dispatcher
register = fused.registrar("cuda", KERNELS)
