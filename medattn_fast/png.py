r"""A tiny PNG writer (zlib + struct, no imaging dependency) and the training snapshot panels.

PNG layout written here (the minimum a viewer needs, PNG spec §5, §11):

* the 8-byte signature ``\x89PNG\r\n\x1a\n``;
* an ``IHDR`` chunk: width, height (big-endian uint32), bit depth 8, colour type 0 (grey) or
  2 (RGB), compression 0, filter 0, interlace 0;
* one ``IDAT`` chunk: the zlib stream of the rows, each prefixed by its filter byte 0 (None);
* an empty ``IEND`` chunk.

Each chunk is ``length (uint32) | type (4 bytes) | data | CRC-32 of type + data``.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

__all__ = ["encode_png", "write_png", "label_colors", "heat_colors", "gray_colors", "snapshot_panels"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(pixels: np.ndarray) -> bytes:
    """The PNG bytes of ``pixels``: uint8 ``(H, W)`` (greyscale) or ``(H, W, 3)`` (RGB)."""
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:
        raise TypeError(f"encode_png: argument 'pixels' must be uint8, got {pixels.dtype}")
    if pixels.ndim == 2:
        color_type = 0
    elif pixels.ndim == 3 and pixels.shape[2] == 3:
        color_type = 2
    else:
        raise ValueError(f"encode_png: argument 'pixels' must have shape (H, W) or (H, W, 3), got {pixels.shape}")
    height, width = pixels.shape[:2]
    if height == 0 or width == 0:
        raise ValueError(f"encode_png: argument 'pixels' must not be empty, got {pixels.shape}")
    rows = np.ascontiguousarray(pixels).reshape(height, -1)
    # filter type 0 (None) in front of every row
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 6)) + _chunk(b"IEND", b"")


def write_png(path: Union[str, Path], pixels: np.ndarray) -> Path:
    """Write ``pixels`` (see :func:`encode_png`) to ``path``; returns the path."""
    path = Path(path)
    path.write_bytes(encode_png(pixels))
    return path


# --------------------------------------------------------------------------------------------
# colour maps: float / int arrays -> uint8 RGB (H, W, 3)
# --------------------------------------------------------------------------------------------
# class colours: background black, then well-separated hues (cycled past the table)
_LABEL_PALETTE = np.array([
    (0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
], dtype=np.uint8)

# a perceptually ordered dark-blue -> teal -> yellow ramp (viridis-like anchors), for [0, 1] maps
_HEAT_ANCHORS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], np.float64)


def gray_colors(values: np.ndarray, low: Optional[float] = None, high: Optional[float] = None) -> np.ndarray:
    """Greyscale RGB of a float image, windowed to [low, high] (default: its 1st–99th percentiles)."""
    values = np.asarray(values, dtype=np.float64)
    low = float(np.percentile(values, 1)) if low is None else low
    high = float(np.percentile(values, 99)) if high is None else high
    scaled = np.clip((values - low) / max(high - low, 1e-12), 0.0, 1.0)
    grey = np.round(scaled * 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def label_colors(labels: np.ndarray) -> np.ndarray:
    """RGB of an integer label map: 0 black, class k the k-th palette colour (cycled)."""
    labels = np.asarray(labels).astype(np.int64)
    index = np.where(labels == 0, 0, (labels - 1) % (len(_LABEL_PALETTE) - 1) + 1)
    return _LABEL_PALETTE[index]


def heat_colors(values: np.ndarray, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """RGB of a float map in [low, high] on a viridis-like ramp (piecewise linear between anchors)."""
    t = np.clip((np.asarray(values, np.float64) - low) / max(high - low, 1e-12), 0.0, 1.0)
    position = t * (len(_HEAT_ANCHORS) - 1)
    left = np.minimum(np.floor(position).astype(np.int64), len(_HEAT_ANCHORS) - 2)
    frac = (position - left)[..., None]
    rgb = _HEAT_ANCHORS[left] * (1.0 - frac) + _HEAT_ANCHORS[left + 1] * frac
    return np.round(rgb).astype(np.uint8)


def _resize_nearest(values: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resampling of a 2-D array to ``shape`` (attention maps of coarse levels)."""
    rows = (np.arange(shape[0]) * values.shape[0] // shape[0]).clip(0, values.shape[0] - 1)
    cols = (np.arange(shape[1]) * values.shape[1] // shape[1]).clip(0, values.shape[1] - 1)
    return values[np.ix_(rows, cols)]


def middle_slice(array: np.ndarray, spatial_dims: int, depth_of: Optional[int] = None) -> np.ndarray:
    """The middle slice along the first spatial axis of a 3-D array (a 2-D array is returned as is);
    ``depth_of``: the slice at the same relative depth as the middle one of a volume that deep (an
    attention map of a coarser level beside its image)."""
    if spatial_dims != 3:
        return array
    if depth_of is None:
        return array[array.shape[0] // 2]
    return array[min(array.shape[0] * (depth_of // 2) // depth_of, array.shape[0] - 1)]


def snapshot_panels(image: np.ndarray, label: np.ndarray, prediction: np.ndarray,
                    attention: Sequence[np.ndarray] = (), *, separator: int = 2) -> np.ndarray:
    """One RGB strip, panels side by side: input (first channel, grey), label, prediction (class
    colours), then each attention map (heat, nearest-upsampled to the image size).

    Args: ``image (C, *S)``, ``label (*S)``, ``prediction (*S)``, ``attention[i] (*S_i)`` or
    ``(1, *S_i)``, with S 2-D or 3-D (3-D volumes show their middle slice along the first axis;
    an attention map's slice is the same relative depth). Returns uint8 ``(H, W_total, 3)``.
    """
    image, label, prediction = np.asarray(image), np.asarray(label), np.asarray(prediction)
    dims = label.ndim
    if image.ndim != dims + 1 or image.shape[1:] != label.shape or prediction.shape != label.shape:
        raise ValueError(f"snapshot_panels: expected image (C, *S), label (*S), prediction (*S); got "
                         f"{image.shape}, {label.shape}, {prediction.shape}")
    panels = [gray_colors(middle_slice(image[0], dims)), label_colors(middle_slice(label, dims)),
              label_colors(middle_slice(prediction, dims))]
    size = panels[0].shape[:2]
    for alpha in attention:
        alpha = np.asarray(alpha, np.float64)
        if alpha.ndim == dims + 1:
            alpha = alpha[0]
        alpha = middle_slice(alpha, dims, depth_of=label.shape[0])
        panels.append(heat_colors(_resize_nearest(alpha, size)))
    gap = np.full((size[0], separator, 3), 255, np.uint8)
    strip = [panels[0]]
    for panel in panels[1:]:
        strip += [gap, panel]
    return np.concatenate(strip, axis=1)
