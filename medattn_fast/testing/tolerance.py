"""The tolerance rule for a backend's result against the float64 reference, in one place.

Used by ``medattn-fast verify`` (:mod:`medattn_fast.verify`) and by every test that compares a
fused or vectorised backend with the reference (``tests/_compare.py``, the conformance matrix, the
Triton and GPU tests). For one result ``r`` (an output or a gradient) with float64 reference ``ref``:

* float64: ``max|r − ref| <= F64_TOL · max(1, max|ref|)`` — a few roundoffs of the largest value;
* float32 / bfloat16 / float16: ``max|r − ref| <= 2 · yardstick + EPS[dtype] · max(1, max|ref|)``,
  where ``yardstick`` is the error a correct implementation in that dtype can have: the worse of
  (a) PyTorch's own error, the ``reference`` backend run in the same dtype on the same inputs, and
  (b) the error of an ideal implementation in that dtype: the ``reference`` backend in float64 on
  the inputs and cotangent rounded to the dtype, its results rounded to the dtype once
  (:func:`rounded`) — what a kernel that loads the 16-bit inputs, accumulates exactly and stores
  once would make. A result that sums many terms (the gradient of a scalar ``shift`` or ``γ``)
  inherits the inputs' rounding whatever its accumulator, and one run of (a) may land closer by
  chance. Both against the same float64 result. The yardstick is never another
  fused or vectorised backend, so a bug there cannot widen the bound. ``EPS`` is the slack for a different summation
  order: float32, a few roundoffs accumulated in a different (blocked, online) order; 16-bit, one
  unit in the last place at the largest value (bfloat16 keeps 8 significant bits: 2^-7 of the
  value's binade, float16 11: 2^-10), since both results are rounded to the dtype and may land on
  either side.

``max(1, ·)`` makes the bound absolute for small values. A result that is zero in exact arithmetic
(its float64 reference within ``F64_TOL`` of 0: the gradient of a bias that cancels in a softmax or
in a batch-statistics BatchNorm) is nothing but the rounding noise of the terms that cancel, whose
size is that of the call's other results, not its own: its ``EPS`` term is taken relative to the
largest reference value among all the results checked together (:func:`check`). (One run of the
reference is a single draw of that noise; for a result of a few elements, twice one draw is
exceeded by an equally good implementation by chance — about 30 % of the time for a scalar.)
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

F64 = torch.float64
F64_TOL = 1e-10
EPS = {torch.float32: 1e-5, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}

__all__ = ["EPS", "F64", "F64_TOL", "allowed_error", "assert_within_twice", "check", "max_errors", "rounded",
           "worse"]


def rounded(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` rounded to ``dtype`` and back to its own dtype, with its strides (yardstick (b):
    the inputs and cotangent before the float64 reference runs, its results after)."""
    return tensor.detach().to(dtype).to(tensor.dtype)


def max_errors(results: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> List[float]:
    """Max abs difference of each result from its float64 reference (on the reference's device)."""
    return [(r.detach().to(ref.device).double() - ref).abs().max().item() if r.numel() else 0.0
            for r, ref in zip(results, reference)]


def worse(a: Sequence[float], b: Optional[Sequence[float]]) -> List[float]:
    """Element-wise max of two error lists (``b`` None: ``a``)."""
    return list(a) if b is None else [max(x, y) for x, y in zip(a, b)]


def allowed_error(dtype: torch.dtype, reference_max: float, yardstick: Optional[float] = None) -> float:
    """The largest max-abs error a result in ``dtype`` may have against its float64 reference, whose
    largest magnitude is ``reference_max``; ``yardstick``: PyTorch's own error in ``dtype`` (needed
    for every dtype but float64)."""
    scale = max(1.0, float(reference_max))
    if dtype == F64:
        return F64_TOL * scale
    if yardstick is None:
        raise ValueError(f"yardstick: expected PyTorch's own error in {dtype}, got None")
    return 2 * float(yardstick) + EPS[dtype] * scale


def check(results: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], dtype: torch.dtype,
          yardstick: Optional[Sequence[float]] = None) -> List[Tuple[float, float]]:
    """(error, bound) of each result against its float64 reference under the rule above; pass all
    the results of one call (output and every gradient) together, for the zero-result clause."""
    errors = max_errors(results, reference)
    stick = [None] * len(errors) if yardstick is None else list(yardstick)
    sizes = [ref.abs().max().item() if ref.numel() else 0.0 for ref in reference]
    call_scale = max(sizes, default=0.0)
    # zero in exact arithmetic: the noise of the cancelling terms, at the scale of the whole call
    scales = [call_scale if size <= F64_TOL else size for size in sizes]
    return [(err, allowed_error(dtype, scale, base)) for err, scale, base in zip(errors, scales, stick)]


def assert_within_twice(fused: Sequence[torch.Tensor], yardstick: Sequence[float],
                        reference: Sequence[torch.Tensor], dtype: torch.dtype, names: Sequence[str],
                        what: str = "") -> None:
    """Each fused result within :func:`allowed_error` of its float64 reference (float64 results:
    within ``F64_TOL``, ``yardstick`` unused)."""
    for name, (err, bound), base in zip(names, check(fused, reference, dtype, yardstick), yardstick):
        assert err <= bound, (f"{what}{': ' if what else ''}{name} error {err:.3g} > bound {bound:.3g} "
                              f"(PyTorch's own error {base:.3g})")
