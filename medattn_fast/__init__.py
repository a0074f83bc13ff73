"""medattn-fast: fused kernels for the attention blocks of medical image segmentation networks.

    import medattn_fast as maf
    import medattn_fast.functional as MF
    maf.set_backend("auto")            # or use_backend(...) / MEDATTN_BACKEND
    maf.convert(model)                 # swap the originals' blocks for fast ones, in place
"""
import importlib.util as _importlib_util
import sys as _sys
from pathlib import Path as _Path


def _alias_checkout_triton_kernels() -> None:
    """Make ``medattn_fast.triton_kernels`` the kernels of the same tree as this package.

    The Triton kernels live in the repository's top-level ``triton_kernels/`` folder. A wheel
    installs them inside the package (``medattn_fast/triton_kernels``: Triton itself ships a
    top-level ``triton_kernels``, which we must not shadow), and then nothing is done here. In a
    checkout (``PYTHONPATH=<checkout>``, or an editable install) the folder beside the package is
    registered under that name, so the kernels always come from the same tree as the package,
    whatever other installs are on the path. Free: its ``__init__`` holds no code and triton
    loads on first use.
    """
    package = _Path(__file__).resolve().parent
    folder = package.parent / "triton_kernels"
    name = __name__ + ".triton_kernels"
    if (package / "triton_kernels").is_dir() or name in _sys.modules or not (folder / "__init__.py").is_file():
        return
    spec = _importlib_util.spec_from_file_location(name, folder / "__init__.py",
                                                   submodule_search_locations=[str(folder)])
    module = _importlib_util.module_from_spec(spec)
    _sys.modules[name] = module
    spec.loader.exec_module(module)


_alias_checkout_triton_kernels()

from . import functional  # noqa: E402,F401
from .backend import BackendUnavailable, get_backend, info, set_backend, use_backend  # noqa: F401
from .kernel_config import KernelConfig, kernel_config, set_kernel_config, use_kernel_config  # noqa: E402,F401

# Bound after the submodule import on purpose: importing ``medattn_fast.convert`` sets the package
# attribute to the module once; this rebinds it to the function (the module stays importable).
from .convert import ConvertReport, convert  # noqa: E402,F401

__version__ = "0.1.0"


__all__ = ["functional", "set_backend", "get_backend", "use_backend", "info", "convert", "BackendUnavailable",
           "KernelConfig", "kernel_config", "set_kernel_config", "use_kernel_config"]
