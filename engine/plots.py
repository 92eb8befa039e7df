"""What a person looks at after a run: curves, ROC curves, the confusion matrix and calibration.

- `train.py` writes `curves.png` (training loss, validation AUC and ACC per epoch) at the end of a run;
- `predict.py` writes, beside `metrics.json`: `roc.png` (one curve per class, one-vs-rest for multi-class; the
  positive class for binary tasks; one per label for multi-label), `confusion.png` and `reliability.png` (a
  reliability diagram), and stores the expected calibration error in `metrics.json` (`ece`, 15 bins).

The numbers (`calibration`, `confusion_counts`) are plain NumPy and always computed; the PNGs need matplotlib,
(in requirement.txt; without it the callers print one note and go on). matplotlib is imported only inside the
plotting functions (Agg backend), never at import time.

Calibration follows Guo et al. (2017): each prediction has a confidence (the largest class probability; for a
multi-label task every (sample, label) pair is a binary prediction with confidence max(p, 1 - p)) and is
correct or not (argmax = label; multi-label: (p > 0.5) = label, the official evaluator's threshold). The
confidences are put in `n_bins` equal-width bins ((b - 1)/n, b/n], and
ECE = sum over bins of (bin size / n) * |accuracy of the bin - mean confidence of the bin|.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

ECE_BINS = 15


class MissingDependency(RuntimeError):
    """matplotlib (or another optional plotting dependency) is not installed."""


def pyplot():
    """matplotlib.pyplot on the Agg backend, or MissingDependency with the install command."""
    try:
        import matplotlib
    except ImportError:
        raise MissingDependency("plots need matplotlib, which is not installed: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def is_multilabel(task: str) -> bool:
    return task.startswith("multi-label")


# ----------------------------------------------------------------------------------------------------------
# numbers
# ----------------------------------------------------------------------------------------------------------

def _confidences(labels: np.ndarray, scores: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, correct) of every prediction, flattened."""
    scores = np.asarray(scores, dtype=np.float64)
    if is_multilabel(task):
        y = np.asarray(labels).reshape(scores.shape).astype(int)
        predicted = (scores > 0.5).astype(int)
        return np.maximum(scores, 1 - scores).ravel(), (predicted == y).ravel()
    y = np.asarray(labels).reshape(len(scores), -1)[:, 0].astype(int)
    return scores.max(axis=1), scores.argmax(axis=1) == y


