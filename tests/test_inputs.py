"""predict.py --input: the user's own NIfTI / NumPy / image files, read, oriented, scaled and resized as
MedMNIST volumes were made, scored like a MedMNIST split, bad files reported row by row."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import nibabel
import numpy as np
import pytest
from PIL import Image

from helpers import write_fake_2d, write_fake_medmnist

import predict
import train
from engine.inputs import InputError, preprocess, read_array

REPO = Path(__file__).resolve().parent.parent
TINY = ["--model.dim", "16", "--model.memory_tokens", "16", "--model.heads", "2", "--train.batch_size", "16",
        "--eval.batch_size", "32", "--train.lr", "0.001", "--output.plots", "false"]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------------------
# reading and preprocessing, against hand computations
# ----------------------------------------------------------------------------------------------------------

def test_nifti_is_reoriented_to_canonical_then_depth_first(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(4, 5, 6))
    # x and z stored flipped (the affine's -1): canonical RAS+ undoes both flips
    nibabel.save(nibabel.Nifti1Image(data, np.diag([-1.0, 1.0, -1.0, 1.0])), tmp_path / "flipped.nii.gz")
    canonical = data[::-1, :, ::-1]  # (R, A, S) by hand
    expected = np.transpose(canonical, (2, 1, 0))  # axis 0 = S (axial slices), then A, then R
    np.testing.assert_allclose(read_array(tmp_path / "flipped.nii.gz"), expected)
    # the same anatomy stored already canonical reads the same
    nibabel.save(nibabel.Nifti1Image(canonical.copy(), np.eye(4)), tmp_path / "ras.nii")
    np.testing.assert_allclose(read_array(tmp_path / "ras.nii"), expected)


def test_npz_must_hold_one_array(tmp_path):
    np.savez(tmp_path / "one.npz", volume=np.ones((3, 3, 3)))
    np.savez(tmp_path / "two.npz", a=np.ones(3), b=np.ones(3))
    assert read_array(tmp_path / "one.npz").shape == (3, 3, 3)
    with pytest.raises(InputError, match="holds 2 arrays"):
        read_array(tmp_path / "two.npz")


def test_min_max_scaling_and_window_by_hand():
    x = np.arange(27, dtype=float).reshape(3, 3, 3) * 10 - 100  # -100 .. 160
    got = preprocess(x, dims=3, size=3)
    np.testing.assert_array_equal(got[0], np.rint((x + 100) / 260 * 255).astype(np.uint8))
    got = preprocess(x, dims=3, size=3, window=(-50, 50))
    np.testing.assert_array_equal(got[0], np.rint((np.clip(x, -50, 50) + 50) / 100 * 255).astype(np.uint8))
    assert not preprocess(np.full((3, 3, 3), 7.0), dims=3, size=3).any()  # constant: zeros, no division by 0


def test_resizing_a_volume_of_doubled_voxels_gives_back_the_original():
    rng = np.random.default_rng(1)
    small = rng.integers(0, 256, size=(28, 28, 28)).astype(np.uint8)
    small[0, 0, 0], small[1, 1, 1] = 0, 255
    big = small.repeat(2, 0).repeat(2, 1).repeat(2, 2)  # 56³; trilinear at the 28 centres averages equal pairs
    np.testing.assert_array_equal(preprocess(big, dims=3, size=28)[0], small)
    assert preprocess(np.ones((1, 10, 12, 14, 1)[1:]), dims=3, size=28).shape == (1, 28, 28, 28)


def test_shapes_and_channels():
    with pytest.raises(InputError, match="4-D with shape \\(2, 8, 8, 8\\)"):
        preprocess(np.ones((2, 8, 8, 8)), dims=3, size=8)
    assert preprocess(np.arange(512.0).reshape(1, 8, 8, 8), dims=3, size=8).shape == (1, 8, 8, 8)  # singleton squeezed
    with pytest.raises(InputError, match="2-D with shape"):
        preprocess(np.ones((8, 8)), dims=3, size=8)
    # images: grey -> RGB repeats, RGB -> grey is the ITU-R 601 luma
    grey = np.array([[0.0, 100.0], [200.0, 50.0]])
    np.testing.assert_array_equal(preprocess(grey, dims=2, size=2, in_channels=3),
                                  np.repeat(np.rint(grey / 200 * 255)[None], 3, 0).astype(np.uint8))
    rgb = np.stack([grey, grey[::-1], grey.T], axis=-1)
    luma = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    expected = np.rint((luma - luma.min()) / (luma.max() - luma.min()) * 255).astype(np.uint8)
    np.testing.assert_array_equal(preprocess(rgb, dims=2, size=2, in_channels=1)[0], expected)


def test_png_images_are_read_grey_or_rgb(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, size=(6, 5, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(read_array(tmp_path / "rgb.png"), rgb)
    np.testing.assert_array_equal(read_array(tmp_path / "grey.png"), rgb[..., 0])


# ----------------------------------------------------------------------------------------------------------
# predict.py --input end to end
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny LMTTM trained one epoch on a MedMNIST-format adrenalmnist3d file whose volumes span 0..255 (as the
    released files' volumes do), with predict.py's scores of the test split."""
    tmp = tmp_path_factory.mktemp("inputs")
    path = write_fake_medmnist(tmp / "data", "adrenalmnist3d", n=(16, 8, 6))
    with np.load(path) as f:
        arrays = dict(f)
    for key in ("train_images", "val_images", "test_images"):
        arrays[key][:, -1, -1, -1] = 255  # the full 0..255 range in every volume
    np.savez_compressed(path, **arrays)
    args = ["adrenalmnist3d.json", *TINY, "--train.epochs", "1", "--data.root", str(tmp / "data"),
            "--output.dir", str(tmp / "runs"), "--output.name", "run"]
    with pytest.warns(UserWarning):
        assert train.main(args) == 0
        assert predict.main(args) == 0
    with np.load(tmp / "runs" / "run" / "eval" / "test" / "predictions.npz") as f:
        scores = f["y_score"]
    return tmp, args, arrays["test_images"], scores


