"""Tests on tensor sizes that keep an exported or traced graph valid for every input size.

Used by the ops (window attention's padding), ``nn`` (MT-UNet's window aggregation) and ``models``
(MT-UNet's position embedding): a shape shortcut taken only when :func:`statically_true` holds,
and a crop that stays a gather on symbolic sizes (:func:`crop_grid`).
"""
from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

__all__ = ["crop_grid", "statically_true"]


def statically_true(condition) -> bool:
    """A test on sizes that never fixes them: ``condition`` itself when it is a bool (eager); on the
    symbolic sizes of ``torch.export`` (strict or not) / ``torch.onnx.export``, True only when it
    holds for every size (no guard is added); on the tensor sizes of ``torch.jit.trace``, False. A shape shortcut
    taken only when this is True leaves an exported or traced graph valid for every input size."""
    if isinstance(condition, torch.Tensor):
        return False
    return statically_known_true(condition)   # a bool as is; traceable by dynamo


def crop_grid(grid: torch.Tensor, H, W) -> torch.Tensor:
    """grid (B, Hp, Wp, ...) -> its top-left (B, H, W, ...): a strided view on plain ints; on the
    symbolic or traced sizes of an exported graph a gather instead, since a slice that may or may
    not span the whole dim makes the exporter fix which one it is (the graph then only holds for
    sizes like the example's)."""
    if isinstance(H, int) and isinstance(W, int):
        return grid[:, :H, :W]
    return grid.index_select(1, torch.arange(H, device=grid.device)).index_select(
        2, torch.arange(W, device=grid.device))
