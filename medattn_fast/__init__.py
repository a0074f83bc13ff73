"""medattn-fast: fused kernels for the attention blocks of medical image segmentation networks.

    import medattn_fast as maf
    import medattn_fast.functional as MF
    maf.set_backend("auto")            # or use_backend(...) / MEDATTN_BACKEND
    maf.convert(model)                 # swap the originals' blocks for fast ones, in place
"""
from . import functional  # noqa: F401
from .backend import BackendUnavailable, get_backend, info, set_backend, use_backend  # noqa: F401

# Bound after the submodule import on purpose: importing ``medattn_fast.convert`` sets the package
# attribute to the module once; this rebinds it to the function (the module stays importable).
from .convert import ConvertReport, convert  # noqa: E402,F401

__version__ = "0.1.0"


__all__ = ["functional", "set_backend", "get_backend", "use_backend", "info", "convert", "BackendUnavailable"]
