"""Readable pictures: class names from medmnist.INFO on the confusion matrix, bars.png with many runs, and the
heatmaps' words for empty cells as table.md writes them. Checked on the matplotlib objects, not on pixels."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

plt = pytest.importorskip("matplotlib.pyplot")
import medmnist  # noqa: E402

from engine import plots as run_plots  # noqa: E402
from tools import aggregate, plots  # noqa: E402


@pytest.fixture
def figures(monkeypatch):
    """The figures the plotting functions close (they close every figure they save)."""
    closed, real_close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: closed.append(fig))
    yield closed
    real_close("all")


def _texts(labels):
    return [t.get_text() for t in labels]


@pytest.mark.parametrize("flag", ["organmnist3d", "adrenalmnist3d"])
def test_the_confusion_matrix_names_the_classes_of_medmnist_info(tmp_path, figures, flag):
    names = medmnist.INFO[flag]["label"]  # {"0": "liver", ...}: the independent source
    k = len(names)
    labels = np.arange(3 * k) % k
    scores = np.eye(k)[(labels + 1) % k]  # every prediction wrong by one class
    run_plots.plot_evaluation(tmp_path, labels[:, None], scores, medmnist.INFO[flag]["task"], "t", names)
    (fig,) = [f for f in figures if "confusion" in f.axes[0].get_title()]
    ax = fig.axes[0]
    expected = [names[str(i)] for i in range(k)]
    assert _texts(ax.get_xticklabels()) == expected and _texts(ax.get_yticklabels()) == expected
    assert (tmp_path / "confusion.png").is_file()


def _cell(i, n_seeds, paper=None):
    cell = aggregate.Cell(name=f"adrenalmnist3d-lmttm-mem{64 * (i % 8 + 1)}-dim{64 * (i // 8 + 1)}-seedless",
                          coords={"memory": 64 * (i % 8 + 1), "dim": 64 * (i // 8 + 1), "variant": "lmttm"},
                          expected=3, paper=paper or {})
    for s in range(n_seeds):
        cell.seeds.append(s)
        cell.values["auc"].append(0.8 + 0.01 * s)
        cell.values["acc"].append(0.7 + 0.01 * s)
    return cell


def test_bars_with_64_runs_name_every_run_on_its_own_line(tmp_path, figures):
    cells = [_cell(i, 0 if i == 5 else 3, {"acc": 0.75}) for i in range(64)]
    agg = SimpleNamespace(cells=cells, grid={"name": "table8"}, table={})
    plots.plot_bars(agg, tmp_path)
    (fig,) = figures
    fig.canvas.draw()
    ax = fig.axes[0]
    ticks = ax.get_yticklabels()
    assert _texts(ticks) == [c.name for c in cells]
    assert all(t.get_rotation() == 0 for t in ticks), "run names must be horizontal"
    boxes = sorted((t.get_window_extent() for t in ticks), key=lambda b: b.y0)
    assert all(a.y1 <= b.y0 + 0.5 for a, b in zip(boxes, boxes[1:])), "run names overlap"
    assert all(b.x0 >= 0 for b in boxes), "run names cut off at the left edge"
    assert "missing" in _texts(ax.texts)


def test_heatmap_writes_missing_like_table_md(tmp_path, figures):
    cells = [_cell(i, 0 if i == 0 else 2, {"acc": 0.7} if i else {}) for i in range(4)]
    table = {"heatmap": {"rows": "memory", "cols": "dim", "panels": "variant", "metric": "acc"}, "groups": []}
    agg = SimpleNamespace(cells=cells, grid={"name": "table8"}, table=table)
    plots.plot_heatmaps(agg, tmp_path)
    (fig,) = figures
    ours, paper = fig.axes[0], fig.axes[1]
    assert "ours" in ours.get_title() and "paper" in paper.get_title()
    assert aggregate.fmt_ours(cells[0], "acc") == "missing"
    assert _texts(ours.texts).count("missing") == 1 and "n/a" not in _texts(ours.texts)
    assert _texts(paper.texts).count(aggregate.fmt(None)) == 1
