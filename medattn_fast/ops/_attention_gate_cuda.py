r"""The ``cuda`` backend: ``csrc/cuda/attention_gate.cu`` (one thread per position with its x column in
registers, W streamed through a few KB of shared memory: no width limit). Its custom ops, ``medattn::attention_gate_cuda_*``,
and the plan around them are the ones every fused gate backend shares (``_attention_gate_fused``).
"""
from . import _attention_gate_fused as fused
from ._custom_op import extension

KERNELS = fused.define_custom_ops("cuda", extension("cuda", "attention_gate"))

# medattn_fast.ops calls this with the family's dispatcher
register = fused.registrar("cuda", KERNELS)
