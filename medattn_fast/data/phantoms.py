r"""Synthetic segmentation phantoms, 2-D or 3-D, generated on the fly (no downloads).

Each item is drawn from its own random stream, seeded by ``(seed, index)``, so item ``i`` is the
same array in every process, every worker and every epoch — which is what makes a resumed or a
distributed run see exactly the data an uninterrupted single-process run would.

An item is built in four steps, on a grid of normalised coordinates ``u ∈ [-1, 1]^d``:

1. **Shapes.** ``num_shapes`` shapes are painted onto a background of label 0, later shapes over
   earlier ones. Every foreground class ``1 … K-1`` gets at least one shape (so each class is
   present in every image unless it is painted over); the rest draw their class uniformly. A shape
   is either

   * an ellipse / ellipsoid with random centre ``c``, semi-axes ``r`` and rotation ``R``:
     ``Σ_d ((R(u − c))_d / r_d)² ≤ 1``, or
   * a blob (a "metaball"): the union-like level set ``Σ_j exp(−|u − c_j|² / (2σ_j²)) ≥ ½`` of
     2–4 Gaussian bumps around a random centre, which gives smooth, non-convex outlines.

2. **Intensities.** Class ``k ≥ 1`` has the mean intensity ``μ_{k,c}`` in channel ``c``, evenly
   spaced in [0.35, 1] (channel ``c`` rolls the levels by ``c``, a crude multi-contrast setting);
   the background is 0. Each shape adds a small jitter (±0.05) to its class's level.

3. **Bias field.** The clean image is multiplied by ``b(u) = exp(β · q(u))`` with ``q`` a random
   quadratic polynomial whose coefficients lie in [−1, 1] (normalised so that ``|q| ≤ 1`` on the
   grid): a smooth, low-frequency, strictly positive gain as MRI coils produce; ``β = bias_strength``.

4. **Noise.** i.i.d. Gaussian noise of standard deviation ``noise_std`` is added.

Returns ``(image, label)``: ``image`` float32 ``(C, *S)``, ``label`` int64 ``(*S)`` with values in
``0 … K-1``.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["PhantomDataset"]


def _check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"PhantomDataset: argument '{name}' must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_range(name: str, value, low: float, high: float) -> Tuple[float, float]:
    """A (min, max) pair with low <= min <= max <= high."""
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"PhantomDataset: argument '{name}' must be a pair (min, max), got {value!r}") from None
    if not low <= a <= b <= high:
        raise ValueError(f"PhantomDataset: argument '{name}' must satisfy {low} <= min <= max <= {high}, "
                         f"got {value!r}")
    return a, b


def _random_rotation(rng: np.random.Generator, dims: int) -> np.ndarray:
    """A uniformly random rotation matrix (d × d, det = +1): QR of a Gaussian matrix, signs fixed."""
    q, r = np.linalg.qr(rng.standard_normal((dims, dims)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


class PhantomDataset(Dataset):
    r"""Seeded synthetic phantoms for segmentation (see the module docstring for the recipe).

    Args:
        length: number of items.
        spatial_size: ``(H, W)`` for 2-D or ``(D, H, W)`` for 3-D.
        num_classes: K, the number of labels including the background (≥ 2).
        in_channels: C, channels of the image.
        num_shapes: ``(min, max)`` shapes per image (inclusive); raised to K-1 if smaller so that
            every foreground class can appear.
        radius_range: ``(min, max)`` semi-axis of the ellipses / spread of the blobs, as a
            fraction of the half-extent of the image (the grid spans [-1, 1] along each axis).
        blob_fraction: probability that a shape is a blob rather than an ellipse / ellipsoid.
        noise_std: standard deviation of the additive Gaussian noise.
        bias_strength: β of the multiplicative bias field ``exp(β q(u))``, ``|q| ≤ 1``.
        seed: the dataset seed; item ``i`` depends only on ``(seed, i)`` and the arguments above.

    ``dataset[i]`` -> ``(image float32 (C, *S), label int64 (*S))``.
    """

    def __init__(self, length: int = 64, spatial_size: Sequence[int] = (64, 64), *, num_classes: int = 3,
                 in_channels: int = 1, num_shapes: Sequence[int] = (2, 5),
                 radius_range: Sequence[float] = (0.15, 0.4), blob_fraction: float = 0.5,
                 noise_std: float = 0.1, bias_strength: float = 0.3, seed: int = 0):
        self.length = _check_positive_int("length", length)
        size = tuple(spatial_size) if isinstance(spatial_size, (tuple, list)) else None
        if size is None or len(size) not in (2, 3) or not all(
                isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 2 for s in size):
            raise ValueError("PhantomDataset: argument 'spatial_size' must be 2 or 3 ints >= 2 "
                             f"((H, W) or (D, H, W)), got {spatial_size!r}")
        self.spatial_size = tuple(int(s) for s in size)
        self.num_classes = _check_positive_int("num_classes", num_classes, minimum=2)
        self.in_channels = _check_positive_int("in_channels", in_channels)
        shapes = tuple(num_shapes) if isinstance(num_shapes, (tuple, list)) else None
        if shapes is None or len(shapes) != 2 or not all(
                isinstance(n, (int, np.integer)) and not isinstance(n, bool) for n in shapes) \
                or not 1 <= shapes[0] <= shapes[1]:
            raise ValueError(f"PhantomDataset: argument 'num_shapes' must be a pair of ints 1 <= min <= max, "
                             f"got {num_shapes!r}")
        self.num_shapes = (max(int(shapes[0]), self.num_classes - 1), max(int(shapes[1]), self.num_classes - 1))
        self.radius_range = _check_range("radius_range", radius_range, 1e-3, 2.0)
        if not 0.0 <= float(blob_fraction) <= 1.0:
            raise ValueError(f"PhantomDataset: argument 'blob_fraction' must be in [0, 1], got {blob_fraction!r}")
        self.blob_fraction = float(blob_fraction)
        for name, value in (("noise_std", noise_std), ("bias_strength", bias_strength)):
            if not float(value) >= 0.0:
                raise ValueError(f"PhantomDataset: argument '{name}' must be >= 0, got {value!r}")
        self.noise_std = float(noise_std)
        self.bias_strength = float(bias_strength)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"PhantomDataset: argument 'seed' must be a non-negative int, got {seed!r}")
        self.seed = int(seed)
        # class k >= 1, channel c: evenly spaced levels in [0.35, 1], rolled by c per channel
        levels = np.linspace(0.35, 1.0, self.num_classes - 1)
        self.class_intensity = np.stack([np.roll(levels, c) for c in range(self.in_channels)], axis=1)

    @property
    def spatial_dims(self) -> int:
        return len(self.spatial_size)

    def __len__(self) -> int:
        return self.length

    def _grid(self) -> np.ndarray:
        """Normalised coordinates, (d, *S), each axis spanning [-1, 1] (pixel centres)."""
        axes = [(np.arange(n) + 0.5) / n * 2.0 - 1.0 for n in self.spatial_size]
        return np.stack(np.meshgrid(*axes, indexing="ij"))

    def _shape_mask(self, rng: np.random.Generator, grid: np.ndarray) -> np.ndarray:
        d = self.spatial_dims
        low, high = self.radius_range
        # keep the centre far enough inside that most of the shape is visible
        centre = rng.uniform(-0.6, 0.6, size=d)
        offset = grid - centre.reshape((d,) + (1,) * d)
        if rng.random() >= self.blob_fraction:
            radii = rng.uniform(low, high, size=d)
            rotated = np.tensordot(_random_rotation(rng, d), offset, axes=1)
            return (np.square(rotated / radii.reshape((d,) + (1,) * d)).sum(0)) <= 1.0
        field = np.zeros(self.spatial_size)
        for _ in range(rng.integers(2, 5)):
            sigma = rng.uniform(low, high) * 0.6
            bump_centre = rng.uniform(-0.5, 0.5, size=d) * high
            dist2 = np.square(offset - bump_centre.reshape((d,) + (1,) * d)).sum(0)
            field += np.exp(-dist2 / (2.0 * sigma * sigma))
        return field >= 0.5

    def _bias_field(self, rng: np.random.Generator, grid: np.ndarray) -> np.ndarray:
        d = self.spatial_dims
        # q(u) = Σ a_i u_i + Σ_{i<=j} b_ij u_i u_j, scaled so that max |q| = 1 on the grid
        q = np.tensordot(rng.uniform(-1, 1, size=d), grid, axes=1)
        for i in range(d):
            for j in range(i, d):
                q = q + rng.uniform(-1, 1) * grid[i] * grid[j]
        q = q / max(float(np.abs(q).max()), 1e-6)
        return np.exp(self.bias_strength * q)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if not -self.length <= index < self.length:
            raise IndexError(f"PhantomDataset: index {index} out of range for length {self.length}")
        index = index % self.length
        # an independent stream per (seed, index): same item in every process, worker and epoch
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, index]))
        grid = self._grid()
        label = np.zeros(self.spatial_size, dtype=np.int64)
        clean = np.zeros((self.in_channels,) + self.spatial_size)
        count = int(rng.integers(self.num_shapes[0], self.num_shapes[1] + 1))
        classes = list(range(1, self.num_classes)) + \
            list(rng.integers(1, self.num_classes, size=count - (self.num_classes - 1)))
        rng.shuffle(classes)
        for k in classes:
            mask = self._shape_mask(rng, grid)
            intensity = self.class_intensity[k - 1] + rng.uniform(-0.05, 0.05, size=self.in_channels)
            label[mask] = k
            clean[:, mask] = intensity[:, None]
        image = clean * self._bias_field(rng, grid) + self.noise_std * rng.standard_normal(clean.shape)
        return torch.from_numpy(image.astype(np.float32)), torch.from_numpy(label)

    def __repr__(self) -> str:
        return (f"PhantomDataset(length={self.length}, spatial_size={self.spatial_size}, "
                f"num_classes={self.num_classes}, in_channels={self.in_channels}, num_shapes={self.num_shapes}, "
                f"noise_std={self.noise_std}, bias_strength={self.bias_strength}, seed={self.seed})")
