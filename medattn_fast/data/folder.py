r"""A segmentation dataset over a folder of volumes: NumPy files, or NIfTI through nibabel.

Pairing convention (one case = one image + one label map), searched in ``root`` (not recursively):

=====================================================  ==============================================
files                                                  case
=====================================================  ==============================================
``<case>_img.npy`` + ``<case>_mask.npy``               image and label map as two arrays
``<case>.npz`` with keys ``image`` and ``label``       one archive (``mask`` is accepted for ``label``)
``<case>_img.nii[.gz]`` + ``<case>_mask.nii[.gz]``     NIfTI, read with nibabel (optional extra
                                                       ``pip install medattn-fast[nifti]``)
=====================================================  ==============================================

The suffixes are arguments (``image_suffix="_img"``, ``mask_suffix="_mask"``). A ``*_img`` file
without its ``*_mask`` partner is an error (named), not silently skipped. Cases are sorted by name.

Shapes: the label map is ``(*S)`` (2-D or 3-D); the image is ``(*S)`` (one channel, which is
added) or ``(C, *S)`` (channels first). NIfTI arrays are taken in their on-disk voxel order
``(X, Y, Z)`` (no reorientation); a 4-D NIfTI image is ``(X, Y, Z, C)`` and moved to channels first.

Returns ``(image float32 (C, *S'), label int64 (*S'))`` where ``S' = crop_size`` when given (a
random crop, zero-padded where the volume is smaller, seeded per ``(seed, epoch, index)``; call
:meth:`FolderDataset.set_epoch` to draw new crops each epoch) or ``S`` otherwise. With
``normalize=True`` (default) each channel of the image is z-scored over the whole volume.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["FolderDataset", "load_nifti"]

_NIFTI = re.compile(r"\.nii(\.gz)?$")


def load_nifti(path: Union[str, Path]) -> np.ndarray:
    """The voxel array of a NIfTI file, in its on-disk order, via nibabel (imported here, lazily)."""
    try:
        import nibabel
    except ImportError as exc:
        raise ImportError(
            f"reading NIfTI file {str(path)!r} needs nibabel, which is not installed: "
            "pip install 'medattn-fast[nifti]' (or pip install nibabel), or convert the volumes to .npy/.npz"
        ) from exc
    return np.asanyarray(nibabel.load(str(path)).dataobj)


def _load_array(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if _NIFTI.search(path.name):
        return load_nifti(path)
    raise ValueError(f"FolderDataset: unsupported file {str(path)!r} (expected .npy, .npz, .nii or .nii.gz)")


class FolderDataset(Dataset):
    r"""Image/label pairs from a folder (pairing convention in the module docstring).

    Args:
        root: the folder.
        crop_size: ``(H, W)`` or ``(D, H, W)`` random crops (zero-padded where the volume is
            smaller); ``None`` returns whole volumes (then a batch needs equal sizes).
        normalize: z-score each image channel over the volume.
        image_suffix, mask_suffix: the pairing suffixes of the two-file conventions.
        seed: seed of the crops: the crop of item ``i`` depends on ``(seed, epoch, i)`` only.
    """

    def __init__(self, root: Union[str, Path], *, crop_size: Optional[Sequence[int]] = None,
                 normalize: bool = True, image_suffix: str = "_img", mask_suffix: str = "_mask", seed: int = 0):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"FolderDataset: argument 'root' must be an existing folder, got {str(root)!r}")
        if crop_size is not None:
            crop = tuple(crop_size) if isinstance(crop_size, (tuple, list)) else None
            if crop is None or len(crop) not in (2, 3) or not all(isinstance(c, int) and c >= 1 for c in crop):
                raise ValueError(f"FolderDataset: argument 'crop_size' must be 2 or 3 positive ints, got {crop_size!r}")
            crop_size = crop
        self.crop_size = crop_size
        self.normalize = bool(normalize)
        self.image_suffix, self.mask_suffix = image_suffix, mask_suffix
        self.seed = int(seed)
        self.epoch = 0
        self.cases: List[Tuple[str, Path, Optional[Path]]] = self._find_cases()
        if not self.cases:
            raise ValueError(
                f"FolderDataset: no cases in {str(self.root)!r}: expected <case>{image_suffix}.npy + "
                f"<case>{mask_suffix}.npy, <case>.npz (keys 'image', 'label') or "
                f"<case>{image_suffix}.nii[.gz] + <case>{mask_suffix}.nii[.gz]"
            )

    def _find_cases(self) -> List[Tuple[str, Path, Optional[Path]]]:
        cases = []
        for path in sorted(self.root.iterdir()):
            name = path.name
            if name.endswith(".npz"):
                cases.append((name[:-4], path, None))
                continue
            match = re.match(rf"(.+){re.escape(self.image_suffix)}(\.npy|\.nii\.gz|\.nii)$", name)
            if match is None:
                continue
            mask = path.with_name(f"{match.group(1)}{self.mask_suffix}{match.group(2)}")
            if not mask.exists():
                raise ValueError(f"FolderDataset: image {name!r} has no label file: expected {mask.name!r} beside it")
            cases.append((match.group(1), path, mask))
        return cases

    def set_epoch(self, epoch: int) -> None:
        """Draw the crops of epoch ``epoch`` (the crops are a function of (seed, epoch, index))."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.cases)

    def load(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """The raw (image (C, *S), label (*S)) arrays of case ``index``, channels first, uncropped."""
        name, image_path, mask_path = self.cases[index]
        if mask_path is None:
            with np.load(image_path, allow_pickle=False) as archive:
                keys = set(archive.files)
                label_key = "label" if "label" in keys else "mask" if "mask" in keys else None
                if "image" not in keys or label_key is None:
                    raise ValueError(f"FolderDataset: {image_path.name!r} must hold arrays 'image' and 'label' "
                                     f"(or 'mask'), got keys {sorted(keys)}")
                image, label = archive["image"], archive[label_key]
        else:
            image, label = _load_array(image_path), _load_array(mask_path)
            if _NIFTI.search(image_path.name) and image.ndim == label.ndim + 1:
                image = np.moveaxis(image, -1, 0)  # NIfTI stores channels last
        if label.ndim not in (2, 3):
            raise ValueError(f"FolderDataset: case {name!r}: the label map must be 2-D or 3-D, got shape {label.shape}")
        if image.ndim == label.ndim:
            image = image[None]
        if image.ndim != label.ndim + 1 or image.shape[1:] != label.shape:
            raise ValueError(f"FolderDataset: case {name!r}: image shape {image.shape} does not match label shape "
                             f"{label.shape} (expected (*S) or (C, *S) with S = the label's shape)")
        if not np.issubdtype(label.dtype, np.integer):
            if not np.all(np.equal(np.mod(label, 1), 0)):
                raise ValueError(f"FolderDataset: case {name!r}: the label map must hold integer class ids, "
                                 f"got non-integer values of dtype {label.dtype}")
        if label.min() < 0:
            raise ValueError(f"FolderDataset: case {name!r}: class ids must be >= 0, got {label.min()}")
        return image, label

    def num_classes(self) -> int:
        """1 + the largest class id over all cases (reads every label map once)."""
        return 1 + max(int(self.load(i)[1].max()) for i in range(len(self)))

    def _crop(self, image: np.ndarray, label: np.ndarray, index: int) -> Tuple[np.ndarray, np.ndarray]:
        crop = self.crop_size
        if len(crop) != label.ndim:
            raise ValueError(f"FolderDataset: crop_size {crop} has {len(crop)} dims, the volumes have {label.ndim}")
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, index]))
        pad = [(0, max(c - n, 0)) for c, n in zip(crop, label.shape)]
        image = np.pad(image, [(0, 0)] + pad)
        label = np.pad(label, pad)
        starts = [int(rng.integers(0, n - c + 1)) for c, n in zip(crop, label.shape)]
        window = tuple(slice(s, s + c) for s, c in zip(starts, crop))
        return image[(slice(None),) + window], label[window]

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        image, label = self.load(index)
        image = image.astype(np.float32)
        if self.normalize:
            axes = tuple(range(1, image.ndim))
            image = (image - image.mean(axes, keepdims=True)) / (image.std(axes, keepdims=True) + 1e-6)
        if self.crop_size is not None:
            image, label = self._crop(image, label, index)
        return (torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
                torch.from_numpy(np.ascontiguousarray(label).astype(np.int64)))

    def __repr__(self) -> str:
        return f"FolderDataset(root={str(self.root)!r}, cases={len(self)}, crop_size={self.crop_size})"
