"""The grid language of tools/sweep.py: a grid file expanded into runs, their names, cells and settings.

The grid file format is documented at the top of tools/sweep.py. `expand` turns a grid into its runs
(datasets x variants x axes x seeds, in that nesting order), `validate_grid` also checks the grid's paper
values and table layout against the cells, and `select`, `parse_override` and `run_settings` apply the
command line's --only and --override.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "config"
DEFAULT_SEEDS = [0, 1, 2]

# Short names of axis keys in run names; a grid's "labels" replace them. "" writes the bare value.
DEFAULT_LABELS = {
    "model.name": "",
    "model.dim": "dim",
    "model.memory_tokens": "mem",
    "model.noise": "noise",
    "model.noise_rate": "noiserate",
    "train.epochs": "ep",
    "train.lr": "lr",
    "train.batch_size": "bs",
    "train.weight_decay": "wd",
}

# Keys set by the sweep itself (not allowed in a grid) and keys not compared with an existing run's config.json.
RESERVED = {"data.name", "train.seed", "output.dir", "output.name"}
NOT_COMPARED = {"data.root", "data.download", "data.device_cache", "train.device", "eval.batch_size",
                "output.dir", "output.name"}


class GridError(ValueError):
    """A grid file that cannot be expanded; the message says what is wrong."""


# ----------------------------------------------------------------------------------------------------------
# grid expansion
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """One engine run of a grid."""

    name: str                 # run directory name, e.g. adrenalmnist3d-lmttm-mem64-dim64-seed0
    cell: str                 # the name without the seed: what the aggregator averages over seeds
    dataset: str
    seed: int
    config: str               # config file relative to config/, e.g. adrenalmnist3d.json
    settings: dict            # "section.key" -> value, everything the grid sets (incl. data.name, train.seed)
    coords: dict = field(default_factory=dict)   # cell coordinates: dataset, variant, axis keys -> value
    variant_title: str = ""

    @property
    def config_path(self) -> Path:
        return CONFIG_DIR / self.config


def format_value(value) -> str:
    """A value as written in run names: 64, 0.0001, uniform, 64_64 for lists."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        short = format(value, "g")
        return short if float(short) == value else repr(value)
    if isinstance(value, (list, tuple)):
        return "_".join(format_value(v) for v in value)
    return str(value)


def _segment(label: str, value) -> str:
    text = format_value(value)
    if label == "":
        seg = text
    elif re.match(r"[0-9.+-]", text):
        seg = f"{label}{text}"
    else:
        seg = f"{label}_{text}"
    return re.sub(r"[^A-Za-z0-9._+=-]", "_", seg)


def _check_key(key, where: str, allow_reserved: bool = False):
    if not isinstance(key, str) or not re.fullmatch(r"[a-z_]+\.[A-Za-z0-9_]+", key):
        raise GridError(f"{where}: {key!r} is not a 'section.key' setting")
    if key in RESERVED and not allow_reserved:
        raise GridError(f"{where}: {key} is set by the sweep itself (use the grid's datasets/seeds, or --out)")


def _check_overrides(overrides, where: str) -> dict:
    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        raise GridError(f"{where} must be an object of 'section.key': value")
    for key in overrides:
        _check_key(key, where)
    return dict(overrides)


def _axes(axes, where: str) -> list[tuple[list[str], list[list]]]:
    """[(keys, [values tuple per point])] from the grid's "axes"."""
    if axes is None:
        return []
    if not isinstance(axes, dict):
        raise GridError(f"{where}.axes must be an object: key (or 'key1+key2') -> list of values")
    out = []
    for spec, values in axes.items():
        keys = spec.split("+")
        for key in keys:
            _check_key(key, f"{where}.axes")
        if not isinstance(values, list) or not values:
            raise GridError(f"{where}.axes[{spec!r}] must be a non-empty list of values")
        points = []
        for v in values:
            if len(keys) > 1:
                if not isinstance(v, list) or len(v) != len(keys):
                    raise GridError(f"{where}.axes[{spec!r}]: {v!r} must be a list of {len(keys)} values, "
                                    f"one for each of {keys}")
                points.append(list(v))
            else:
                points.append([v])
        out.append((keys, points))
    return out

