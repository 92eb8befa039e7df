"""`synthetic3d` and `synthetic2d`: small, deterministic, offline datasets.

`synthetic3d`: the class is written along the depth axis.

Each volume is low-amplitude uniform noise plus one bright cylinder whose axis runs along depth (axis 0
of the volume), with a random in-plane position, radius and brightness. The class is the cylinder's
length along depth relative to the volume side: 0 = flat disk (about 1/10), 1 = ball-like (about 1/3),
2 = rod (about 3/4). Every slice that cuts the object shows the same disk whatever the class, so
telling the classes apart needs the structure along depth (how many slices the object spans), which
the token Turing machines see as the number of steps that contain it.

`synthetic2d` (grey images): noise plus a horizontal bar (class 0), a vertical bar (1) or both, a plus sign (2),
with a random centre, length, thickness and brightness.
"""

from __future__ import annotations

import numpy as np

from data.info import SPLIT_NAMES, SYNTHETIC_2D_LABEL_NAMES, SYNTHETIC_LABEL_NAMES, SYNTHETIC_SPLIT_SIZES

_SEED = 20_240_817
"""Fixed seed of the generator: the dataset does not depend on any training seed."""
_NOISE_MAX = 31
_RADIUS_RANGE = (0.12, 0.2)  # in-plane radius, fraction of the volume side
_LENGTH_RANGES = ((0.07, 0.13), (0.28, 0.38), (0.65, 0.85))  # length along depth per class, fraction of the side
_PEAK_RANGE = (150.0, 255.0)


def make_synthetic_split(split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Generate one split: images uint8 (N, size, size, size) and labels uint8 (N,).

    The result depends only on `split` and `size` (a local NumPy generator with a fixed seed is
    used; the global random state is neither read nor changed).
    """
    n = SYNTHETIC_SPLIT_SIZES[split]
    num_classes = len(SYNTHETIC_LABEL_NAMES)
    rng = np.random.default_rng([_SEED, SPLIT_NAMES.index(split), size])

    labels = rng.permutation(np.arange(n) % num_classes).astype(np.uint8)
    images = rng.integers(0, _NOISE_MAX + 1, size=(n, size, size, size), dtype=np.uint8)
    for volume, label in zip(images, labels):
        radius = rng.uniform(*_RADIUS_RANGE) * size
        length = max(1, round(rng.uniform(*_LENGTH_RANGES[label]) * size))
        z0 = int(rng.integers(0, size - length + 1))
        centre_y, centre_x = rng.uniform(radius, size - 1.0 - radius, size=2)
        peak = rng.uniform(*_PEAK_RANGE)
        _add_cylinder(volume, z0, z0 + length, (centre_y, centre_x), radius, peak)
    return images, labels


def _add_cylinder(volume: np.ndarray, z0: int, z1: int, centre: tuple[float, float], radius: float,
                  peak: float) -> None:
    """Draw slices z0..z1-1 of an anti-aliased disk into `volume` in place (voxel = max(voxel, disk))."""
    side = volume.shape[1]
    dy = np.arange(side, dtype=np.float32) - centre[0]
    dx = np.arange(side, dtype=np.float32) - centre[1]
    distance = np.sqrt(dy[:, None] ** 2 + dx[None, :] ** 2)
    disk = (peak * np.clip(radius + 0.5 - distance, 0.0, 1.0)).astype(np.uint8)  # one-voxel ramp at the edge
    region = volume[z0:z1]
    np.maximum(region, disk[None], out=region)


def make_synthetic_split_2d(split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Generate one split of `synthetic2d`: images uint8 (N, size, size) and labels uint8 (N,); deterministic."""
    n = SYNTHETIC_SPLIT_SIZES[split]
    rng = np.random.default_rng([_SEED, 2, SPLIT_NAMES.index(split), size])
    labels = rng.permutation(np.arange(n) % len(SYNTHETIC_2D_LABEL_NAMES)).astype(np.uint8)
    images = rng.integers(0, _NOISE_MAX + 1, size=(n, size, size), dtype=np.uint8)
    for image, label in zip(images, labels):
        half = max(1, round(rng.uniform(0.25, 0.4) * size))
        thick = max(1, round(rng.uniform(0.06, 0.12) * size))
        cy, cx = rng.integers(half, size - half, size=2)
        peak = np.uint8(rng.uniform(*_PEAK_RANGE))
        if label in (0, 2):  # horizontal bar
            image[max(0, cy - thick // 2): cy - thick // 2 + thick, cx - half: cx + half] = peak
        if label in (1, 2):  # vertical bar
            image[cy - half: cy + half, max(0, cx - thick // 2): cx - thick // 2 + thick] = peak
    return images, labels