def test_own_files_get_the_probabilities_predict_gives_the_split(trained, tmp_path):
    tmp, args, test_images, scores = trained
    folder = tmp_path / "scans"
    (folder / "deeper").mkdir(parents=True)
    for i, volume in enumerate(test_images[:3]):
        np.save(folder / f"v{i}.npy", volume)
    np.savez(folder / "deeper" / "v3.npz", image=test_images[3])
    # a NIfTI holding test volume 4, stored canonically: array axes (R, A, S) = the volume's axes reversed
    nibabel.save(nibabel.Nifti1Image(np.transpose(test_images[4], (2, 1, 0)).astype(np.float32), np.eye(4)),
                 tmp_path / "v4.nii.gz")
    out, seen = tmp_path / "out.csv", tmp_path / "seen"
    code = predict.main([*args, "--input", str(folder), str(tmp_path / "v4.nii.gz"), "--out", str(out),
                         "--save-preprocessed", str(seen)])
    assert code == 0
    rows = read_csv(out)
    assert [Path(r["path"]).name for r in rows] == ["v3.npz", "v0.npy", "v1.npy", "v2.npy", "v4.nii.gz"]  # sorted paths
    order = [3, 0, 1, 2, 4]
    got = np.array([[float(r[f"prob_{c}"]) for c in range(2)] for r in rows])
    np.testing.assert_allclose(got, scores[order], atol=1e-6)
    assert [int(r["label"]) for r in rows] == list(scores[order].argmax(1)) and not any(r["error"] for r in rows)
    assert rows[0]["label_name"] in ("normal", "hyperplasia")
    saved = sorted(seen.iterdir())
    assert len(saved) == 5
    np.testing.assert_allclose(np.load(saved[0])[0], test_images[3] / 255, atol=1e-7)


