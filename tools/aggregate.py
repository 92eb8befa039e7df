"""Collect the finished runs of a grid into a table beside the paper's numbers.

    python tools/aggregate.py experiments/table8.json                  # -> sweeps/table8/table.md, table.csv
    python tools/aggregate.py experiments/table8.json --plots          # + PNGs (needs matplotlib)
    python tools/aggregate.py experiments/table4.json --override train.epochs=2   # runs swept with that override

For each run of the grid (see tools/sweep.py) the test AUC and ACC are read from
`<run dir>/eval/test/metrics.json`; a run counts only when its `train_summary.json` says finished and
that file exists, and only when its `sweep_settings.json` and `config.json` agree with the grid's
settings plus the given `--override`s, exactly as tools/sweep.py checks before reusing a directory
(other runs are listed as excluded in the notes of table.md). Nothing is filled in by hand.

Per cell (a run name without `-seed<s>`): the number of seeds found, the mean and the sample standard
deviation (ddof = 1) over seeds of AUC and ACC; with one seed the deviation is written "± n/a", with none
the cell is "missing". The paper's value (grid "paper.values", keyed by cell) stands beside ours with
Δ = ours − paper, or "n/a" where the paper has no value. With `"average_over": "dataset"` a cell
`mean-...` is added per model line: for each seed present in every dataset, the mean over datasets, then
mean ± std over those seeds (the paper's Table 3); it is "missing" unless every dataset has a seed in common.

Outputs (in --out, default sweeps/<grid name>):
- `table.csv`: one row per cell: cell, its coordinates, n_seeds, seeds, auc_mean, auc_std, acc_mean,
  acc_std, paper_auc, paper_acc, diff_auc, diff_acc, param_count, status (complete/partial/missing).
- `table.md`: the grid's layout (table.rows x table.cols, one table per table.groups value and metric,
  each entry "ours mean ± std (seeds) / paper"), then every cell with Δ, then notes.

Error bars (tools/compare.py, engine/stats.py): the **pooled CI** of a cell is the bootstrap interval of
its mean over seeds, every seed's test predictions (`eval/test/predictions.npz`) scored on the same
stratified resamples of the test samples: the test-sample uncertainty of the seed mean (the ± std is the
seed-to-seed spread). `--reference MODEL` (a variant label, or a model.name value without variants) adds
per cell the paired comparison with the reference model's cell of the same other coordinates, seed by
seed (DeLong / McNemar, as tools/compare.py): mean Δ ± std over seeds and how many seeds have p < 0.05.
CSV columns: auc_ci_low, auc_ci_high, acc_ci_low, acc_ci_high, and with --reference ref_delta_auc_mean,
ref_delta_auc_std, ref_auc_significant, ref_delta_acc_mean, ref_delta_acc_std, ref_acc_significant, ref_pairs.

The grid's "table" object: "rows", "cols", "groups" (lists of coordinates: "dataset", "variant" and the
axis keys), "metrics" (["auc", "acc"] by default), "average_over" ("dataset" or absent), "titles"
(display names of coordinates) and "heatmap" ({"rows", "cols", "panels", "metric"}) for tools/plots.py.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.grid import (REPO_ROOT, GridError, average_cell, cli_value, format_value, load_grid,  # noqa: E402
                        parse_override, path_arg, runs_dir_of, validate_grid)
from tools.run_state import is_finished, run_mismatches  # noqa: E402

METRICS = ("auc", "acc")
METRIC_TITLE = {"auc": "AUC", "acc": "ACC"}


@dataclass
class Cell:
    name: str
    coords: dict
    title: str = ""                                  # the variant's display title
    expected: int = 0                                # seeds the grid asks for
    seeds: list = field(default_factory=list)        # seeds found
    values: dict = field(default_factory=lambda: {m: [] for m in METRICS})   # metric -> per-seed values
    params: list = field(default_factory=list)
    paper: dict = field(default_factory=dict)
    run_dirs: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)       # "ci": pooled intervals, "ref": comparison with --reference

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def status(self) -> str:
        return "missing" if self.n == 0 else "complete" if self.n >= self.expected else "partial"

    def mean(self, metric) -> Optional[float]:
        v = self.values[metric]
        return statistics.fmean(v) if v else None

    def std(self, metric) -> Optional[float]:
        v = self.values[metric]
        return statistics.stdev(v) if len(v) > 1 else None

    def diff(self, metric) -> Optional[float]:
        m, p = self.mean(metric), self.paper.get(metric)
        return None if m is None or p is None else m - p

    def coord_text(self, key: str) -> str:
        """The cell's coordinate `key` as tables and plots write it (a variant by its title)."""
        value = self.coords.get(key)
        if key == "variant" and self.title and value != "mean":
            return self.title
        return "" if value is None else format_value(value)

    def param_count(self):
        distinct = sorted(set(self.params))
        return distinct[0] if len(distinct) == 1 else None


