"""What a person looks at: calibration (ECE), the confusion matrix, the PNGs of train.py and predict.py, and
TensorBoard scalars, checked against hand computations, scikit-learn and the run's own CSV."""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import confusion_matrix

import predict
import train
from engine.plots import calibration, confusion_counts

TINY = ["--model.dim", "16", "--model.memory_tokens", "16", "--model.heads", "2", "--train.batch_size", "16",
        "--eval.batch_size", "32", "--train.lr", "0.001"]


def tiny(tmp_path, *extra, epochs=2):
    return ["demo.json", *TINY, "--train.epochs", str(epochs), "--output.dir", str(tmp_path), "--output.name", "run",
            *extra]


def ece_by_hand(confidence, correct, n_bins=15):
    """Guo et al.'s ECE written out as loops: bin b holds the confidences in ((b-1)/n, b/n]."""
    total = 0.0
    for b in range(1, n_bins + 1):
        members = [i for i, c in enumerate(confidence) if (b - 1) / n_bins < c <= b / n_bins]
        if members:
            acc = sum(correct[i] for i in members) / len(members)
            conf = sum(confidence[i] for i in members) / len(members)
            total += len(members) / len(confidence) * abs(acc - conf)
    return total


def test_ece_of_a_worked_example():
    # confidences 0.9 (right), 0.8 (wrong), 0.6 and 0.55 (both right; one bin, (8/15, 9/15]):
    # ECE = 1/4 |1 - 0.9| + 1/4 |0 - 0.8| + 2/4 |1 - 0.575| = 0.025 + 0.2 + 0.2125
    scores = np.array([[0.1, 0.9], [0.2, 0.8], [0.6, 0.4], [0.45, 0.55]])
    labels = np.array([[1], [0], [0], [1]])
    cal = calibration(labels, scores, "binary-class")
    assert cal["ece"] == pytest.approx(0.4375)
    assert cal["count"].sum() == 4 and cal["count"][8] == 2 and cal["accuracy"][8] == 1.0


def test_ece_equals_the_loop_definition_on_random_scores():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 5)) * 2
    scores = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, 5, size=(500, 1))
    confidence, correct = scores.max(1), scores.argmax(1) == labels[:, 0]
    assert calibration(labels, scores, "multi-class")["ece"] == pytest.approx(ece_by_hand(confidence, correct))
    # multi-label: every (sample, label) is a binary prediction, confidence max(p, 1 - p), threshold 0.5
    probs = rng.uniform(size=(200, 4))
    truth = rng.integers(0, 2, size=(200, 4))
    conf_ml = np.maximum(probs, 1 - probs).ravel()
    right_ml = ((probs > 0.5).astype(int) == truth).ravel()
    assert calibration(truth, probs, "multi-label, binary-class")["ece"] == pytest.approx(ece_by_hand(conf_ml, right_ml))


def test_confusion_counts_match_scikit_learn():
    rng = np.random.default_rng(1)
    scores = rng.uniform(size=(300, 4))
    labels = rng.integers(0, 4, size=(300, 1))
    expected = confusion_matrix(labels[:, 0], scores.argmax(1), labels=range(4))
    np.testing.assert_array_equal(confusion_counts(labels, scores, "multi-class"), expected)
    truth = rng.integers(0, 2, size=(300, 3))
    per_label = confusion_counts(truth, scores[:, :3], "multi-label, binary-class")
    for j in range(3):
        tn, fp, fn, tp = confusion_matrix(truth[:, j], scores[:, j] > 0.5, labels=[0, 1]).ravel()
        np.testing.assert_array_equal(per_label[j], [tn, fp, fn, tp])


def _png_size(path):
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size


def test_train_and_predict_write_plots_ece_and_tensorboard(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    assert train.main(tiny(tmp_path, "--output.tensorboard", "true")) == 0
    run = tmp_path / "run"
    width, height = _png_size(run / "curves.png")
    assert width > 300 and height > 200
    # TensorBoard holds metrics.csv's numbers, step = epoch
    board = event_accumulator.EventAccumulator(str(run / "tensorboard"))
    board.Reload()
    rows = pd.read_csv(run / "metrics.csv")
    for tag, column in (("train/loss", "train_loss"), ("val/auc", "val_auc"), ("val/acc", "val_acc")):
        events = board.Scalars(tag)
        assert [e.step for e in events] == list(rows["epoch"])
        np.testing.assert_allclose([e.value for e in events], rows[column], atol=1e-6)

    assert predict.main(tiny(tmp_path)) == 0
    out = run / "eval" / "test"
    for name in ("roc.png", "confusion.png", "reliability.png"):
        assert min(_png_size(out / name)) > 200
    metrics = json.loads((out / "metrics.json").read_text())
    with np.load(out / "predictions.npz") as saved:
        y, scores = saved["y_true"].reshape(-1), saved["y_score"]
    assert metrics["ece"] == pytest.approx(ece_by_hand(scores.max(1), scores.argmax(1) == y))
    assert metrics["ece_bins"] == 15 and metrics["per_checkpoint"][0]["ece"] == metrics["ece"]


def test_without_matplotlib_and_tensorboard_a_run_writes_notes_not_errors(tmp_path, monkeypatch, capsys):
    for module in ("matplotlib", "tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    assert train.main(tiny(tmp_path, "--output.tensorboard", "true", epochs=1)) == 0
    assert predict.main(tiny(tmp_path, epochs=1)) == 0
    out = capsys.readouterr().out
    assert "tensorboard package is not installed" in out and "no curves.png" in out and "no roc.png" in out
    run = tmp_path / "run"
    assert not (run / "curves.png").exists() and not (run / "eval" / "test" / "roc.png").exists()
    assert json.loads((run / "eval" / "test" / "metrics.json").read_text())["ece"] >= 0  # the number needs no plot


def test_plots_off(tmp_path):
    assert train.main(tiny(tmp_path, "--output.plots", "false", epochs=1)) == 0
    assert predict.main(tiny(tmp_path, "--output.plots", "false", epochs=1)) == 0
    run = tmp_path / "run"
    assert not (run / "curves.png").exists() and not list((run / "eval" / "test").glob("*.png"))
    assert not (run / "tensorboard").exists()  # off by default