def test_bad_files_get_error_rows_and_the_rest_is_scored(trained, tmp_path):
    tmp, args, test_images, scores = trained
    good = tmp_path / "good.npy"
    np.save(good, test_images[0])
    bad = {
        "nan.npy": np.where(np.arange(27).reshape(3, 3, 3) == 5, np.nan, 1.0),
        "inf.npy": np.full((4, 4, 4), np.inf),
        "line.npy": np.ones(10),
        "slice.npy": np.ones((28, 28)),
        "channels.npy": np.ones((3, 8, 8, 8)),
        "empty.npy": np.ones((0, 4, 4)),
    }
    for name, array in bad.items():
        np.save(tmp_path / name, array)
    (tmp_path / "garbage.nii.gz").write_bytes(b"not a nifti at all")
    (tmp_path / "zero.nii").write_bytes(b"")
    names = [*bad, "garbage.nii.gz", "zero.nii", "missing.npy"]
    out = tmp_path / "out.csv"
    done = subprocess.run([sys.executable, "predict.py", *args, "--input", str(good),
                           *[str(tmp_path / n) for n in names], "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    rows = {Path(r["path"]).name: r for r in read_csv(out)}
    assert rows["good.npy"]["error"] == "" and float(rows["good.npy"]["prob_1"]) == pytest.approx(scores[0, 1], abs=1e-6)
    expected = {"nan.npy": "1 NaN or Inf value", "inf.npy": "64 NaN or Inf values", "line.npy": "is 1-D",
                "slice.npy": "is 2-D", "channels.npy": "is 4-D", "empty.npy": "empty array",
                "garbage.nii.gz": "cannot read .nii.gz file", "zero.nii": "empty file", "missing.npy": "no such file"}
    for name, reason in expected.items():
        assert reason in rows[name]["error"], (name, rows[name]["error"])
        assert rows[name]["prob_0"] == "" and f"{name}: " in done.stderr
    assert "scored 1 of 10" in done.stdout


def test_input_excludes_the_split_options(trained, tmp_path):
    _, args, test_images, _ = trained
    np.save(tmp_path / "v.npy", test_images[0])
    done = subprocess.run([sys.executable, "predict.py", *args, "--input", str(tmp_path / "v.npy"), "--last-k", "1"],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and "excludes --last-k" in done.stderr



def test_png_images_with_a_2d_model_score_as_the_engine_scores_them(tmp_path):
    """A 2-D model (MedMamba, tiny) trained on synthetic2d; three test images spanning 0..255 saved as PNG get the
    probabilities the engine's own scoring (predict_scores) gives the same uint8 images."""
    args = ["medmamba/medmamba_t_pathmnist.json", "--data.name", "synthetic2d", "--model.depths", "[1, 1]",
            "--model.widths", "[8, 16]", "--train.epochs", "1", "--train.batch_size", "16", "--output.plots", "false",
            "--output.dir", str(tmp_path), "--output.name", "run"]
    assert train.main(args) == 0
    import torch

    from data import load_splits
    from data.loading import Split
    from engine.checkpoint import load_checkpoint
    from engine.config import config_from_dict
    from engine.evaluate import predict_scores
    from engine.setup import dataset_for, model_from_config

    images = load_splits("synthetic2d", root=None, splits=("test",))["test"].images[:3, 0].numpy().copy()
    images[:, 0, 0], images[:, 0, 1] = 0, 255  # the full range, as MedMNIST images span it
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"img{i}.png")
    ckpt = load_checkpoint(tmp_path / "run" / "best.pt")
    cfg = config_from_dict([("ckpt", ckpt["config"])])
    model = model_from_config(cfg, dataset_for(cfg))
    model.load_state_dict(ckpt["model"])
    expected = predict_scores(model, Split(torch.from_numpy(images[:, None]), torch.zeros(3, dtype=torch.long)),
                              batch_size=8, device="cpu")
    out = tmp_path / "png.csv"
    assert predict.main([*args, "--input", *(str(tmp_path / f"img{i}.png") for i in range(3)), "--out", str(out)]) == 0
    got = np.array([[float(r[f"prob_{c}"]) for c in range(3)] for r in read_csv(out)])
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_a_multilabel_checkpoint_gives_per_label_sigmoid_probabilities(tmp_path):
    """ChestMNIST-format (14 labels): the CSV holds predict.py's sigmoid scores of the same images."""
    path = write_fake_2d(tmp_path / "data", "chestmnist")
    with np.load(path) as f:
        arrays = dict(f)
    for key in ("train_images", "val_images", "test_images"):
        arrays[key][:, 0, 0], arrays[key][:, 0, 1] = 0, 255  # every image spans 0..255
    np.savez_compressed(path, **arrays)
    args = ["medmamba/medmamba_t_pathmnist.json", "--data.name", "chestmnist", "--data.root", str(tmp_path / "data"),
            "--model.depths", "[1, 1]", "--model.widths", "[8, 16]", "--train.epochs", "1", "--train.batch_size", "16",
            "--output.plots", "false", "--output.dir", str(tmp_path), "--output.name", "run"]
    with pytest.warns(UserWarning):
        assert train.main(args) == 0
    assert predict.main(args) == 0
    with np.load(tmp_path / "run" / "eval" / "test" / "predictions.npz") as f:
        scores = f["y_score"]
    for i in range(2):
        Image.fromarray(arrays["test_images"][i]).save(tmp_path / f"x{i}.png")
    out = tmp_path / "ml.csv"
    assert predict.main([*args, "--input", str(tmp_path / "x0.png"), str(tmp_path / "x1.png"), "--out", str(out)]) == 0
    rows = read_csv(out)
    got = np.array([[float(r[f"prob_{c}"]) for c in range(14)] for r in rows])
    np.testing.assert_allclose(got, scores[:2], atol=1e-6)
    assert rows[0]["label"] == ";".join(str(c) for c in range(14) if scores[0, c] > 0.5)


def test_complex_degenerate_and_special_files_are_refused(tmp_path):
    with pytest.raises(InputError, match="complex values"):
        preprocess(np.ones((4, 4, 4), dtype=np.complex64), dims=3, size=4)
    for shape in [(1, 1, 28), (28, 1, 28), (1, 1, 1, 28)]:
        with pytest.raises(InputError, match="an axis of length 1 is no volume"):
            preprocess(np.arange(np.prod(shape), dtype=float).reshape(shape), dims=3, size=28)
    with pytest.raises(InputError, match="an axis of length 1 is no image"):
        preprocess(np.ones((1, 28)), dims=2, size=28)
    os_fifo = tmp_path / "pipe.npy"
    import os

    os.mkfifo(os_fifo)
    from engine.inputs import collect

    items = collect([os_fifo, "/dev/zero", tmp_path / "missing.npy"], dims=3)
    assert [i.error.split(" (")[0] for i in items] == ["not a regular file", "not a regular file", "no such file or folder"]


def test_a_large_volume_is_preprocessed_in_float32_with_one_copy(tmp_path):
    import tracemalloc

    volume = np.random.default_rng(0).random((96, 96, 96))  # float64, 7 MB on disk
    np.save(tmp_path / "big.npy", volume)
    float32_bytes = volume.size * 4
    tracemalloc.start()
    got = preprocess(read_array(tmp_path / "big.npy"), dims=3, size=28)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1.3 * float32_bytes, peak / float32_bytes  # a float64 copy alone would be 2.0
    low, high = volume.min(), volume.max()  # the same result as the float64 recipe, to the quantisation step
    import torch.nn.functional as F
    import torch

    ref = F.interpolate(torch.from_numpy((volume - low) / (high - low))[None, None], size=(28,) * 3,
                        mode="trilinear", align_corners=False)[0].numpy()
    assert np.abs(got.astype(int) - np.rint(ref * 255)).max() <= 1


def test_a_file_that_runs_out_of_memory_gets_its_error_row(trained, tmp_path, monkeypatch):
    import engine.inputs

    tmp, args, test_images, scores = trained
    for i in range(2):
        np.save(tmp_path / f"v{i}.npy", test_images[i])
    real = engine.inputs.preprocess

    def short_of_memory(array, **kw):
        if array.shape == test_images[0].shape and np.array_equal(array, test_images[1]):
            raise MemoryError()
        return real(array, **kw)

    monkeypatch.setattr(engine.inputs, "preprocess", short_of_memory)
    out = tmp_path / "out.csv"
    assert predict.main([*args, "--input", str(tmp_path / "v0.npy"), str(tmp_path / "v1.npy"), "--out", str(out)]) == 1
    rows = read_csv(out)
    assert rows[0]["error"] == "" and float(rows[0]["prob_1"]) == pytest.approx(scores[0, 1], abs=1e-6)
    assert rows[1]["error"] == "not enough memory to read and preprocess it" and rows[1]["prob_0"] == ""
