"""One comparison for the path, property and autocast tests: a backend's output and the gradient of
every leaf against the ``reference`` backend in float64, on the same inputs and cotangent.

The rule is the library's (medattn_fast.testing.tolerance, shared with ``medattn-fast verify``):

* float64 (``torch``, ``cpp``): within a few roundoffs of the largest reference value (``F64_TOL``).
* float32 / 16-bit: at most twice the error of the ``reference`` backend run in that dtype
  (PyTorch's own error; or, where larger, the error of the float64 reference on the inputs
  rounded to the dtype, rounded once to the dtype), plus ``EPS[dtype]`` relative to the largest reference value. The yardstick is the
  reference, never another fused or vectorised backend, so a bug there cannot widen the bound.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch

from medattn_fast.testing.tolerance import F64, assert_within_twice, max_errors, rounded, worse


def results(fn: Callable, leaves: Sequence[torch.Tensor], cotangent, backend: str,
            dtype: Optional[torch.dtype] = None) -> List[torch.Tensor]:
    """``[fn(*leaves), d/d leaf ...]`` on fresh copies of the leaves (cast to ``dtype`` if given).
    ``cotangent``: a tensor, or a callable making one from the output."""
    copies = [t.detach().to(dtype or t.dtype).requires_grad_(True) for t in leaves]
    out = fn(*copies, backend=backend)
    cot = cotangent(out) if callable(cotangent) else cotangent
    grads = torch.autograd.grad(out, copies, cot.to(out.dtype), allow_unused=True)
    return [out.detach()] + [g if g is not None else torch.zeros_like(c) for g, c in zip(grads, copies)]


def reference_results(fn: Callable, leaves: Sequence[torch.Tensor]):
    """(float64 reference results, the fresh random float64 cotangent they used)."""
    made = []

    def cotangent(out):
        made.append(torch.randn(out.shape, dtype=F64, device=out.device))
        return made[0]

    exact = results(fn, leaves, cotangent, "reference", F64)
    return exact, made[0]


def assert_matches_reference(fn: Callable, leaves: Sequence[torch.Tensor], backend: str,
                             dtype: torch.dtype, names: Optional[Sequence[str]] = None, what: str = "") -> None:
    """``backend`` in ``dtype`` vs the float64 reference: output and every gradient."""
    names = ["output"] + list(names or [f"grad {i}" for i in range(len(leaves))])
    exact, cotangent = reference_results(fn, leaves)
    got = results(fn, leaves, cotangent, backend, dtype)
    assert got[0].dtype == dtype and got[0].shape == exact[0].shape, (got[0].dtype, got[0].shape)
    label = f"{what}{': ' if what else ''}{backend} {dtype}"
    if dtype == F64:
        yardstick = [0.0] * len(exact)    # float64: the bound is F64_TOL alone
    else:
        yardstick = worse(max_errors(results(fn, leaves, cotangent, "reference", dtype), exact),
                          max_errors([rounded(r, dtype) for r in results(fn, [rounded(t, dtype) for t in leaves],
                                                                         rounded(cotangent, dtype), "reference", F64)],
                                     exact))
    assert_within_twice(got, yardstick, exact, dtype, names, label)
