"""PNG plots of runs and of aggregated tables (matplotlib, Agg backend; in requirement.txt).

    python tools/plots.py sweeps/table8/adrenalmnist3d-lmttm-mem64-dim64-seed0 [RUN_DIR ...]
    python tools/aggregate.py experiments/table8.json --plots      # tables and every finished run

Per run (written into the run directory):
- `curves.png`: training loss, validation AUC and ACC per epoch (from metrics.csv);
- `roc_<split>.png`: ROC curve of the split's predictions (eval/<split>/predictions.npz): the positive
  class for binary tasks, one-vs-rest per class for multi-class tasks (sklearn.metrics.roc_curve).

Per table (written next to table.md):
- `bars.png`: AUC and ACC per cell, horizontal bars (mean with the sample std over seeds as error bars, the
  paper's value as a black tick, "missing" for a cell without runs), the figure as tall as the cells need;
- `heatmap_<group>.png` where the grid's table has a "heatmap" ({"rows", "cols", "panels", "metric"}, e.g.
  memory x dimension for TTM and LMTTM in Tables 8-9): one panel per model, ours above, the paper below;
  a cell without runs reads "missing" and one without a paper value "n/a", as in table.md.

The per-run plots live in engine/plots.py (train.py and predict.py write them too); matplotlib is imported
only inside the plotting functions.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import plots as _run_plots  # noqa: E402
from engine.plots import MissingDependency, plot_curves, pyplot as _pyplot, read_metrics_csv  # noqa: E402,F401


def plot_roc(run_dir, split: str = "test") -> Path | None:
    """roc_<split>.png in the run directory from eval/<split>/predictions.npz (None if absent)."""
    import numpy as np

    run_dir = Path(run_dir)
    path = run_dir / "eval" / split / "predictions.npz"
    if not path.is_file():
        return None
    with np.load(path) as data:
        y_true = np.asarray(data["y_true"])
        y_score = np.asarray(data["y_score"], dtype=float)
    multilabel = y_true.ndim == 2 and y_true.shape == y_score.shape and y_true.shape[1] > 1
    task = "multi-label, binary-class" if multilabel else "multi-class"
    return _run_plots.plot_roc(y_true, y_score, task, run_dir / f"roc_{split}.png",
                               f"ROC, {split} split (n = {len(y_true)})")


def plot_run(run_dir, split: str = "test") -> list:
    """Every plot a run has the data for; returns the PNG paths written."""
    return [p for p in (plot_curves(run_dir), plot_roc(run_dir, split)) if p is not None]


def plot_bars(agg, out_dir) -> Path:
    """bars.png: AUC and ACC per cell (mean ± std over seeds) with the paper's values, as horizontal bars
    side by side, one row per cell named in plain text (the figure grows with the number of cells)."""
    plt = _pyplot()
    cells = agg.cells
    y = list(range(len(cells)))
    longest = max((len(c.name) for c in cells), default=10)
    fig, axes = plt.subplots(1, 2, figsize=(6.0 + 0.07 * longest, max(3.5, 0.2 * len(cells) + 1.6)), sharey=True)
    for ax, metric in zip(axes, ("auc", "acc")):
        means = [c.mean(metric) if c.n else math.nan for c in cells]
        errs = [c.std(metric) or 0.0 for c in cells]
        ax.barh(y, means, xerr=errs, capsize=2, height=0.7, color="tab:blue", alpha=0.8, label="ours (mean ± std)")
        py = [i for i, c in enumerate(cells) if metric in c.paper]
        if py:
            ax.scatter([cells[i].paper[metric] for i in py], py, marker="|", s=120, color="black", zorder=3,
                       label="paper")
        for i, c in enumerate(cells):
            if not c.n:
                ax.text(0.01, i, "missing", transform=ax.get_yaxis_transform(), va="center", fontsize=6,
                        color="gray")
        finite = [v for v in means + [c.paper.get(metric, math.nan) for c in cells] if not math.isnan(v)]
        low = min(finite) if finite else 0.0
        ax.set_xlim(max(0.0, math.floor(low * 10) / 10 - 0.1), 1.0)
        ax.set_xlabel(f"test {metric.upper()}")
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_yticks(y)
    axes[0].set_yticklabels([c.name for c in cells], fontsize=7)
    axes[0].set_ylim(len(cells) - 0.5, -0.5)  # the first cell on top
    fig.suptitle(f"{agg.grid['name']}: test split, {len(cells)} cells", fontsize=9)
    fig.tight_layout()
    out = Path(out_dir) / "bars.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_heatmaps(agg, out_dir) -> list:
    """heatmap_<group>.png per value of table.groups: rows x cols per panel, ours above, paper below."""
    import numpy as np

    spec = agg.table.get("heatmap")
    if not spec:
        return []
    plt = _pyplot()
    metric = spec.get("metric", "acc")
    groups = agg.table.get("groups") or []
    written = []
    group_values = list(dict.fromkeys(tuple(c.coord_text(k) for k in groups) for c in agg.cells))
    for gv in group_values:
        members = [c for c in agg.cells if tuple(c.coord_text(k) for k in groups) == gv]
        panels = list(dict.fromkeys(c.coord_text(spec["panels"]) for c in members))
        rows = list(dict.fromkeys(c.coords[spec["rows"]] for c in members))
        cols = list(dict.fromkeys(c.coords[spec["cols"]] for c in members))
        grids = []
        for panel in panels:
            ours = np.full((len(rows), len(cols)), np.nan)
            paper = np.full((len(rows), len(cols)), np.nan)
            for c in members:
                if c.coord_text(spec["panels"]) != panel:
                    continue
                r, k = rows.index(c.coords[spec["rows"]]), cols.index(c.coords[spec["cols"]])
                if c.n:
                    ours[r, k] = c.mean(metric)
                paper[r, k] = c.paper.get(metric, np.nan)
            grids.append((ours, paper))
        finite = np.concatenate([g.ravel() for pair in grids for g in pair])
        finite = finite[~np.isnan(finite)]
        vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if vmax - vmin < 1e-6:
            vmin, vmax = vmin - 0.01, vmax + 0.01
        titles = agg.table.get("titles") or {}
        fig, axes = plt.subplots(2, len(panels), figsize=(3.8 * len(panels) + 1.2, 6.8), squeeze=False,
                                 layout="constrained")
        image = None
        for j, (panel, (ours, paper)) in enumerate(zip(panels, grids)):
            for i, (data, what) in enumerate(((ours, "ours"), (paper, "paper"))):
                ax = axes[i][j]
                image = ax.imshow(np.ma.masked_invalid(data), cmap="viridis", aspect="auto", vmin=vmin, vmax=vmax)
                for r in range(len(rows)):
                    for k in range(len(cols)):
                        value = data[r, k]
                        if np.isnan(value):  # as table.md: "missing" (no run), "n/a" (the paper has no value)
                            ax.text(k, r, "missing" if what == "ours" else "n/a", ha="center", va="center",
                                    fontsize=7, color="gray")
                        else:
                            dark = (value - vmin) / (vmax - vmin) < 0.6
                            ax.text(k, r, f"{value:.3f}", ha="center", va="center", fontsize=7,
                                    color="white" if dark else "black")
                ax.set_xticks(range(len(cols)))
                ax.set_xticklabels([str(v) for v in cols])
                ax.set_yticks(range(len(rows)))
                ax.set_yticklabels([str(v) for v in rows])
                ax.set_xlabel(titles.get(spec["cols"], spec["cols"]))
                ax.set_ylabel(titles.get(spec["rows"], spec["rows"]))
                ax.set_title(f"{panel}: {what} {metric.upper()}", fontsize=9)
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label=f"test {metric.upper()} (one scale)")
        name = "_".join(gv) or "all"
        fig.suptitle(f"{agg.grid['name']} {' '.join(gv)}: mean over seeds (ours) and the paper", fontsize=10)
        out = Path(out_dir) / f"heatmap_{name}.png"
        fig.savefig(out, dpi=100)
        plt.close(fig)
        written.append(out)
    return written


def plot_aggregate(agg, out_dir, runs: bool = False) -> list:
    """Table plots into out_dir, and with runs=True the plots of every run that has results."""
    _pyplot()  # fail early with a clear message
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    written = [plot_bars(agg, out_dir)] + plot_heatmaps(agg, out_dir)
    if runs:
        for cell in agg.cells:
            for run_dir in cell.run_dirs:
                written += plot_run(run_dir)
    return written


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Plot runs: curves.png and roc_<split>.png in each run directory.")
    parser.add_argument("run_dirs", nargs="+", help="run directories")
    parser.add_argument("--split", default="test")
    args = parser.parse_args(argv)
    try:
        for run_dir in args.run_dirs:
            written = plot_run(run_dir, args.split)
            if not written:
                print(f"{run_dir}: nothing to plot (no metrics.csv or eval/{args.split}/predictions.npz)")
            for path in written:
                print(path)
    except MissingDependency as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
