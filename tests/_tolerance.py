"""The tolerance rule of the fused-kernel tests, in one place.

A fused backend's error against the float64 reference may be at most twice PyTorch's own error in
the same dtype — the worse of the ``torch`` backend (float32 accumulation) and, for 16-bit inputs,
the ``reference`` backend run in that dtype — plus a small slack per dtype relative to the largest
reference value (``EPS``): float32, a few roundoffs accumulated in a different (blocked, online)
order; 16-bit, one unit in the last place, since both results are rounded to the dtype and may land
on either side.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

import torch

F64 = torch.float64
EPS = {torch.float32: 1e-5, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def default_device() -> torch.device:
    """CUDA where there is one, else the CPU (the Triton kernels then run under the interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def gpu_device() -> torch.device:
    """The device of the ``-m gpu`` tests: CUDA; with ``MEDATTN_GPU_TEST_DEVICE=cpu`` the CPU, a dry
    run of those tests' own logic (shapes, tolerances, calls) with the Triton kernels under the
    interpreter — float32/bfloat16 only, and the ``cuda`` backend cannot run there — so that a GPU
    lease is not spent finding a broken test."""
    return torch.device(os.environ.get("MEDATTN_GPU_TEST_DEVICE", "cuda"))


def max_errors(results: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> List[float]:
    """Max abs difference of each result from its float64 reference."""
    return [(r.double() - ref).abs().max().item() for r, ref in zip(results, reference)]


def worse(a: Sequence[float], b: Optional[Sequence[float]]) -> List[float]:
    """Element-wise max of two error lists (``b`` None: ``a``)."""
    return list(a) if b is None else [max(x, y) for x, y in zip(a, b)]


def assert_within_twice(fused: Sequence[torch.Tensor], yardstick: Sequence[float],
                        reference: Sequence[torch.Tensor], dtype: torch.dtype, names: Sequence[str],
                        what: str = "") -> None:
    """Each fused result within ``2 · yardstick + EPS[dtype] · max(1, |reference|max)``."""
    for name, err, base, ref in zip(names, max_errors(fused, reference), yardstick, reference):
        bound = 2 * base + EPS[dtype] * max(1.0, ref.abs().max().item())
        assert err <= bound, (f"{what}{': ' if what else ''}{name} error {err:.3g} > bound {bound:.3g} "
                              f"(PyTorch's own error {base:.3g})")
