"""MedMNIST 2D: the 12 flags from medmnist.INFO, grey and RGB files, multi-label ChestMNIST (BCE, sigmoid
scores, the official multi-label metrics), synthetic2d, and the 2-D / 3-D model-dataset check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from medmnist.info import INFO
from sklearn.metrics import roc_auc_score

from helpers import write_fake_2d

import predict
import train
from data import DataError, dataset_info, load_splits
from data.info import MEDMNIST_2D_NAMES
from engine.evaluate import official_metrics, task_loss

REPO = Path(__file__).resolve().parent.parent
TINY = ["--model.depths", "[1, 1]", "--model.widths", "[8, 16]", "--train.epochs", "1", "--train.batch_size", "16",
        "--output.plots", "false"]


@pytest.mark.parametrize("name", MEDMNIST_2D_NAMES)
def test_info_of_every_2d_flag_follows_medmnist(name, tmp_path):
    entry = INFO[name]
    for size in (28, 64, 128, 224):
        info = dataset_info(name, size=size, root=tmp_path)
        suffix = "" if size == 28 else f"_{size}"
        assert (info.dims, info.task, info.in_channels, info.num_classes) == \
            (2, entry["task"], entry["n_channels"], len(entry["label"]))
        assert (info.url, info.md5, info.path) == (entry[f"url{suffix}"], entry[f"MD5{suffix}"],
                                                   tmp_path / f"{name}{suffix}.npz")
    with pytest.raises(DataError, match="choose one of 28, 64"):
        dataset_info("adrenalmnist3d", size=128)


def test_rgb_images_are_channels_first_and_grey_ones_get_a_channel(tmp_path):
    path = write_fake_2d(tmp_path, "pathmnist")
    with pytest.warns(UserWarning):
        split = load_splits("pathmnist", root=tmp_path, splits=("train",))["train"]
    stored = np.load(path)["train_images"]
    assert split.images.shape == (24, 3, 28, 28) and split.images.dtype == torch.uint8
    np.testing.assert_array_equal(split.images[5, 2].numpy(), stored[5, :, :, 2])  # channel c = stored [..., c]
    write_fake_2d(tmp_path, "pneumoniamnist", size=64)
    with pytest.warns(UserWarning):
        grey = load_splits("pneumoniamnist", root=tmp_path, size=64, splits=("val",))["val"]
    assert grey.images.shape == (12, 1, 64, 64) and grey.labels.shape == (12,)


def test_wrong_layout_is_refused(tmp_path):
    info = dataset_info("pathmnist", root=tmp_path)
    np.savez(info.path, **{f"{s}_images": np.zeros((4, 28, 28), np.uint8) for s in ("train", "val", "test")},
             **{f"{s}_labels": np.zeros((4, 1), np.uint8) for s in ("train", "val", "test")})
    with pytest.raises(DataError, match=r"expected uint8 \(N, 28, 28, 3\)"):
        load_splits("pathmnist", root=tmp_path)


def test_multilabel_labels_loss_and_official_metrics(tmp_path):
    write_fake_2d(tmp_path, "chestmnist")
    with pytest.warns(UserWarning):
        split = load_splits("chestmnist", root=tmp_path, splits=("val",))["val"]
    assert split.labels.shape == (12, 14)
    # the loss: binary cross-entropy per label, by hand
    logits = torch.randn(12, 14)
    y = split.labels
    p = torch.sigmoid(logits)
    by_hand = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
    torch.testing.assert_close(task_loss(logits, y), by_hand)
    torch.testing.assert_close(task_loss(logits, y, reduction="sum"), by_hand * 12)
    torch.testing.assert_close(task_loss(logits[:, :3], torch.tensor([0, 2] * 6)),
                               F.cross_entropy(logits[:, :3], torch.tensor([0, 2] * 6)))
    # the official multi-label metrics: mean per-label AUC, and accuracy at threshold 0.5 averaged over labels
    scores = p.numpy()
    labels = y.numpy()
    auc, acc = official_metrics(labels, scores, "multi-label, binary-class")
    assert auc == pytest.approx(np.mean([roc_auc_score(labels[:, j], scores[:, j]) for j in range(14)]))
    assert acc == pytest.approx(np.mean([(labels[:, j] == (scores[:, j] > 0.5)).mean() for j in range(14)]))


def test_synthetic2d_is_deterministic_and_learnable_shapes():
    a = load_splits("synthetic2d", root=None, splits=("train",))["train"]
    b = load_splits("synthetic2d", root=None, splits=("train",))["train"]
    assert a.images.shape == (240, 1, 28, 28) and torch.equal(a.images, b.images)
    assert sorted(torch.unique(a.labels).tolist()) == [0, 1, 2]
    # the class is the bar's orientation: bright pixels span more columns than rows for class 0 and the reverse for 1
    for image, label in zip(a.images[:30, 0], a.labels[:30]):
        rows, cols = np.nonzero(image.numpy() > 100)
        spread = (np.ptp(cols), np.ptp(rows))
        if label == 0:
            assert spread[0] > spread[1]
        elif label == 1:
            assert spread[1] > spread[0]


@pytest.mark.parametrize("name, model", [("synthetic2d", "medmamba_t"), ("synthetic2d", "medmamba_s"),
                                         ("synthetic2d", "medmamba_b"), ("synthetic2d", "medmambase"),
                                         ("pathmnist", "medmambase"), ("chestmnist", "medmamba_t"),
                                         ("retinamnist", "medmamba_t")])
def test_train_and_predict_2d(tmp_path, monkeypatch, name, model):
    data = []
    if name != "synthetic2d":
        write_fake_2d(tmp_path / "data", name)
        data = ["--data.root", str(tmp_path / "data")]
    args = ["medmamba/medmamba_t_pathmnist.json", "--model.name", model, "--data.name", name, *data, *TINY,
            "--output.dir", str(tmp_path), "--output.name", "run"]
    with pytest.warns(UserWarning) if data else _nothing():
        assert train.main(args) == 0
    assert predict.main(args) == 0
    out = tmp_path / "run" / "eval" / "test"
    metrics = json.loads((out / "metrics.json").read_text())
    with np.load(out / "predictions.npz") as saved:
        y, scores = saved["y_true"], saved["y_score"]
    info = dataset_info(name)
    task = info.task
    assert (metrics["auc"], metrics["acc"]) == pytest.approx(official_metrics(y, scores, task))
    if info.is_multilabel:  # sigmoid per label, not a softmax over the labels
        assert scores.shape == (12, 14) and not np.allclose(scores.sum(1), 1)
    else:
        np.testing.assert_allclose(scores.sum(1), 1, atol=1e-5)
    if data:  # the evaluator's standard CSV re-scores to the same numbers
        import medmnist.evaluator as ev

        (csv,) = out.glob(f"{name}_test_*.csv")
        monkeypatch.setattr(ev.Evaluator.__init__, "__defaults__", (None, str(tmp_path / "data")))
        rescored = ev.Evaluator.parse_and_evaluate(str(csv), run="rescored")
        assert (rescored.AUC, rescored.ACC) == pytest.approx((metrics["auc"], metrics["acc"]), abs=1e-9)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("model, data, message", [
    ("lmttm", "synthetic2d", "model lmttm takes 3-D volumes, but synthetic2d holds 2-D images"),
    ("medmamba_t", "synthetic3d", "model medmamba_t takes 2-D images, but synthetic3d holds 3-D volumes"),
])
def test_a_model_and_dataset_of_other_dimensions_stop_with_both_named(tmp_path, model, data, message):
    config = "demo.json" if model == "lmttm" else "medmamba/medmamba_t_pathmnist.json"
    for script in ("train.py", "predict.py"):
        done = subprocess.run([sys.executable, script, config, "--model.name", model, "--data.name", data,
                               "--output.dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not any(tmp_path.iterdir())
