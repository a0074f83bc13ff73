r"""Export for deployment: ONNX (ONNX Runtime, TensorRT) and ``torch.export``.

Plain ``torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=...)`` works on every model and
drop-in of this package: while the exporter runs, each fused op takes its plain-ATen path (see
:func:`medattn_fast.backend.portable`), which the exporter lowers to standard ONNX ops. This module
only saves writing the dynamic-shape specification::

    import medattn_fast.export
    onnx_program = medattn_fast.export.to_onnx(model.eval(), torch.randn(1, 1, 224, 224), "model.onnx")

``torch.export.export(model, (x,))`` keeps the fused ``medattn::`` custom ops; ``torch.export.load``
finds them once ``medattn_fast`` is imported.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .backend import portable

__all__ = ["dynamic_shapes", "to_onnx", "portable"]


def dynamic_shapes(example: torch.Tensor, *, batch: bool = True, spatial: bool = True,
                   multiple_of: int = 1) -> Tuple[Dict[int, object]]:
    """``dynamic_shapes`` for a model called as ``model(x)`` with x (B, C, *S): the batch size and
    the spatial sizes symbolic.

    ``multiple_of=1``: the sizes are ``Dim.AUTO`` (symbolic wherever the network allows; a size the
    network fixes is specialised by the exporter, not refused). ``multiple_of=m``: each spatial
    size is ``m · Dim`` — for networks that need multiples of m (MTUNet and MSGANet: 32), whose
    divisibility guards the exporter cannot solve for an ``AUTO`` size. The example's sizes must
    then be multiples of m.
    """
    if not isinstance(example, torch.Tensor) or example.dim() < 2:
        raise TypeError(f"dynamic_shapes: argument 'example' must be a (B, C, *S) tensor, got "
                        f"{type(example).__name__}{tuple(example.shape) if isinstance(example, torch.Tensor) else ''}")
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
        raise ValueError(f"dynamic_shapes: argument 'multiple_of' must be a positive int, got {multiple_of!r}")
    if spatial and multiple_of > 1 and any(s % multiple_of for s in example.shape[2:]):
        raise ValueError(f"dynamic_shapes: the example's spatial sizes {tuple(example.shape[2:])} must be multiples "
                         f"of multiple_of={multiple_of}")
    dims: Dict[int, object] = {}
    if batch:
        dims[0] = torch.export.Dim.AUTO
    if spatial:
        for d in range(2, example.dim()):
            dims[d] = (torch.export.Dim.AUTO if multiple_of == 1
                       else multiple_of * torch.export.Dim(f"spatial{d - 2}", min=1))
    return (dims,)


def to_onnx(model: torch.nn.Module, example: torch.Tensor, path: Optional[str] = None, *, dynamic: bool = True,
            multiple_of: int = 1, **kwargs):
    """``torch.onnx.export(model, (example,), path, dynamo=True)`` with a dynamic batch size and
    spatial sizes (``dynamic=False``: the example's shape; ``multiple_of``: see
    :func:`dynamic_shapes`). Other keyword arguments go to
    ``torch.onnx.export``. Returns the ``torch.onnx.ONNXProgram`` (saved to ``path`` if given).
    Needs the ``onnx`` extra (``pip install medattn-fast[onnx]``)."""
    if dynamic:
        kwargs.setdefault("dynamic_shapes", dynamic_shapes(example, multiple_of=multiple_of))
    return torch.onnx.export(model, (example,), path, dynamo=True, **kwargs)
