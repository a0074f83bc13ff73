"""The op families: one public module per family (validation, dispatch, the ``reference`` and
``torch`` backends) and one ``_<family>_<backend>.py`` per fused backend (its ``torch.library``
custom ops ``medattn::<family>_<backend>_<fwd|bwd>`` and a ``register`` function).

The fused backends are added to their family's dispatcher here, by explicit calls, once, when the
package is first imported; nothing of ``medattn_fast.nn`` is imported.
"""
from . import attention_gate, channel, external, gaussian_axial, position, window
from . import (_attention_gate_cpp, _attention_gate_cuda, _attention_gate_triton, _channel_cpp, _channel_triton,
               _external_triton, _gaussian_axial_cpp, _gaussian_axial_triton, _position_cpp, _position_triton,
               _window_triton)

for _backend in (_position_cpp, _position_triton):
    _backend.register(position._op)
for _backend in (_channel_cpp, _channel_triton):
    _backend.register(channel._op)
for _backend in (_gaussian_axial_cpp, _gaussian_axial_triton):
    _backend.register(gaussian_axial._op_qkv, gaussian_axial._op_scores)
_window_triton.register(window._op)
_external_triton.register(external._op)
for _backend in (_attention_gate_cpp, _attention_gate_cuda, _attention_gate_triton):
    _backend.register(attention_gate._op)
del _backend

__all__ = ["attention_gate", "channel", "external", "gaussian_axial", "position", "window"]