def _blocks(grid: dict) -> list[tuple[str, dict]]:
    subgrids = grid.get("subgrids")
    if subgrids is None:
        return [("grid", grid)]
    if not isinstance(subgrids, list) or not subgrids:
        raise GridError("subgrids must be a non-empty list of objects")
    blocks = []
    for i, sub in enumerate(subgrids):
        if not isinstance(sub, dict):
            raise GridError(f"subgrids[{i}] must be an object")
        for key in ("name", "table", "paper", "runs_dir", "subgrids"):
            if key in sub:
                raise GridError(f"subgrids[{i}] may not set {key!r} (only the top level does)")
        merged = {k: v for k, v in grid.items() if k != "subgrids"}
        merged.update(sub)
        merged["overrides"] = {**(grid.get("overrides") or {}), **(sub.get("overrides") or {})}
        blocks.append((f"subgrids[{i}]", merged))
    return blocks


def expand(grid: dict) -> list[Run]:
    """Every run of a grid, in order (datasets, variants, axes, seeds). Raises GridError on a bad grid."""
    if not isinstance(grid, dict):
        raise GridError("a grid must be a JSON object")
    name = grid.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise GridError(f"grid 'name' must be a plain word (letters, digits, . _ -), got {name!r}")
    known = {"name", "description", "datasets", "config", "seeds", "overrides", "variants", "axes", "labels",
             "subgrids", "runs_dir", "table", "paper"}
    unknown = set(grid) - known
    if unknown:
        raise GridError(f"unknown grid keys {sorted(unknown)}; accepted: {sorted(known)}")
    runs = [run for where, block in _blocks(grid) for run in _expand_block(where, block)]
    seen: dict[str, Run] = {}
    for run in runs:
        if run.name in seen:
            raise GridError(f"two runs would share the directory {run.name!r}: give the variants distinct labels "
                            "or the axes distinct labels")
        seen[run.name] = run
    return runs


def _expand_block(where: str, block: dict) -> list[Run]:
    """The runs of one block (the grid, or one of its subgrids merged with the top level)."""
    datasets = block.get("datasets")
    if not isinstance(datasets, list) or not datasets or not all(isinstance(d, str) for d in datasets):
        raise GridError(f"{where}: 'datasets' must be a non-empty list of dataset flags")
    seeds = block.get("seeds", DEFAULT_SEEDS)
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise GridError(f"{where}: 'seeds' must be a non-empty list of non-negative integers")
    overrides = _check_overrides(block.get("overrides"), f"{where}.overrides")
    labels = {**DEFAULT_LABELS, **(block.get("labels") or {})}
    axes = _axes(block.get("axes"), where)
    variants = block.get("variants")
    if variants is None:
        variants = [None]
    elif not isinstance(variants, list) or not variants:
        raise GridError(f"{where}: 'variants' must be a non-empty list")
    runs = []
    for dataset in datasets:
        for vi, variant in enumerate(variants):
            config, settings, coords, parts, title = _variant(where, vi, variant, block, dataset, overrides, axes)
            for point in itertools.product(*[points for _, points in axes]):
                s, c, p = dict(settings), dict(coords), list(parts)
                for (keys, _), values in zip(axes, point):
                    for key, value in zip(keys, values):
                        s[key] = value
                        c[key] = value
                        p.append(_segment(labels.get(key, key.split(".")[-1]), value))
                cell = "-".join(p)
                for seed in seeds:
                    runs.append(Run(name=f"{cell}-seed{seed}", cell=cell, dataset=dataset, seed=seed,
                                    config=config, settings={**s, "data.name": dataset, "train.seed": seed},
                                    coords=c, variant_title=title))
    return runs


def _variant(where: str, vi: int, variant, block: dict, dataset: str, overrides: dict, axes: list):
    """(config file, settings, coords, name parts, title) of one dataset x variant of a block."""
    settings = dict(overrides)
    coords = {"dataset": dataset}
    parts = [dataset]
    config = block.get("config", "{dataset}.json")
    title = ""
    if variant is not None:
        if not isinstance(variant, dict) or not isinstance(variant.get("label"), str) or not variant["label"]:
            raise GridError(f"{where}.variants[{vi}] must be an object with a non-empty 'label'")
        extra = set(variant) - {"label", "title", "config", "overrides"}
        if extra:
            raise GridError(f"{where}.variants[{vi}]: unknown keys {sorted(extra)}")
        settings.update(_check_overrides(variant.get("overrides"), f"{where}.variants[{vi}].overrides"))
        config = variant.get("config", config)
        title = variant.get("title", variant["label"])
        coords["variant"] = variant["label"]
        parts.append(_segment("", variant["label"]))
    elif "model.name" in overrides and not any("model.name" in keys for keys, _ in axes):
        parts.append(_segment("", overrides["model.name"]))
    if not isinstance(config, str) or not config:
        raise GridError(f"{where}: a config must be a file name under config/, got {config!r}")
    try:
        config = config.format(dataset=dataset)
    except (KeyError, IndexError, ValueError) as err:
        raise GridError(f"{where}: config {config!r}: only {{dataset}} may be replaced ({err})") from None
    return config, settings, coords, parts, title




