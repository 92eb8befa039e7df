"""Voxel spacing of --input volumes (engine/spacing.py): a NIfTI's voxel sizes in the axis order the model sees,
resampling of anisotropic volumes to isotropic voxels checked against linear interpolation written out by hand,
--input-spacing for .npy files, --no-resample, and the CSV's notes column."""

from __future__ import annotations

import csv

import nibabel
import numpy as np
import pytest

import predict
import train
from engine.inputs import preprocess
from engine.inputs import read_volume
from engine.spacing import nifti_spacing, resample_isotropic

TINY = ["--model.dim", "16", "--model.memory_tokens", "16", "--model.heads", "2", "--train.batch_size", "32",
        "--train.epochs", "1", "--output.plots", "false"]


def doubled_by_hand(x: np.ndarray) -> np.ndarray:
    """Axis 0 of `x` resampled to twice as many samples by linear interpolation at the centres of the new voxels
    (new voxel i sits at old coordinate (i + 0.5) / 2 - 0.5, clamped to the first and last old voxel)."""
    n = x.shape[0]
    out = []
    for i in range(2 * n):
        c = min(max((i + 0.5) / 2 - 0.5, 0.0), n - 1.0)
        lo = int(np.floor(c))
        hi = min(lo + 1, n - 1)
        w = c - lo
        out.append((1 - w) * x[lo] + w * x[hi])
    return np.stack(out)


def test_nifti_spacing_follows_the_reorientation(tmp_path):
    # array axes (i, j, k) -> world (A, S, R) with voxel sizes (1, 2, 1): in (S, A, R) order that is (2, 1, 1)
    affine = np.array([[0, 0, 1, 0], [1, 0, 0, 0], [0, 2, 0, 0], [0, 0, 0, 1]], dtype=float)
    nibabel.save(nibabel.Nifti1Image(np.zeros((3, 4, 5), np.float32), affine), tmp_path / "permuted.nii.gz")
    assert nifti_spacing(tmp_path / "permuted.nii.gz") == pytest.approx((2.0, 1.0, 1.0))
    nibabel.save(nibabel.Nifti1Image(np.zeros((3, 4, 5), np.float32), np.diag([0.7, 0.7, 5.0, 1])), tmp_path / "ct.nii")
    assert nifti_spacing(tmp_path / "ct.nii") == pytest.approx((5.0, 0.7, 0.7))


def test_an_anisotropic_nifti_is_resampled_to_isotropic_voxels_by_hand(tmp_path):
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(3, 4, 5))  # (S, A, R): slices 2 mm apart, 1 mm pixels
    nibabel.save(nibabel.Nifti1Image(volume.transpose(2, 1, 0), np.diag([1.0, 1.0, 2.0, 1.0])), tmp_path / "v.nii.gz")
    got, note = read_volume(tmp_path / "v.nii.gz")
    assert got.shape == (6, 4, 5)
    np.testing.assert_allclose(got, doubled_by_hand(volume), atol=1e-5)
    assert "isotropic 1 mm" in note and "(3, 4, 5) -> (6, 4, 5)" in note
    off, note = read_volume(tmp_path / "v.nii.gz", resample=False)
    np.testing.assert_allclose(off, volume)
    assert note == ""


def test_isotropic_within_the_tolerance_is_left_alone():
    x = np.arange(8.0).reshape(2, 2, 2)
    same, note = resample_isotropic(x, (1.0, 1.0, 1.005))
    assert same is x and note == ""
    halved, _ = resample_isotropic(np.arange(4.0).reshape(2, 1, 2), (1, 2, 1))  # axis 1 doubled
    np.testing.assert_allclose(halved, doubled_by_hand(np.arange(4.0).reshape(2, 1, 2).transpose(1, 0, 2))
                               .transpose(1, 0, 2), atol=1e-6)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    common = ["--output.dir", str(out), "--output.name", "tiny", *TINY]
    assert train.main(["demo.json", *common]) == 0
    return common


def test_input_spacing_of_npy_files_and_the_notes_column(trained, tmp_path):
    rng = np.random.default_rng(1)
    volume = rng.normal(size=(14, 28, 28))
    np.save(tmp_path / "thick.npy", volume)
    out = tmp_path / "p.csv"
    seen = tmp_path / "seen"
    assert predict.main(["demo.json", *trained, "--input", str(tmp_path / "thick.npy"), "--input-spacing", "2", "1",
                         "1", "--out", str(out), "--save-preprocessed", str(seen)]) == 0
    (row,) = csv.DictReader(out.open())
    assert "resampled" in row["notes"] and "(14, 28, 28) -> (28, 28, 28)" in row["notes"]
    (saved,) = seen.glob("*.npy")
    expected = preprocess(doubled_by_hand(volume), dims=3, size=28)  # already 28^3 after resampling: no resize
    np.testing.assert_array_equal(np.rint(np.load(saved) * 255).astype(np.uint8), expected)
    assert predict.main(["demo.json", *trained, "--input", str(tmp_path / "thick.npy"), "--input-spacing", "2", "1",
                         "1", "--no-resample", "--out", str(out)]) == 0
    (row,) = csv.DictReader(out.open())
    assert row["notes"] == ""
