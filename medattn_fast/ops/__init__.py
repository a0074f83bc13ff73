"""The op families: one public module per family (validation, dispatch, the ``reference`` and
``torch`` backends) and one ``_<family>_<backend>.py`` per fused backend (its ``torch.library``
custom ops ``medattn::<family>_<backend>_<fwd|bwd>`` and a ``register`` function).

The table of families (``_families.FAMILIES``) names every family's fused backends; each is added to
its family's dispatchers here, by an explicit ``register`` call, once, when the package is first
imported; nothing of ``medattn_fast.nn`` is imported.
"""
import importlib

from . import attention_gate, channel, external, gaussian_axial, position, window
from ._families import FAMILIES, dispatcher

for _family in FAMILIES:
    for _backend in _family.backends:
        importlib.import_module(f"._{_family.name}_{_backend}", __name__).register(
            *(dispatcher(name) for name in _family.dispatchers))
del _family, _backend

__all__ = ["attention_gate", "channel", "external", "gaussian_axial", "position", "window"]