def cells(runs: list[Run]) -> list[str]:
    """The distinct cells of the runs, in order."""
    return list(dict.fromkeys(r.cell for r in runs))


def load_grid(path) -> dict:
    """The grid file's JSON object; GridError when it cannot be read, is not UTF-8 or not a JSON object."""
    path = Path(path)
    try:
        grid = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise GridError(f"cannot read grid file {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise GridError(f"{path} is not a UTF-8 text file (byte {err.start}: {err.reason}); a grid is a JSON "
                        f"file") from None
    except json.JSONDecodeError as err:
        raise GridError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(grid, dict):
        raise GridError(f"{path} must hold a JSON object")
    return grid


def validate_grid(grid: dict) -> list[Run]:
    """Expand the grid and check its paper keys and table layout against the cells; return the runs."""
    runs = expand(grid)
    known_cells = set(cells(runs))
    table = grid.get("table") or {}
    average_over = table.get("average_over")
    if average_over is not None and average_over != "dataset":
        raise GridError("table.average_over may only be \"dataset\"")
    if average_over:
        known_cells |= {average_cell(r) for r in runs}
    paper = grid.get("paper") or {}
    values = paper.get("values") or {}
    if not isinstance(values, dict):
        raise GridError("paper.values must be an object: cell -> {\"auc\": x, \"acc\": y}")
    for cell, entry in values.items():
        if cell not in known_cells:
            close = sorted(known_cells)[:3]
            raise GridError(f"paper.values: {cell!r} is not a cell of this grid (cells look like {close})")
        if not isinstance(entry, dict) or not set(entry) <= {"auc", "acc"} or \
                not all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in entry.values()):
            raise GridError(f"paper.values[{cell!r}] must be {{\"auc\": x, \"acc\": y}} with values in [0, 1]")
    coord_keys = set()
    for r in runs:
        coord_keys |= set(r.coords)
    for part in ("rows", "cols", "groups"):
        keys = table.get(part, [])
        if not isinstance(keys, list) or not all(k in coord_keys for k in keys):
            raise GridError(f"table.{part} must be a list of cell coordinates {sorted(coord_keys)}, got {keys!r}")
    metrics = table.get("metrics", ["auc", "acc"])
    if not isinstance(metrics, list) or not metrics or not set(metrics) <= {"auc", "acc"}:
        raise GridError("table.metrics must be a non-empty list drawn from auc, acc")
    heat = table.get("heatmap")
    if heat is not None:
        for part in ("rows", "cols", "panels"):
            if heat.get(part) not in coord_keys:
                raise GridError(f"table.heatmap.{part} must be one of {sorted(coord_keys)}")
    return runs


def average_cell(run: Run) -> str:
    """The cell of a run's mean over datasets: its cell name with the dataset replaced by 'mean'."""
    return "mean" + run.cell[len(run.dataset):]


def runs_dir_of(grid: dict, out: Optional[str] = None) -> Path:
    """Where the runs of a grid live: --out (from the working directory), else the grid's runs_dir, else
    sweeps/<name>, both from the repository root."""
    if out:
        return Path(out).expanduser().resolve()
    return (REPO_ROOT / grid.get("runs_dir", f"sweeps/{grid['name']}")).resolve()


def select(runs: list[Run], only: Optional[list[str]] = None) -> list[Run]:
    """The runs whose name contains any of the `only` substrings (all runs without them)."""
    if not only:
        return runs
    return [r for r in runs if any(s in r.name for s in only)]


def parse_override(text: str) -> tuple[str, object]:
    """'train.epochs=5' -> ('train.epochs', 5); the value is read as JSON, else kept as a string."""
    key, eq, value = text.partition("=")
    if not eq:
        raise GridError(f"--override {text!r}: write section.key=value")
    key = key.strip()
    _check_key(key, "--override")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key, parsed


def run_settings(run: Run, extra: Optional[dict] = None) -> dict:
    """All settings of a run: the grid's, then the command line's --override (which win)."""
    return {**run.settings, **(extra or {})}


def cli_value(value) -> str:
    """A setting's value as written on a command line: strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def path_arg(path: Path) -> str:
    """A path as the commands write it: relative to the repository root when inside it, else absolute."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)
