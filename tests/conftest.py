"""Test configuration.

On a machine without CUDA, the Triton kernels run under the interpreter: TRITON_INTERPRET must be
set before any ``@triton.jit`` function is created, so it is set here, before the package imports.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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


def pytest_collection_modifyitems(config, items):
    # MEDATTN_GPU_TEST_DEVICE=cpu: the dry run of the GPU tests (tests/_tolerance.py, gpu_device)
    if torch.cuda.is_available() or os.environ.get("MEDATTN_GPU_TEST_DEVICE") == "cpu":
        return
    for item in items:
        if "gpu" in item.keywords and config.getoption("-m") and "gpu" in config.getoption("-m") \
                and "not gpu" not in config.getoption("-m"):
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