def calibration(labels: np.ndarray, scores: np.ndarray, task: str, n_bins: int = ECE_BINS) -> dict:
    """Per-bin counts, accuracies and mean confidences, and the expected calibration error (module docstring)."""
    confidence, correct = _confidences(labels, scores, task)
    if confidence.size == 0:
        raise ValueError("calibration needs at least one prediction")
    bins = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)  # ((b-1)/n, b/n] -> b - 1
    count = np.bincount(bins, minlength=n_bins)
    hits = np.bincount(bins, weights=correct.astype(float), minlength=n_bins)
    conf_sum = np.bincount(bins, weights=confidence, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy, mean_conf = hits / count, conf_sum / count
    filled = count > 0
    ece = float(np.sum(count[filled] / confidence.size * np.abs(accuracy[filled] - mean_conf[filled])))
    return {"n_bins": n_bins, "count": count, "accuracy": accuracy, "confidence": mean_conf, "ece": ece}


def confusion_counts(labels: np.ndarray, scores: np.ndarray, task: str) -> np.ndarray:
    """Single-label tasks: (K, K) counts, row = true class, column = predicted class (argmax).
    Multi-label: (L, 4) counts per label of [TN, FP, FN, TP] at threshold 0.5."""
    scores = np.asarray(scores)
    if is_multilabel(task):
        y = np.asarray(labels).reshape(scores.shape).astype(int)
        p = (scores > 0.5).astype(int)
        return np.stack([((y == t) & (p == q)).sum(axis=0) for t, q in ((0, 0), (0, 1), (1, 0), (1, 1))], axis=1)
    k = scores.shape[1]
    y = np.asarray(labels).reshape(len(scores), -1)[:, 0].astype(int)
    return np.bincount(y * k + scores.argmax(axis=1), minlength=k * k).reshape(k, k)


# ----------------------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------------------

def read_metrics_csv(path) -> dict:
    """Columns of metrics.csv as lists of floats (empty cells become NaN)."""
    cols: dict[str, list] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                try:
                    x = float(value)
                except (TypeError, ValueError):
                    x = math.nan
                cols.setdefault(key, []).append(x)
    return cols


def plot_curves(run_dir) -> Path | None:
    """curves.png from metrics.csv (None if the run has no metrics.csv)."""
    run_dir = Path(run_dir)
    from engine.rundir import CURVES, METRICS_CSV, TRAIN_SUMMARY  # the record names (engine.rundir loads torch)

    path = run_dir / METRICS_CSV
    if not path.is_file():
        return None
    cols = read_metrics_csv(path)
    plt = pyplot()
    epochs = cols.get("epoch", [])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, cols.get("train_loss", [math.nan] * len(epochs)), marker=".", label="train loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.set_title("training loss")
    for key, label in (("val_auc", "val AUC"), ("val_acc", "val ACC")):
        if key in cols:
            ax2.plot(epochs, cols[key], marker=".", label=label)
    try:
        best = json.loads((run_dir / TRAIN_SUMMARY).read_text()).get("best_epoch")
    except (OSError, ValueError):
        best = None
    if isinstance(best, (int, float)):
        ax2.axvline(best, color="gray", ls=":", lw=1, label=f"best epoch ({best})")
    ax2.set_xlabel("epoch")
    ax2.set_title("validation")
    ax2.legend()
    from matplotlib.ticker import MaxNLocator

    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(run_dir.name, fontsize=9)
    fig.tight_layout()
    out = run_dir / CURVES
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_roc(labels: np.ndarray, scores: np.ndarray, task: str, out: Path, title: str,
             label_names: dict | None = None) -> Path:
    """ROC curves: the positive class of a binary task, every class vs the rest of a multi-class task, every
    label of a multi-label task (sklearn.metrics.roc_curve); classes absent from the split are left out."""
    from sklearn.metrics import auc as area, roc_curve

    scores = np.asarray(scores, dtype=float)
    if scores.ndim == 1:
        scores = np.stack([1 - scores, scores], axis=1)
    k = scores.shape[1]
    if is_multilabel(task):
        truth = np.asarray(labels).reshape(scores.shape).astype(int)
        columns = list(range(k))
    else:
        y = np.asarray(labels).reshape(len(scores), -1)[:, 0].astype(int)
        truth = np.stack([(y == c).astype(int) for c in range(k)], axis=1)
        columns = [1] if k == 2 else list(range(k))
    names = label_names or {}
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    aucs = []
    for c in columns:
        positives = truth[:, c]
        if positives.all() or not positives.any():
            continue  # undefined for a class absent (or alone) in the split
        fpr, tpr, _ = roc_curve(positives, scores[:, c])
        aucs.append(area(fpr, tpr))
        name = names.get(str(c), f"class {c}")
        ax.plot(fpr, tpr, label=f"AUC {aucs[-1]:.3f}" if len(columns) == 1 else f"{c}: {name[:28]} ({aucs[-1]:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    mean = f", mean AUC {sum(aucs) / len(aucs):.3f}" if len(aucs) > 1 else ""
    ax.set_title(f"{title}{mean}", fontsize=9)
    ax.legend(fontsize=6 if len(columns) > 6 else 7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)


def _class_names(label_names: dict | None, n: int) -> list[str]:
    """The names of classes 0..n-1 (medmnist.INFO's `label`), else the numbers."""
    names = label_names or {}
    return [str(names.get(str(i), names.get(i, i))) for i in range(n)]


def confusion_figure(labels: np.ndarray, scores: np.ndarray, task: str, title: str, label_names: dict | None = None):
    """The confusion matrix figure (counts, and the row share as colour), the classes named by `label_names`;
    per-label TN/FP/FN/TP for multi-label."""
    counts = confusion_counts(labels, scores, task)
    plt = pyplot()
    rows, cols = counts.shape
    names = _class_names(label_names, rows)
    wide = max(map(len, names))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * cols + 2.5 + 0.06 * wide), max(3.5, 0.45 * rows + 1.5 + 0.04 * wide)))
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for r in range(rows):
        for c in range(cols):
            ax.text(c, r, str(int(counts[r, c])), ha="center", va="center", fontsize=7,
                    color="white" if share[r, c] > 0.6 else "black")
    if is_multilabel(task):
        ax.set_xticks(range(4))
        ax.set_xticklabels(["TN", "FP", "FN", "TP"])
        ax.set_ylabel("label")
    else:
        ax.set_xticks(range(cols))
        ax.set_xticklabels(names, rotation=30 if wide > 6 else 0, ha="right" if wide > 6 else "center", fontsize=7)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
    ax.set_yticks(range(rows))
    ax.set_yticklabels(names, fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_confusion(labels: np.ndarray, scores: np.ndarray, task: str, out: Path, title: str,
                   label_names: dict | None = None) -> Path:
    """confusion.png: `confusion_figure` saved."""
    fig = confusion_figure(labels, scores, task, title, label_names)
    fig.savefig(out, dpi=100)
    pyplot().close(fig)
    return Path(out)


def plot_reliability(cal: dict, out: Path, title: str) -> Path:
    """Reliability diagram: accuracy per confidence bin against the diagonal, bin sizes below, ECE in the title."""
    plt = pyplot()
    n = cal["n_bins"]
    edges = np.linspace(0, 1, n + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    filled = cal["count"] > 0
    ax.bar(centres[filled], cal["accuracy"][filled], width=1 / n, edgecolor="black", alpha=0.8, label="accuracy")
    ax.bar(centres[filled], (cal["confidence"] - cal["accuracy"])[filled], bottom=cal["accuracy"][filled],
           width=1 / n, fill=False, hatch="//", edgecolor="tab:red", lw=0.8,
           label="gap to confidence")  # hatched: it reads the same over the accuracy bar (under-confidence)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}, ECE {cal['ece']:.4f} ({n} bins)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    ax2.bar(centres, cal["count"], width=1 / n, edgecolor="black", color="gray")
    ax2.set_xlabel("confidence")
    ax2.set_ylabel("predictions")
    ax2.set_xlim(0, 1)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)


def plot_evaluation(out_dir: Path, labels: np.ndarray, scores: np.ndarray, task: str, title: str,
                    label_names: dict | None = None) -> list[Path]:
    """roc.png, confusion.png and reliability.png in out_dir (MissingDependency without matplotlib)."""
    out_dir = Path(out_dir)
    return [plot_roc(labels, scores, task, out_dir / "roc.png", f"ROC, {title}", label_names),
            plot_confusion(labels, scores, task, out_dir / "confusion.png", f"confusion matrix, {title}", label_names),
            plot_reliability(calibration(labels, scores, task), out_dir / "reliability.png", f"reliability, {title}")]


# ----------------------------------------------------------------------------------------------------------
# TensorBoard
# ----------------------------------------------------------------------------------------------------------

class TensorBoard:
    """Per-epoch scalars in `<run dir>/tensorboard/` when `output.tensorboard` is true (train/loss, val/auc,
    val/acc, train/lr, train/epoch_seconds, step = epoch). A no-op when off, or, with one note, when the
    `tensorboard` package is missing. On resume the events of epochs after the resumed one are purged."""

    TAGS = {"train_loss": "train/loss", "val_auc": "val/auc", "val_acc": "val/acc", "lr": "train/lr",
            "time_s": "train/epoch_seconds"}

    def __init__(self, run_dir: Path, enabled: bool, start_epoch: int = 0):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("note: output.tensorboard is true but the tensorboard package is not installed "
                  "(pip install tensorboard); no TensorBoard scalars are written")
            return
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"),
                                    purge_step=start_epoch + 1 if start_epoch else None)

    def log(self, row: dict) -> None:
        if self.writer is None:
            return
        for key, tag in self.TAGS.items():
            if key in row:
                self.writer.add_scalar(tag, float(row[key]), int(row["epoch"]))
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