@dataclass
class Aggregate:
    grid: dict
    runs_dir: Path
    cells: list
    extra: dict
    excluded: list = field(default_factory=list)     # (run name, reason)
    unfinished: list = field(default_factory=list)   # run names without results
    stats: dict = field(default_factory=dict)        # settings of add_statistics

    @property
    def table(self) -> dict:
        return self.grid.get("table") or {}

    def coord_keys(self) -> list:
        keys = []
        for c in self.cells:
            keys += [k for k in c.coords if k not in keys]
        return keys


def read_run(run_dir: Path) -> Optional[dict]:
    """{'auc', 'acc', 'param_count'} of a finished, evaluated run, else None."""
    if not is_finished(run_dir):
        return None
    metrics = json.loads((run_dir / "eval" / "test" / "metrics.json").read_text())
    summary = json.loads((run_dir / "train_summary.json").read_text())
    return {"auc": float(metrics["auc"]), "acc": float(metrics["acc"]), "param_count": summary.get("param_count")}


def aggregate(grid: dict, runs_dir: Path, extra: Optional[dict] = None) -> Aggregate:
    runs = validate_grid(grid)
    paper = (grid.get("paper") or {}).get("values") or {}
    agg = Aggregate(grid=grid, runs_dir=Path(runs_dir), cells=[], extra=dict(extra or {}))
    by_name: dict[str, Cell] = {}
    for run in runs:
        cell = by_name.get(run.cell)
        if cell is None:
            cell = by_name[run.cell] = Cell(name=run.cell, coords=dict(run.coords), title=run.variant_title,
                                            paper=dict(paper.get(run.cell, {})))
            agg.cells.append(cell)
        cell.expected += 1
        run_dir = Path(runs_dir) / run.name
        mismatch = run_mismatches(run_dir, run, extra)
        if mismatch:
            agg.excluded.append((run.name, "; ".join(mismatch)))
            continue
        result = read_run(run_dir)
        if result is None:
            agg.unfinished.append(run.name)
            continue
        cell.seeds.append(run.seed)
        for m in METRICS:
            cell.values[m].append(result[m])
        if result["param_count"] is not None:
            cell.params.append(result["param_count"])
        cell.run_dirs.append(run_dir)
    if (grid.get("table") or {}).get("average_over") == "dataset":
        agg.cells += _averages(runs, by_name, paper)
    return agg


def _averages(runs, by_name, paper) -> list:
    groups: dict[str, list] = {}
    for run in runs:
        members = groups.setdefault(average_cell(run), [])
        if by_name[run.cell] not in members:
            members.append(by_name[run.cell])
    out = []
    for name, members in groups.items():
        first = members[0]
        avg = Cell(name=name, coords={**first.coords, "dataset": "mean"}, title=first.title,
                   expected=min(c.expected for c in members), paper=dict(paper.get(name, {})))
        common = set(members[0].seeds)
        for c in members[1:]:
            common &= set(c.seeds)
        for seed in sorted(common):
            avg.seeds.append(seed)
            for m in METRICS:
                avg.values[m].append(statistics.fmean(c.values[m][c.seeds.index(seed)] for c in members))
        out.append(avg)
    return out


# ----------------------------------------------------------------------------------------------------------
# formatting
# ----------------------------------------------------------------------------------------------------------

