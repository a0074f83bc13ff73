"""Datasets for training: seeded synthetic phantoms and folders of NumPy / NIfTI volumes.

Both return ``(image float32 (C, *S), label int64 (*S))``.
"""
from .folder import FolderDataset, load_nifti  # noqa: F401
from .phantoms import PhantomDataset  # noqa: F401

__all__ = ["PhantomDataset", "FolderDataset", "load_nifti"]
