"""Your own cohort as a dataset (data.name "csv", data/csv_dataset.py): a MedMNIST split written out as NIfTI files
and a CSV comes back exactly and trains to the same weights; the stratified split; the cache; every bad input."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel
import numpy as np
import pytest
import torch

import predict
import train
from data import DataError
from data import csv_dataset
from data.csv_dataset import split_counts, stratified_split
from engine.config import load_config
from engine.setup import load_data

TINY = ["--model.dim", "16", "--model.memory_tokens", "8", "--model.heads", "2", "--train.batch_size", "8",
        "--train.epochs", "2", "--train.lr", "0.001", "--output.plots", "false"]
SIZES = {"train": 12, "val": 6, "test": 6}


def make_medmnist(root: Path, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """adrenalmnist3d.npz (binary, 28³) with every volume spanning 0..255, as the released volumes do."""
    rng = np.random.default_rng(seed)
    arrays, out = {}, {}
    for split, n in SIZES.items():
        images = rng.integers(0, 256, size=(n, 28, 28, 28), dtype=np.uint8)
        images[:, 0, 0, 0], images[:, -1, -1, -1] = 0, 255
        labels = (np.arange(n) % 2)[rng.permutation(n)].astype(np.uint8).reshape(n, 1)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
        out[split] = (images, labels)
    root.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(root / "adrenalmnist3d.npz", **arrays)
    return out


def write_nifti(path: Path, volume: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> None:
    """`volume` in the model's axis order (S, A, R), stored as a canonical RAS NIfTI (README's axis convention)."""
    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    nibabel.save(nibabel.Nifti1Image(volume.transpose(2, 1, 0), affine), str(path))


def write_csv(path: Path, header, rows) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def export(data, folder: Path, names=None) -> Path:
    """The splits as scans/<split>_<i>.nii.gz and labels.csv (path,label,split)."""
    (folder / "scans").mkdir(parents=True, exist_ok=True)
    rows = []
    for split, (images, labels) in data.items():
        for i, (volume, label) in enumerate(zip(images, labels[:, 0])):
            write_nifti(folder / "scans" / f"{split}_{i}.nii.gz", volume)
            rows.append([f"scans/{split}_{i}.nii.gz", names[label] if names else int(label), split])
    return write_csv(folder / "labels.csv", ["path", "label", "split"], rows)


def csv_args(csv_path: Path, *extra) -> list[str]:
    return ["--data.name", "csv", "--data.csv", str(csv_path), *extra]


def cfg_of(csv_path: Path, *extra):
    return load_config("base.json", csv_args(csv_path, "--model.dim", "16", "--model.memory_tokens", "8", *extra))


@pytest.fixture(autouse=True)
def fresh_memo():
    csv_dataset._prepared.clear()
    yield
    csv_dataset._prepared.clear()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    base = tmp_path_factory.mktemp("cohort")
    data = make_medmnist(base / "medmnist")
    return base, data, export(data, base / "own")


# ----------------------------------------------------------------------------------------------------------
# round trip
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:.*split sizes")
def test_round_trip_arrays_are_the_originals_and_training_gives_the_same_weights(cohort, tmp_path):
    base, data, csv_path = cohort
    info, splits = load_data(cfg_of(csv_path), torch.device("cpu"))
    assert (info.task, info.num_classes, info.label_names) == ("binary-class", 2, {"0": "0", "1": "1"})
    for split, (images, labels) in data.items():
        np.testing.assert_array_equal(splits[split].images[:, 0].numpy(), images)
        np.testing.assert_array_equal(splits[split].labels.numpy(), labels[:, 0])
    runs = tmp_path / "runs"
    medmnist = ["--data.name", "adrenalmnist3d", "--data.root", str(base / "medmnist"), "--data.download", "false"]
    assert train.main(["base.json", *medmnist, *TINY, "--output.dir", str(runs), "--output.name", "m"]) == 0
    assert train.main(["base.json", *csv_args(csv_path), *TINY, "--output.dir", str(runs), "--output.name", "c"]) == 0
    a, b = (torch.load(runs / name / "last.pt", weights_only=False)["model"] for name in ("m", "c"))  # after 2 epochs
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # identical, nested state included
    assert predict.main(["base.json", *csv_args(csv_path), *TINY, "--output.dir", str(runs), "--output.name", "c"]) == 0
    assert predict.main(["base.json", *medmnist, *TINY, "--output.dir", str(runs), "--output.name", "m"]) == 0
    got, want = (json.loads((runs / n / "eval" / "test" / "metrics.json").read_text()) for n in ("c", "m"))
    assert (got["auc"], got["acc"]) == (want["auc"], want["acc"])
    # --input on a file of the test split: the probabilities predict.py gave it in the split
    out = tmp_path / "input.csv"
    assert predict.main(["base.json", *csv_args(csv_path), *TINY, "--output.dir", str(runs), "--output.name", "c",
                         "--input", str(csv_path.parent / "scans" / "test_3.nii.gz"), "--out", str(out)]) == 0
    (row,) = csv.DictReader(out.open())
    scores = np.load(runs / "c" / "eval" / "test" / "predictions.npz")["y_score"]
    assert float(row["prob_1"]) == pytest.approx(scores[3, 1], abs=1e-6) and row["notes"] == ""


def test_class_names_and_a_classical_model_end_to_end(cohort, tmp_path):
    _, data, _ = cohort
    csv_path = export(data, tmp_path / "named", names=["benign", "malignant"])
    run = ["--output.dir", str(tmp_path / "runs"), "--output.name", "lr", "--model.pool", "4"]
    assert train.main(["baselines/logreg.json", *csv_args(csv_path), *run]) == 0
    assert predict.main(["baselines/logreg.json", *csv_args(csv_path), *run]) == 0
    metrics = json.loads((tmp_path / "runs" / "lr" / "eval" / "test" / "metrics.json").read_text())
    assert metrics["dataset"] == "csv" and metrics["n_samples"] == SIZES["test"]
    info, _ = load_data(cfg_of(csv_path), torch.device("cpu"), splits=("val",))
    assert info.label_names == {"0": "benign", "1": "malignant"}


def test_multilabel_columns(tmp_path):
    rng = np.random.default_rng(3)
    rows = []
    for i in range(12):
        write_nifti(tmp_path / f"{i}.nii", rng.integers(0, 256, (28, 28, 28), dtype=np.uint8))
        rows.append([f"{i}.nii", i % 2, (i // 2) % 2, ["train", "val", "test"][i % 3] if i >= 4 else "train"])
    rows[0][3], rows[1][3], rows[2][3], rows[3][3] = "val", "test", "val", "test"
    path = write_csv(tmp_path / "ml.csv", ["path", "label_effusion", "label_nodule", "split"], rows)
    info, splits = load_data(cfg_of(path), torch.device("cpu"))
    assert info.task == "multi-label, binary-class" and info.label_names == {"0": "effusion", "1": "nodule"}
    assert splits["train"].labels.shape[1] == 2


# ----------------------------------------------------------------------------------------------------------
# the stratified split
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sizes, fractions", [([37, 23, 11], [0.7, 0.1, 0.2]), ([5, 5], [0.6, 0.2, 0.2]),
                                              ([101, 3, 17, 9, 44], [0.5, 0.25, 0.25]), ([13, 8], [8, 1, 1]),
                                              ([5, 5, 5, 5], [0.7, 0.1, 0.2]), ([3] * 9, [0.6, 0.2, 0.2])])
def test_split_counts_are_within_one_sample_of_the_fractions(sizes, fractions):
    f = np.array(fractions, float) / sum(fractions)
    counts = split_counts(sizes, fractions)
    assert counts.sum(1).tolist() == sizes
    assert np.all(np.abs(counts - np.outer(sizes, f)) <= 1)  # class balance of each split
    assert np.all(np.abs(counts.sum(0) - sum(sizes) * f) <= 1)  # split sizes


def test_stratified_split_is_seeded_and_balanced():
    keys = [0] * 30 + [1] * 12 + [2] * 8
    a, b = stratified_split(keys, [0.7, 0.1, 0.2], 5), stratified_split(keys, [0.7, 0.1, 0.2], 5)
    assert a == b and a != stratified_split(keys, [0.7, 0.1, 0.2], 6)
    for c, n in ((0, 30), (1, 12), (2, 8)):
        for split, f in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
            assert abs(sum(1 for k, s in zip(keys, a) if k == c and s == split) - n * f) <= 1


def test_split_file_is_written_and_reused(tmp_path, capsys):
    rng = np.random.default_rng(4)
    rows = []
    for i in range(20):
        np.save(tmp_path / f"{i}.npy", rng.normal(size=(28, 28, 28)))
        rows.append([f"{i}.npy", ["a", "b"][i % 2]])
    path = write_csv(tmp_path / "c.csv", ["path", "label"], rows)
    _, first = load_data(cfg_of(path), torch.device("cpu"))
    (split_file,) = (tmp_path / "c_cache").glob("split-*.csv")
    saved = split_file.read_text()
    assert sorted(len(s) for s in first.values()) == [2, 4, 14]
    csv_dataset._prepared.clear()
    load_data(cfg_of(path), torch.device("cpu"))
    assert split_file.read_text() == saved and "reused cache" in capsys.readouterr().out
    shutil.rmtree(tmp_path / "c_cache")  # the same seed and CSV draw the same split again
    csv_dataset._prepared.clear()
    load_data(cfg_of(path), torch.device("cpu"))
    assert split_file.read_text() == saved
    rows.append(["20.npy", "a"])  # a new row is split on its own; the saved rows keep their split
    np.save(tmp_path / "20.npy", rng.normal(size=(28, 28, 28)))
    write_csv(path, ["path", "label"], rows)
    csv_dataset._prepared.clear()
    load_data(cfg_of(path), torch.device("cpu"))
    assert split_file.read_text().startswith(saved) and split_file.read_text().endswith("20.npy,train\n")


# ----------------------------------------------------------------------------------------------------------
# the cache
# ----------------------------------------------------------------------------------------------------------

def test_cache_is_rebuilt_when_a_file_or_a_setting_changes_and_only_then(cohort, tmp_path, monkeypatch):
    _, data, _ = cohort
    csv_path = export({s: (x[:6], y[:6]) for s, (x, y) in data.items()}, tmp_path)
    calls = []
    real = csv_dataset._preprocess_file
    monkeypatch.setattr(csv_dataset, "_preprocess_file", lambda row, s: calls.append(row) or real(row, s))

    def build(*extra):
        csv_dataset._prepared.clear()
        before = len(calls)
        info, splits = load_data(cfg_of(csv_path, *extra), torch.device("cpu"))
        return len(calls) - before, splits

    assert build()[0] == 18
    assert build()[0] == 0  # nothing changed
    changed = data["train"][0][0].copy()
    changed[5:9] = 17
    write_nifti(tmp_path / "scans" / "train_0.nii.gz", changed)
    n, splits = build()
    assert n == 18 and not torch.equal(splits["train"].images[0, 0], torch.from_numpy(data["train"][0][0]))
    assert build("--data.window", "[10, 200]")[0] == 18
    assert build("--data.window", "[10, 200]")[0] == 0
    assert build()[0] == 0  # the caches of other settings are kept (a sweep may use both at once) ...
    assert len(list((tmp_path / "labels_cache").glob("*.npz"))) == 2  # ... those of earlier file states are not
    next((tmp_path / "labels_cache").glob("*.json")).write_text("{broken")  # a damaged cache is built again
    assert build()[0] + build("--data.window", "[10, 200]")[0] == 18


# ----------------------------------------------------------------------------------------------------------
# bad input: a clear message naming the row and the file, nothing written
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture
def small(tmp_path):
    """12 .npy volumes; write(rows) makes a CSV of them (header path,label,split)."""
    rng = np.random.default_rng(7)
    for i in range(12):
        np.save(tmp_path / f"v{i}.npy", rng.normal(size=(28, 28, 28)))
    # rows 2..13: v0..v3 and v8..v11 train, v4 v5 val, v6 v7 test; labels alternate 0, 1
    good = [[f"v{i}.npy", i % 2, ("train", "train", "val", "test")[i // 2] if i < 8 else "train"] for i in range(12)]

    def write(rows, header=("path", "label", "split")):
        return write_csv(tmp_path / "bad.csv", list(header), rows)

    return tmp_path, good, write


def expect_error(path, match, *extra):
    with pytest.raises(DataError, match=match):
        load_data(cfg_of(path, *extra), torch.device("cpu"))
    assert not (path.parent / f"{path.stem}_cache").exists()  # nothing half-written


def test_missing_and_unreadable_files_stop_or_are_skipped(small, capsys):
    folder, good, write = small
    (folder / "broken.nii.gz").write_bytes(b"not a nifti file at all")
    rows = [*good, ["gone.npy", 0, "train"], ["broken.nii.gz", 1, "train"]]
    path = write(rows)
    expect_error(path, r"2 file\(s\) of bad.csv cannot be used: row 14 \(gone.npy\): no such file; "
                       r"row 15 \(broken.nii.gz\): cannot read")
    info, splits = load_data(cfg_of(path, "--data.skip_bad", "true"), torch.device("cpu"))
    assert len(splits["train"]) == 8 and "left out 2 file(s)" in capsys.readouterr().out
    meta = json.loads(info.path.with_suffix(".json").read_text())
    assert [s["path"] for s in meta["skipped"]] == ["gone.npy", "broken.nii.gz"]


def test_unknown_labels(small):
    folder, good, write = small
    expect_error(write([*good[:-1], [good[-1][0], "tumour", "train"]]), r"bad.csv row 13: unknown label 'tumour'")
    named = [[p, ["cyst", "tumour"][lab], s] for p, lab, s in good]
    path = write([*named[:-1], [named[-1][0], "polyp", "train"]])
    expect_error(path, r"bad.csv row 13: unknown label 'polyp'; data.classes lists cyst, tumour",
                 "--data.classes", '["cyst", "tumour"]')


def test_a_class_without_training_sample_and_a_split_without_both_classes(small):
    folder, good, write = small
    no_train = [[p, 2 if i == 4 else lab, s] for i, (p, lab, s) in enumerate(good)]  # v4 is a val row
    expect_error(write(no_train), r"class '2' \(index 2\) has no training sample in bad.csv")
    one_sided = [[p, 0 if s == "val" else lab, s] for p, lab, s in good]
    expect_error(write(one_sided), r"the val split of bad.csv has no sample of class '1'")


def test_duplicate_paths_and_missing_columns(small):
    folder, good, write = small
    expect_error(write([*good, ["./sub/../v0.npy", 1, "train"]]), r"bad.csv rows 2 and 14 name the same file")
    expect_error(write([[p, lab] for p, lab, _ in good], header=("file", "label")), r"no `path` column \(columns: file, label\)")
    expect_error(write([[p, lab] for p, lab, _ in good], header=("path", "class")), r"no `label` column")
    expect_error(write([[p, lab, "holdout"] for p, lab, _ in good]), r"bad.csv row 2 \(v0.npy\): split 'holdout'")


def test_split_counts_on_many_random_cohorts():
    rng = np.random.default_rng(0)
    for _ in range(300):
        sizes = rng.integers(1, 40, size=rng.integers(2, 7)).tolist()
        f = rng.uniform(0.05, 1, size=3)
        counts = split_counts(sizes, f)
        f = f / f.sum()
        assert counts.sum(1).tolist() == sizes and counts.min() >= 0
        assert np.all(np.abs(counts - np.outer(sizes, f)) <= 1) and np.all(np.abs(counts.sum(0) - sum(sizes) * f) <= 1)


def test_make_csv_from_class_folders(tmp_path):
    from tools import make_csv

    rng = np.random.default_rng(9)
    for name, n in (("benign", 6), ("malignant", 4)):
        (tmp_path / "scans" / name).mkdir(parents=True)
        for i in range(n):
            np.save(tmp_path / "scans" / name / f"{i}.npy", rng.normal(size=(28, 28, 28)))
    assert make_csv.main([str(tmp_path / "scans")]) == 0
    assert make_csv.main([str(tmp_path / "scans")]) == 2  # kept unless --force
    rows = list(csv.DictReader((tmp_path / "scans" / "labels.csv").open()))
    assert [r["path"] for r in rows[:2]] == ["benign/0.npy", "benign/1.npy"] and rows[-1]["label"] == "malignant"
    info, splits = load_data(cfg_of(tmp_path / "scans" / "labels.csv", "--data.split_fractions", "[0.5, 0.25, 0.25]"),
                             torch.device("cpu"))
    assert info.label_names == {"0": "benign", "1": "malignant"} and sum(map(len, splits.values())) == 10


def test_rgb_images_for_a_2d_model_come_back_exactly(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(11)
    images = rng.integers(0, 256, size=(12, 28, 28, 3), dtype=np.uint8)
    images[:, 0, 0], images[:, -1, -1] = 0, 255
    rows = []
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
        rows.append([f"{i}.png", i % 3, ("train", "train", "val", "test")[i // 3]])
    path = write_csv(tmp_path / "rgb.csv", ["path", "label", "split"], rows)
    cfg = load_config("medmamba/medmamba_t_pathmnist.json", csv_args(path, "--data.channels", "3"))
    info, splits = load_data(cfg, torch.device("cpu"))
    assert (info.dims, info.in_channels, info.task, info.num_classes) == (2, 3, "multi-class", 3)
    np.testing.assert_array_equal(splits["train"].images.permute(0, 2, 3, 1).numpy(), images[:6])
    np.testing.assert_array_equal(splits["test"].images.permute(0, 2, 3, 1).numpy(), images[9:])


def test_spacing_column_of_npy_rows(small):
    from test_spacing import doubled_by_hand

    from engine.inputs import preprocess

    folder, good, write = small
    thick = np.random.default_rng(12).normal(size=(14, 28, 28))
    np.save(folder / "thick.npy", thick)
    rows = [[*r, ""] for r in good] + [["thick.npy", 0, "train", "2 x 1 x 1"]]
    info, splits = load_data(cfg_of(write(rows, header=("path", "label", "split", "spacing"))), torch.device("cpu"))
    np.testing.assert_array_equal(splits["train"].images[-1].numpy(), preprocess(doubled_by_hand(thick), dims=3, size=28))
    assert "resampled" in json.loads(info.path.with_suffix(".json").read_text())["notes"]["thick.npy"]
    csv_dataset._prepared.clear()
    shutil.rmtree(info.path.parent)
    expect_error(write([*rows[:-1], ["thick.npy", 0, "train", "2 1"]], header=("path", "label", "split", "spacing")),
                 r"bad.csv row 14 \(thick.npy\): spacing '2 1' is not three")


def test_train_py_stops_with_one_line_and_exit_code_2(small, capsys):
    from engine.setup import run_cli

    folder, good, write = small
    path = write([*good, ["gone.npy", 0, "train"]])
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: train.main(["base.json", *csv_args(path), *TINY, "--output.dir", str(folder / "runs")]))
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err.count("\n") == 0 and "row 14 (gone.npy): no such file" in err
    assert not (folder / "runs").exists() and not (folder / "bad_cache").exists()
