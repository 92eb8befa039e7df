"""Voxel spacing of the user's volumes: a NIfTI's voxel sizes in the (S, A, R) axis order `engine.inputs.read_array`
gives its array (engine/inputs.py reads the files and calls these), and resampling to isotropic voxels before the resize to the model's input size.

A CT of 0.7 x 0.7 x 5 mm voxels, resized axis by axis, would treat its few thick slices like thin ones; with
`resample` (the default) a volume whose voxel sizes differ by more than `TOLERANCE` (relative) is first resampled
by trilinear interpolation (`align_corners=False`, as the resize) to isotropic voxels of its smallest voxel size:
axis i of n_i voxels of size s_i gets round(n_i * s_i / min(s)) voxels. `.npy` / `.npz` arrays carry no spacing;
give it (along axes 0, 1, 2) with predict.py's `--input-spacing X Y Z`.

The resize that follows maps every axis to the model's side whatever its length in millimetres, so the anatomy
keeps its proportions only when the region is roughly cubic in millimetres (MedMNIST cropped cubes); resampling
alone changes the resized volume little.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

TOLERANCE = 0.01
"""Voxel sizes within 1 % of each other count as isotropic (no resampling)."""


def nifti_spacing(path: str | Path) -> tuple[float, float, float]:
    """Voxel sizes (mm) of a NIfTI file along the axes of `read_array`'s volume: (S, A, R) after reorientation
    to the closest canonical orientation. Only the header is read."""
    import nibabel

    image = nibabel.load(str(path))
    zooms = [float(z) for z in image.header.get_zooms()[:3]]
    ornt = nibabel.orientations.io_orientation(image.affine)  # row i: world axis (0 R, 1 A, 2 S) of array axis i
    by_world = {int(world): zooms[i] for i, (world, _) in enumerate(ornt[:3])}
    return by_world[2], by_world[1], by_world[0]


def resample_isotropic(volume: np.ndarray, spacing, tolerance: float = TOLERANCE) -> tuple[np.ndarray, str]:
    """(volume, note): `volume` (3 axes) resampled to isotropic voxels of size min(spacing) when its voxel sizes
    differ by more than `tolerance`; otherwise itself and an empty note."""
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"voxel spacing {spacing} is not three positive sizes")
    finest = min(spacing)
    if max(spacing) <= finest * (1 + tolerance):
        return volume, ""
    shape = tuple(max(1, int(round(n * s / finest))) for n, s in zip(volume.shape, spacing))
    dtype = np.float64 if volume.dtype == np.float64 else np.float32  # float32 halves the memory of large scans
    x = torch.from_numpy(np.ascontiguousarray(volume, dtype=dtype))[None, None]
    out = F.interpolate(x, size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()
    sizes = " x ".join(f"{s:g}" for s in spacing)
    return out, (f"resampled from voxels of {sizes} mm (axes 0, 1, 2) to isotropic {finest:g} mm: "
                 f"shape {tuple(volume.shape)} -> {shape}")