def fmt(x: Optional[float], signed: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def fmt_ours(cell: Cell, metric: str) -> str:
    if cell.n == 0:
        return "missing"
    std = cell.std(metric)
    return f"{cell.mean(metric):.3f} ± {'n/a' if std is None else f'{std:.3f}'}"


def coord_text(cell: Cell, key: str) -> str:
    return cell.coord_text(key)


def _title(agg: Aggregate, key: str) -> str:
    return (agg.table.get("titles") or {}).get(key, key)


def _md_table(header: list, rows: list) -> list:
    esc = [[str(x).replace("|", "\\|") for x in row] for row in [header] + rows]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return lines


def _ordered(values):
    return list(dict.fromkeys(values))


def _sorted_keys(cells: list, keys: list) -> list:
    """Distinct value tuples of `keys`, ordered key by key, each key's values in order of first appearance
    (so cols ["model.dim", "model.name"] give 64/ttm, 64/lmttm, 160/ttm, ... as in the paper)."""
    order = {k: {v: i for i, v in enumerate(_ordered(coord_text(c, k) for c in cells))} for k in keys}
    values = _ordered(tuple(coord_text(c, k) for k in keys) for c in cells)
    return sorted(values, key=lambda vs: [order[k][v] for k, v in zip(keys, vs)])


def pivot_tables(agg: Aggregate) -> list:
    """Markdown lines of the grid's layout: one table per group value and metric."""
    t = agg.table
    rows, cols, groups = t.get("rows") or [], t.get("cols") or [], t.get("groups") or []
    if not rows:
        return []
    lines = []
    metrics = t.get("metrics", list(METRICS))
    group_values = _ordered(tuple(coord_text(c, k) for k in groups) for c in agg.cells)
    for gv in group_values:
        members = [c for c in agg.cells if tuple(coord_text(c, k) for k in groups) == gv]
        row_values = _sorted_keys(members, rows)
        col_values = _sorted_keys(members, cols)
        index = {(tuple(coord_text(c, k) for k in rows), tuple(coord_text(c, k) for k in cols)): c for c in members}
        for metric in metrics:
            heading = METRIC_TITLE[metric]
            if groups:
                heading += " — " + ", ".join(f"{_title(agg, k)} {v}" for k, v in zip(groups, gv))
            lines += ["", f"### {heading}", ""]
            header = [" / ".join(_title(agg, k) for k in rows) + " ↓ " + " / ".join(_title(agg, k) for k in cols)
                      + (" →" if cols else "")]
            header += [" / ".join(cv) or METRIC_TITLE[metric] for cv in col_values]
            body = []
            for rv in row_values:
                line = [" / ".join(rv)]
                for cv in col_values:
                    c = index.get((rv, cv))
                    if c is None:
                        line.append("")
                        continue
                    text = fmt_ours(c, metric)
                    if c.n:
                        text += f" ({c.n})"
                    text += f" / {fmt(c.paper.get(metric))}"
                    line.append(text)
                body.append(line)
            lines += _md_table(header, body)
    return lines


def varying_keys(agg: Aggregate) -> list:
    keys = []
    for k in agg.coord_keys():
        if k == "dataset" or len({coord_text(c, k) for c in agg.cells}) > 1:
            keys.append(k)
    return keys


def markdown(agg: Aggregate, grid_path: Optional[str] = None) -> str:
    g = agg.grid
    paper = g.get("paper") or {}
    n_status = {s: sum(c.status == s for c in agg.cells) for s in ("complete", "partial", "missing")}
    overrides = ", ".join(f"`{k}={cli_value(v)}`" for k, v in agg.extra.items()) or "none"
    lines = [f"# {g['name']}", ""]
    if g.get("description"):
        lines += [g["description"], ""]
    lines += [
        f"- grid: `{grid_path or g['name']}`; runs: `{path_arg(agg.runs_dir)}`; "
        f"seeds asked per cell: {max((c.expected for c in agg.cells), default=0)}",
        "- ours: test split (`eval/test/metrics.json` of each run: best-validation-AUC checkpoint, official "
        "MedMNIST evaluator), mean ± sample standard deviation (ddof = 1) over seeds, \"± n/a\" with one seed, "
        "\"missing\" with none",
        f"- paper: {paper.get('source', 'n/a')}; Δ = ours − paper; \"n/a\" where the paper gives no value",
        f"- command-line overrides in effect: {overrides}"
        + (" (these runs deviate from the grid's settings)" if agg.extra else ""),
        f"- cells: {n_status['complete']} complete, {n_status['partial']} partial, {n_status['missing']} missing",
    ]
    if paper.get("note"):
        lines += [f"- note: {paper['note']}"]
    lines += stats_notes(agg)
    pivots = pivot_tables(agg)
    if pivots:
        lines += ["", "## Layout of the paper (ours mean ± std (seeds) / paper)"] + pivots
    keys = varying_keys(agg)
    header = [_title(agg, k) for k in keys] + ["seeds"]
    for m in METRICS:
        header += [f"{METRIC_TITLE[m]} ours", f"{METRIC_TITLE[m]} paper", f"Δ {METRIC_TITLE[m]}"]
    header += ["params"] + stats_header(agg)
    body = []
    for c in agg.cells:
        row = [coord_text(c, k) for k in keys] + [str(c.n)]
        for m in METRICS:
            row += [fmt_ours(c, m), fmt(c.paper.get(m)), fmt(c.diff(m), signed=True)]
        p = c.param_count()
        row += ["" if p is None else f"{p:,}"] + stats_cells(agg, c)
        body.append(row)
    lines += ["", "## All cells", ""] + _md_table(header, body)
    if agg.excluded or agg.unfinished:
        lines += ["", "## Notes", ""]
        if agg.unfinished:
            lines += [f"- {len(agg.unfinished)} run(s) without results (not finished or not evaluated): "
                      + ", ".join(agg.unfinished[:20]) + (" ..." if len(agg.unfinished) > 20 else "")]
        for name, reason in agg.excluded:
            lines += [f"- excluded {name}: made with other settings ({reason})"]
    return "\n".join(lines) + "\n"


def csv_rows(agg: Aggregate) -> tuple[list, list]:
    keys = agg.coord_keys()
    header = ["cell", *keys, "n_seeds", "seeds"]
    for m in METRICS:
        header += [f"{m}_mean", f"{m}_std"]
    header += [f"paper_{m}" for m in METRICS] + [f"diff_{m}" for m in METRICS] + ["param_count", "status"]
    header += STATS_CSV + (REF_CSV if agg.stats.get("reference") else [])

    def num(x):
        return "" if x is None else f"{x:.6f}"

    rows = []
    for c in agg.cells:
        row = [c.name] + ["" if c.coords.get(k) is None else format_value(c.coords[k]) for k in keys]
        row += [c.n, " ".join(map(str, c.seeds))]
        for m in METRICS:
            row += [num(c.mean(m)), num(c.std(m))]
        row += [num(c.paper.get(m)) for m in METRICS] + [num(c.diff(m)) for m in METRICS]
        p = c.param_count()
        row += ["" if p is None else p, c.status] + stats_csv(agg, c)
        rows.append(row)
    return header, rows


def write_tables(agg: Aggregate, out_dir: Path, grid_path: Optional[str] = None) -> list:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "table.md"
    md.write_text(markdown(agg, grid_path))
    header, rows = csv_rows(agg)
    path = out_dir / "table.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return [md, path]


# ----------------------------------------------------------------------------------------------------------
# error bars and paired comparisons (tools/compare.py)
# ----------------------------------------------------------------------------------------------------------

STATS_CSV = ["auc_ci_low", "auc_ci_high", "acc_ci_low", "acc_ci_high"]
REF_CSV = ["ref_delta_auc_mean", "ref_delta_auc_std", "ref_auc_significant", "ref_delta_acc_mean",
           "ref_delta_acc_std", "ref_acc_significant", "ref_pairs"]


def model_key(agg: Aggregate) -> str:
    return "variant" if "variant" in agg.coord_keys() else "model.name"


def add_statistics(agg: Aggregate, reference: Optional[str] = None, resamples: int = 2000,
                   level: float = 0.95) -> None:
    """Pooled CIs of every cell with runs, and with `reference` its comparison with the reference cell."""
    from tools import compare

    if resamples < 0 or not 0 < level < 1:
        raise GridError("--ci-resamples is 0 or more and --ci-level lies between 0 and 1")
    key = model_key(agg)
    if reference is not None and not any(format_value(c.coords.get(key)) == reference for c in agg.cells):
        models = sorted({format_value(c.coords.get(key)) for c in agg.cells if c.coords.get(key) is not None})
        raise GridError(f"--reference {reference}: no cell of that {key} (the grid has {', '.join(models)})")
    agg.stats = {"reference": reference, "key": key, "level": level, "resamples": resamples}
    by_coords = {tuple(sorted((k, format_value(v)) for k, v in c.coords.items())): c for c in agg.cells}
    for c in agg.cells:
        if c.run_dirs and resamples > 0:
            c.stats["ci"] = compare.pooled_intervals(c.run_dirs, n_resamples=resamples, level=level)
        if reference is None or not c.run_dirs:
            continue
        coords = {k: format_value(v) for k, v in c.coords.items()}
        ref = by_coords.get(tuple(sorted({**coords, key: reference}.items())))
        if ref is None or ref is c or not ref.run_dirs:
            continue
        try:
            result = compare.compare_sides(c.run_dirs, ref.run_dirs, n_resamples=resamples, level=level)
            c.stats["ref"] = result["combined"]
        except (compare.CompareError, ValueError) as err:
            c.stats["ref_error"] = str(err)


def stats_notes(agg: Aggregate) -> list:
    s = agg.stats
    if not s:
        return []
    lines = [f"- pooled CI: {s['level']:.0%} bootstrap interval of the seed mean ({s['resamples']} stratified "
             "resamples of the test samples, shared by the seeds: test-sample noise, not seed noise)"]
    if s["reference"]:
        lines.append(f"- vs {s['reference']}: paired per seed (tools/compare.py: DeLong / McNemar, or paired "
                     f"bootstrap), mean Δ ± std over the seeds both cells have, and the seeds with p < 0.05")
    lines += [f"- {c.name} not compared with {s['reference']}: {c.stats['ref_error']}" for c in agg.cells
              if "ref_error" in c.stats]
    return lines


def stats_header(agg: Aggregate) -> list:
    s = agg.stats
    if not s:
        return []
    head = [f"{METRIC_TITLE[m]} pooled CI" for m in METRICS]
    return head + ([f"Δ{METRIC_TITLE[m]} vs {s['reference']} (p<0.05)" for m in METRICS] if s["reference"] else [])


def stats_cells(agg: Aggregate, cell: Cell) -> list:
    if not agg.stats:
        return []
    ci = cell.stats.get("ci")
    out = ["n/a" if ci is None else f"[{ci[m][0]:.3f}, {ci[m][1]:.3f}]" for m in METRICS]
    if agg.stats["reference"]:
        ref = cell.stats.get("ref")
        for m in METRICS:
            if ref is None:
                out.append("n/a")
                continue
            std = ref[f"delta_{m}_std"]
            out.append(f"{ref[f'delta_{m}_mean']:+.3f} ± {'n/a' if std is None else f'{std:.3f}'} "
                       f"({ref[f'{m}_significant']}/{ref['n_pairs']})")
    return out


def stats_csv(agg: Aggregate, cell: Cell) -> list:
    ci = cell.stats.get("ci")
    out = [""] * 4 if ci is None else [f"{ci[m][i]:.6f}" for m in METRICS for i in (0, 1)]
    if agg.stats.get("reference"):
        ref = cell.stats.get("ref")
        if ref is None:
            return out + [""] * len(REF_CSV)
        for m in METRICS:
            std = ref[f"delta_{m}_std"]
            out += [f"{ref[f'delta_{m}_mean']:.6f}", "" if std is None else f"{std:.6f}", ref[f"{m}_significant"]]
        out.append(ref["n_pairs"])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("grid", help="grid file, e.g. experiments/table8.json")
    parser.add_argument("--out", help="folder for table.md / table.csv (default sweeps/<grid name>)")
    parser.add_argument("--runs", help="folder of the run directories (default: as tools/sweep.py, i.e. the "
                                       "grid's runs_dir or sweeps/<name>)")
    parser.add_argument("--override", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="the --override values the runs were swept with (so their configs match)")
    parser.add_argument("--plots", action="store_true", help="also write PNGs (tools/plots.py; needs matplotlib)")
    parser.add_argument("--reference", metavar="MODEL", help="add the paired comparison (tools/compare.py) of every "
                        "cell with this model's cell (a variant label, or a model.name value)")
    parser.add_argument("--ci-resamples", type=int, default=2000, help="bootstrap resamples of the pooled CI (the "
                        "interval of the seed mean over test-sample resamples shared by the seeds); 0 = none")
    parser.add_argument("--ci-level", type=float, default=0.95, help="confidence level (default 0.95)")
    args = parser.parse_args(argv)
    try:
        grid = load_grid(args.grid)
        extra = dict(parse_override(o) for o in args.override)
        runs_dir = runs_dir_of(grid, args.runs)
        agg = aggregate(grid, runs_dir, extra)
        add_statistics(agg, args.reference, args.ci_resamples, args.ci_level)
    except GridError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out_dir = Path(args.out).resolve() if args.out else REPO_ROOT / "sweeps" / grid["name"]
    grid_path = path_arg(Path(args.grid))
    written = write_tables(agg, out_dir, grid_path)
    if args.plots:
        from tools import plots
        try:
            written += plots.plot_aggregate(agg, out_dir, runs=True)
        except plots.MissingDependency as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    for path in written:
        print(path)
    if agg.excluded:
        print(f"warning: {len(agg.excluded)} run(s) excluded, made with other settings (see table.md; "
              "pass the --override values they were swept with)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
