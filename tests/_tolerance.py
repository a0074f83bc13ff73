"""The test devices and the GPU dry run's refusal rules; the tolerance rule itself lives in the library (medattn_fast.testing.tolerance,
shared with ``medattn-fast verify``) and is re-exported here for the tests that import it by this name."""
from __future__ import annotations

import os
from typing import Optional

import torch

from medattn_fast.testing.tolerance import (EPS, F64, F64_TOL, allowed_error, assert_within_twice,  # noqa: F401
                                            check, max_errors, worse)


def default_device() -> torch.device:
    """CUDA where there is one, else the CPU (the Triton kernels then run under the interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def gpu_device() -> torch.device:
    """The device of the ``-m gpu`` tests: CUDA; with ``MEDATTN_GPU_TEST_DEVICE=cpu`` the CPU, a dry
    run of those tests' own logic (shapes, tolerances, calls) with the Triton kernels under the
    interpreter — float32/bfloat16 only, and the ``cuda`` backend cannot run there — so that a GPU
    lease is not spent finding a broken test."""
    return torch.device(os.environ.get("MEDATTN_GPU_TEST_DEVICE", "cuda"))


def dry_run() -> bool:
    """Whether the ``-m gpu`` tests run as the CPU dry run (``MEDATTN_GPU_TEST_DEVICE=cpu``)."""
    return gpu_device().type != "cuda"


# A backend's refusals that only the dry-run device causes (``medattn_fast.backend``'s predicates):
# on a GPU the same call runs. float64 is refused on a GPU too, so it is not among them.
DRY_RUN_REFUSALS = (
    "the Triton interpreter on CPU supports float32/bfloat16, got torch.float16",
    "the cuda backend runs on CUDA tensors, got device cpu",
)


def dry_run_refusal(exc: BaseException) -> Optional[str]:
    """The skip reason for a ``-m gpu`` test that ``exc`` ended, when ``exc`` is (or was raised
    from) a backend's ``BackendUnavailable`` whose every reason is the dry-run device's
    (:data:`DRY_RUN_REFUSALS`), and the tests run as the dry run; else None: on a GPU every refusal,
    and in the dry run any other refusal (a size limit, float64), stays a failure."""
    if not dry_run():
        return None
    from medattn_fast import BackendUnavailable

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, BackendUnavailable):
            _, marker, listed = str(exc).partition("cannot run this call: ")
            reasons = listed.split("; ") if marker else []
            if reasons and all(r.strip() in DRY_RUN_REFUSALS for r in reasons):
                return f"dry run on the CPU (MEDATTN_GPU_TEST_DEVICE=cpu): {exc}"
            return None
        exc = exc.__cause__ or exc.__context__
    return None


def dry_run_dtype_refusal(dtype: torch.dtype, backend: str = "triton") -> Optional[str]:
    """The skip reason for a ``-m gpu`` case in ``dtype`` on ``backend`` that the backend refuses on
    the dry-run device for every call (its device predicate in ``medattn_fast.backend`` on a
    ``dtype`` tensor of that device, every reason one of :data:`DRY_RUN_REFUSALS`), asked before the
    case runs: a float16 case at a model's shapes spends a minute on the CPU computing its float64
    and float16 references before the call that is refused. None on a GPU, and where the backend
    may run the dtype there."""
    if not dry_run():
        return None
    from medattn_fast import backend as B

    if backend not in B.BACKENDS:
        return None
    reasons = B.device_predicate(backend, "")(torch.empty(0, dtype=dtype, device=gpu_device()))
    if reasons and all(r in DRY_RUN_REFUSALS for r in reasons):
        return (f"dry run on the CPU (MEDATTN_GPU_TEST_DEVICE=cpu): backend {backend!r} refuses every {dtype} "
                "call there: " + "; ".join(reasons))
    return None


def require_cuda_device(why: str) -> None:
    """Skip the calling ``-m gpu`` test in the dry run: it measures or asserts something only a CUDA
    device has (``why``: what, e.g. "CUDA memory statistics")."""
    if dry_run():
        import pytest

        pytest.skip(f"dry run on the CPU (MEDATTN_GPU_TEST_DEVICE=cpu): needs a CUDA device for {why}")

