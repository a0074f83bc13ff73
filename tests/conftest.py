"""Test configuration.

On a machine without CUDA, the Triton kernels run under the interpreter: TRITON_INTERPRET must be
set before any ``@triton.jit`` function is created, so it is set here, before the package imports.

The autotune (``medattn_fast.autotune``) writes its cache into a directory of this test session
(never the user's ``~/.cache``), and is off unless ``MEDATTN_AUTOTUNE`` says otherwise: with it on,
a test running ``auto`` would take whichever of cpp and torch the loaded CI machine timed faster, a
choice no rerun reproduces. ``tests/test_autotune.py`` switches it on for its own tests.
"""
import os
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MEDATTN_AUTOTUNE", "0")
# one cache directory per test process (each xdist worker imports this file); removed at exit
_AUTOTUNE_CACHE = tempfile.TemporaryDirectory(prefix="medattn-autotune-")
os.environ["MEDATTN_CACHE_DIR"] = _AUTOTUNE_CACHE.name

from _tolerance import dry_run_dtype_refusal, dry_run_refusal  # noqa: E402  (after TRITON_INTERPRET)


@pytest.fixture(autouse=True)
def _seed_and_backend():
    """Fresh seed per test; every test starts on the default backend."""
    import medattn_fast

    torch.manual_seed(0)
    medattn_fast.set_backend(None)
    yield
    medattn_fast.set_backend(None)


def pytest_make_parametrize_id(config, val, argname):
    """torch dtypes read as ``float32``/``bfloat16``/``float16`` in test ids (not ``dtype0``)."""
    if isinstance(val, torch.dtype):
        return str(val).replace("torch.", "")
    return None


def _is_gpu_test(item) -> bool:
    return item.get_closest_marker("gpu") is not None


def _refused_in_dry_run(item) -> bool:
    """A float16 case: the Triton interpreter refuses it at once (a skip in the dry run)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any(v is torch.float16 for v in params.values()) or "fp16" in item.name


def _round_robin_by_file(items):
    """One item of each test file in turn (the files in collection order, each file's in order)."""
    queues = {}
    for item in items:
        queues.setdefault(item.nodeid.split("::")[0], []).append(item)
    ordered, queues = [], list(queues.values())
    while queues:
        ordered += [q.pop(0) for q in queues]
        queues = [q for q in queues if q]
    return ordered


def pytest_collection_modifyitems(config, items):
    if os.environ.get("MEDATTN_GPU_TEST_DEVICE") == "cpu":
        # The dry run of the GPU tests (tests/_tolerance.py, gpu_device; bench/gpu_check.sh) runs
        # under a time limit, and one slow test can take minutes in the interpreter, so every file
        # (op family) has a case early: first the float16 cases, one of each file in turn (skipped
        # at once with the backend's refusal, pytest_runtest_setup), then the others, again one of
        # each file in turn (the shape tests come first in their files and take small shapes in the
        # dry run), so each family passes a test before any file's slow tail runs.
        gpu = [item for item in items if _is_gpu_test(item)]
        if gpu:
            others = [item for item in items if not _is_gpu_test(item)]
            refused = [item for item in gpu if _refused_in_dry_run(item)]
            rest = [item for item in gpu if item not in refused]
            items[:] = others + _round_robin_by_file(refused) + _round_robin_by_file(rest)
        return
    if torch.cuda.is_available():
        return
    for item in items:
        if _is_gpu_test(item) and config.getoption("-m") and "gpu" in config.getoption("-m") \
                and "not gpu" not in config.getoption("-m"):
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


def pytest_runtest_setup(item):
    """In the dry run, a ``-m gpu`` case whose dtype its backend refuses on the CPU for every call
    (float16 under the Triton interpreter) is skipped before it runs, with the backend's reason
    (tests/_tolerance.py, dry_run_dtype_refusal); on a GPU nothing is skipped here."""
    if not _is_gpu_test(item) or os.environ.get("MEDATTN_GPU_TEST_DEVICE") != "cpu":
        return
    params = getattr(getattr(item, "callspec", None), "params", {})
    backend = params.get("backend", "triton")
    for value in params.values():
        reason = dry_run_dtype_refusal(value, backend) if isinstance(value, torch.dtype) else None
        if reason:
            pytest.skip(reason)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """In the dry run, a ``-m gpu`` test that a backend refuses only because the device is the CPU
    (float16 under the Triton interpreter, the cuda backend) is skipped with the backend's reason
    (tests/_tolerance.py, dry_run_refusal); on a GPU, and for any other refusal, it fails as before."""
    try:
        return (yield)
    except Exception as exc:
        reason = dry_run_refusal(exc) if _is_gpu_test(item) else None
        if reason is None:
            raise
        pytest.skip(reason)
