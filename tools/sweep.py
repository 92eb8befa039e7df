"""Run a grid of experiments (one paper table) with the training engine, one run directory per run.

    python tools/sweep.py experiments/table8.json                       # run (or resume) every run
    python tools/sweep.py experiments/table8.json --dry-run             # print the commands only
    python tools/sweep.py experiments/table8.json --list                # runs and their state
    python tools/sweep.py experiments/table2.json --only adrenalmnist3d --max-runs 4
    python tools/sweep.py experiments/table4.json --override data.root=~/.medmnist
    python tools/sweep.py experiments/table8.json --jobs 8 --devices cuda:0,cuda:1   # 8 runs at once, 4 per GPU
    python tools/sweep.py experiments/table2.json --launcher slurm --partition gpu --gpus-per-run 1  # tools/cluster.py
    python tools/sweep.py experiments/table2.json --status             # each run's state, from the run directories

Each run is two engine calls, made with this Python from the repository root:

    python train.py   CONFIG --key value ... --data.name D --train.seed S --output.dir OUT --output.name NAME
    python predict.py CONFIG (the same arguments) --split test

No config file is edited: every setting of a run is a command-line override. A run whose
`train_summary.json` says finished and whose `eval/test/metrics.json` exists is skipped; a run whose
training finished but was not evaluated only gets the predict step; any other run is (re)started and
the engine resumes it from `last.pt`. So an interrupted sweep resumes where it stopped: run the same
command again. A failing run does not stop the others: its output is in `<run dir>/sweep.log` (both
steps, appended), the summary at the end lists it, and the exit status is 1.

Several runs at once: `--jobs N` keeps up to N runs going (each still train.py then predict.py, in its
own directory and `sweep.log`); N job slots each take the next unfinished run in grid order when their
previous run ends. `--devices D1,D2,...` gives job slot k the device D[k mod len(D)] (passed to every run
as `--train.device`; the device is not a setting of the run, so a run may resume or be skipped on
another device). With N > 1 each run gets `--threads` CPU threads (default cores // N, at least 1) via
OMP_NUM_THREADS and MKL_NUM_THREADS. The console shows one line per run start, end or failure (not the
runs' output), and the summary lists every run's outcome. Ctrl-C (or SIGTERM) starts no new run and sends
the running ones the same signal once (they run in their own process groups); each resumes from its
last.pt when the same command runs again; the exit status is 130 (143); a second Ctrl-C kills them.
`--jobs 1` (the default) runs one run after the other in the foreground as it always did.

The sweep records each run's config file and settings in `<run dir>/sweep_settings.json`. Before a run
directory is reused, that record (both ways: a key only one side sets counts) and the run's
`config.json` (the keys the grid sets) are compared with the run's settings; a directory made with
other settings (say `--override train.epochs=2` earlier) is reported as a failure and left alone
instead of being resumed, skipped or aggregated. Keys that do not change results (`NOT_COMPARED`:
data.root, device, ...) are not compared.

Grid file (JSON)
----------------
    {
      "name": "table8",                       # required; default run folder sweeps/<name>
      "description": "free text",
      "datasets": ["adrenalmnist3d", ...],    # required; every run gets --data.name <dataset>
      "config": "{dataset}.json",             # config file under config/ ({dataset} is replaced); default shown
      "seeds": [0, 1, 2],                     # --train.seed; default [0, 1, 2]
      "overrides": {"train.epochs": 100},     # "section.key": value, for every run
      "variants": [                           # optional: model lines, each with its own config and overrides
        {"label": "lmttm", "title": "LMTTM", "overrides": {"model.name": "lmttm"}},
        {"label": "resnet18_3d", "config": "baselines/resnet18_3d.json", "overrides": {...}}
      ],
      "axes": {                               # optional: the cartesian product of the axes is run
        "model.name": ["ttm", "lmttm"],
        "model.dim+model.memory_tokens": [[64, 64], [160, 160]]   # '+' ties keys: one value list each
      },
      "labels": {"model.memory_tokens": "mem"},   # optional short names used in run names
      "subgrids": [{...}, ...],               # optional: blocks expanded one by one, each block's keys
                                              # replacing the top level's ("overrides" are merged)
      "runs_dir": "sweeps/table8",            # optional: where the runs live (several grids may share)
      "table": {...},                         # layout for tools/aggregate.py (see there)
      "paper": {"source": "...", "values": {"<cell>": {"auc": 0.9, "acc": 0.8}}}
    }

Runs are datasets x variants x axes x seeds, in that nesting order. Settings are applied in the order
grid overrides, variant overrides, axis values, `--data.name`/`--train.seed`, then `--override` from the
command line (which wins). A run's name is `<dataset>[-<variant or model.name>]-<axis labels>-seed<s>`,
e.g. `adrenalmnist3d-lmttm-mem64-dim64-seed0`: an axis value is written as label + value (`dim64`,
`lr0.0001`, `noise_uniform` for words, the bare value where the label is ""). The name without the
seed is the *cell* (`adrenalmnist3d-lmttm-mem64-dim64`); the aggregator averages a cell over its seeds
and the grid's "paper" values are keyed by cell.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

if __package__ in (None, ""):  # run as a script: the repository root, for tools.cluster
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO_ROOT = Path(__file__).resolve().parent.parent
LAUNCHERS = ("local", "slurm", "submitit-local")  # --launcher; all but local are tools/cluster.py's
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

Runner = Callable[[list, Path, Path], int]


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

    runs: list[Run] = []
    for where, block in _blocks(grid):
        datasets = block.get("datasets")
        if not isinstance(datasets, list) or not datasets or not all(isinstance(d, str) for d in datasets):
            raise GridError(f"{where}: 'datasets' must be a non-empty list of dataset flags")
        seeds = block.get("seeds", DEFAULT_SEEDS)
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
            raise GridError(f"{where}: 'seeds' must be a non-empty list of non-negative integers")
        base_config = block.get("config", "{dataset}.json")
        overrides = _check_overrides(block.get("overrides"), f"{where}.overrides")
        labels = {**DEFAULT_LABELS, **(block.get("labels") or {})}
        axes = _axes(block.get("axes"), where)
        variants = block.get("variants")
        if variants is None:
            variants = [None]
        elif not isinstance(variants, list) or not variants:
            raise GridError(f"{where}: 'variants' must be a non-empty list")

        for dataset in datasets:
            for vi, variant in enumerate(variants):
                settings = dict(overrides)
                coords = {"dataset": dataset}
                parts = [dataset]
                config = base_config
                title = ""
                if variant is not None:
                    if not isinstance(variant, dict) or not isinstance(variant.get("label"), str) \
                            or not variant["label"]:
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

                for point in itertools.product(*[points for _, points in axes]):
                    s = dict(settings)
                    c = dict(coords)
                    p = list(parts)
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
    seen: dict[str, Run] = {}
    for run in runs:
        if run.name in seen:
            raise GridError(f"two runs would share the directory {run.name!r}: give the variants distinct labels "
                            "or the axes distinct labels")
        seen[run.name] = run
    return runs


def cells(runs: list[Run]) -> list[str]:
    """The distinct cells of the runs, in order."""
    return list(dict.fromkeys(r.cell for r in runs))


def load_grid(path) -> dict:
    path = Path(path)
    try:
        grid = json.loads(path.read_text())
    except OSError as err:
        raise GridError(f"cannot read grid file {path}: {err.strerror}") from None
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


# ----------------------------------------------------------------------------------------------------------
# run state
# ----------------------------------------------------------------------------------------------------------

def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # missing, unreadable, not UTF-8 or not JSON
        return None


def train_finished(run_dir: Path) -> bool:
    summary = _read_json(Path(run_dir) / "train_summary.json")
    return isinstance(summary, dict) and summary.get("finished") is True


def is_finished(run_dir: Path, split: str = "test") -> bool:
    """Training finished and the split was evaluated."""
    return train_finished(run_dir) and (Path(run_dir) / "eval" / split / "metrics.json").is_file()


def run_state(run_dir: Path) -> str:
    """What the run directory holds: "finished" (trained and evaluated), "trained", "started" or "new"."""
    run_dir = Path(run_dir)
    return ("finished" if is_finished(run_dir) else "trained" if train_finished(run_dir) else
            "started" if run_dir.exists() else "new")


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def config_mismatches(run_dir: Path, settings: dict) -> list[str]:
    """Settings that an existing run's config.json contradicts ('key: run has X, wanted Y')."""
    config = _read_json(Path(run_dir) / "config.json")
    if not isinstance(config, dict):
        return []
    out = []
    for key, wanted in settings.items():
        if key in NOT_COMPARED:
            continue
        section, _, name = key.partition(".")
        sec = config.get(section)
        if not isinstance(sec, dict) or name not in sec:
            continue
        if not _same(sec[name], wanted):
            out.append(f"{key}: run has {json.dumps(sec[name])}, wanted {json.dumps(wanted)}")
    return out


SETTINGS_FILE = "sweep_settings.json"


def write_settings(run_dir: Path, config: str, settings: dict):
    """Record what the sweep launched a run with (so a later --override, or its absence, is noticed)."""
    (Path(run_dir) / SETTINGS_FILE).write_text(json.dumps({"config": config, "settings": settings}, indent=1) + "\n")


def recorded_mismatches(run_dir: Path, config: str, settings: dict) -> list[str]:
    """Differences between the settings recorded by an earlier sweep of this run and the wanted ones, in
    both directions (a key only one side sets counts)."""
    recorded = _read_json(Path(run_dir) / SETTINGS_FILE)
    if not isinstance(recorded, dict):
        return []
    out = []
    if recorded.get("config") != config:
        out.append(f"config file: run has {recorded.get('config')}, wanted {config}")
    old = recorded.get("settings") or {}
    config = _read_json(Path(run_dir) / "config.json") or {}

    def resolved(key):  # the value the run used for a key it did not set, if its config.json says
        section, _, name = key.partition(".")
        sec = config.get(section) if isinstance(config, dict) else None
        return f" ({json.dumps(sec[name])})" if isinstance(sec, dict) and name in sec else ""

    for key in sorted((set(old) | set(settings)) - NOT_COMPARED):
        if key not in old:
            out.append(f"{key}: run has its config file's value{resolved(key)}, wanted {json.dumps(settings[key])}")
        elif key not in settings:
            out.append(f"{key}: run has {json.dumps(old[key])}, wanted the config file's value")
        elif not _same(old[key], settings[key]):
            out.append(f"{key}: run has {json.dumps(old[key])}, wanted {json.dumps(settings[key])}")
    return out


def run_mismatches(run_dir: Path, run: "Run", extra: Optional[dict] = None) -> list[str]:
    """Why an existing run directory does not hold this run (empty list: it does, or it is new)."""
    settings = run_settings(run, extra)
    out = recorded_mismatches(run_dir, run.config, settings)
    keys = {m.split(":")[0] for m in out}
    return out + [m for m in config_mismatches(run_dir, settings) if m.split(":")[0] not in keys]


# ----------------------------------------------------------------------------------------------------------
# commands and running
# ----------------------------------------------------------------------------------------------------------

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


def cli_value(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _path_arg(path: Path) -> str:
    path = Path(path).resolve()
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def run_settings(run: Run, extra: Optional[dict] = None) -> dict:
    """All settings of a run: the grid's, then the command line's --override (which win)."""
    return {**run.settings, **(extra or {})}


def commands(run: Run, runs_dir: Path, extra: Optional[dict] = None, python: str = sys.executable,
             split: str = "test") -> tuple[list[str], list[str]]:
    """The train and predict command lines of a run (to be run from the repository root)."""
    args = [_path_arg(run.config_path)]
    for key, value in run_settings(run, extra).items():
        args += [f"--{key}", cli_value(value)]
    args += ["--output.dir", _path_arg(runs_dir), "--output.name", run.name]
    return [python, "train.py", *args], [python, "predict.py", *args, "--split", split]


class _Children:
    """The live child processes of a sweep running several runs at once, so that Ctrl-C reaches each of
    them exactly once (they run in their own process groups, out of the terminal's reach)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.procs: set = set()
        self.stopping = False

    def start(self, cmd, **popen_args):
        """Popen(cmd), or None once the sweep is stopping (nothing new starts after Ctrl-C)."""
        with self.lock:
            if self.stopping:
                return None
            proc = subprocess.Popen(cmd, start_new_session=True, **popen_args)
            self.procs.add(proc)
            return proc

    def done(self, proc):
        with self.lock:
            self.procs.discard(proc)

    def stop(self, sig) -> int:
        """Send `sig` to every live child's process group; return how many were signalled."""
        with self.lock:
            self.stopping = True
            procs = list(self.procs)
        for proc in procs:
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        return len(procs)


_CHILDREN = _Children()


def subprocess_runner(cmd: list, cwd: Path, log_path: Path, env: Optional[dict] = None) -> int:
    """Run a command, appending its stdout and stderr to log_path; return its exit status.

    `env` (given when the sweep runs several runs at once: the thread settings) is the command's whole
    environment; the command then runs in its own process group and the sweep forwards Ctrl-C to it."""
    with open(log_path, "a") as log:
        log.write(f"\n$ {shlex.join(map(str, cmd))}   # {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        log.flush()
        if env is None:
            return subprocess.run(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT).returncode
        proc = _CHILDREN.start(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
        if proc is None:
            log.write("not started: the sweep was interrupted\n")
            return 130
        try:
            return proc.wait()
        finally:
            _CHILDREN.done(proc)


def _tail(path: Path, n: int = 6) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("      | " + line for line in lines[-n:])


@dataclass
class SweepResult:
    skipped: list = field(default_factory=list)      # finished before this sweep
    done: list = field(default_factory=list)         # ran to the end now
    failed: list = field(default_factory=list)       # (name, reason, log path)
    not_started: list = field(default_factory=list)  # left for later by --max-runs
    planned: list = field(default_factory=list)      # --dry-run: runs that would run
    interrupted: list = field(default_factory=list)  # --jobs N: stopped (or not started) by Ctrl-C / SIGTERM
    outcomes: list = field(default_factory=list)     # --jobs N: (name, outcome line) for every run, in grid order
    stopped_by: Optional[str] = None                 # "Ctrl-C" or "SIGTERM" when a --jobs N sweep was stopped

    @property
    def exit_code(self) -> int:
        if self.stopped_by:
            return 143 if self.stopped_by == "SIGTERM" else 130
        return 1 if self.failed else 0


def select(runs: list[Run], only: Optional[list[str]] = None) -> list[Run]:
    if not only:
        return runs
    return [r for r in runs if any(s in r.name for s in only)]


def available_cores() -> int:
    """CPU cores this process may use (its affinity mask where the system has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def thread_env(threads: int) -> dict:
    """The environment of a run's processes with `threads` CPU threads (torch reads OMP_NUM_THREADS when it
    starts; MKL_NUM_THREADS for the BLAS); 0 leaves the environment as it is."""
    env = dict(os.environ)
    if threads > 0:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def _run_steps(run_dir: Path, train_cmd: list, predict_cmd: list, need_train: bool, runner: Runner, cwd: Path,
               log_path: Path, env: Optional[dict] = None, say=lambda step: None) -> Optional[str]:
    """Train (when needed) then predict one run; None when it finished, else why it did not."""
    def call(cmd):
        return runner(cmd, cwd, log_path) if env is None else runner(cmd, cwd, log_path, env=env)

    if need_train:
        say("train")
        rc = call(train_cmd)
        if rc != 0:
            return f"train.py exited with status {rc}"
        if not train_finished(run_dir):
            return "train.py exited 0 but train_summary.json does not say finished"
    say("predict")
    rc = call(predict_cmd)
    if rc != 0:
        return f"predict.py exited with status {rc}"
    if not is_finished(run_dir):
        return "predict.py exited 0 but eval/test/metrics.json is missing"
    return None


def refused_for_settings(run: Run, run_dir: Path, extra: Optional[dict], tag: str, result: "SweepResult", log) -> bool:
    """True (a failure logged and recorded) when the run's directory was made with other settings."""
    mismatch = run_mismatches(run_dir, run, extra)
    if mismatch:
        reason = "existing run directory has other settings (" + "; ".join(mismatch) + \
                 "); delete it or sweep into another --out"
        log(f"{tag}: FAILED: {reason}")
        result.failed.append((run.name, reason, None))
    return bool(mismatch)


def run_sweep(runs: list[Run], runs_dir: Path, *, extra: Optional[dict] = None, max_runs: Optional[int] = None,
              dry_run: bool = False, runner: Runner = subprocess_runner, python: str = sys.executable,
              cwd: Path = REPO_ROOT, log=print, jobs: int = 1, devices: Optional[list] = None,
              threads: Optional[int] = None) -> SweepResult:
    """Run (or resume) the given runs; see the module docstring. `runner(cmd, cwd, log_path)` executes one
    command and returns its exit status (tests pass a fake one).

    jobs > 1 runs up to `jobs` runs at once (see `_run_parallel`); `devices` (either way) are given to the
    runs as `--train.device`, job slot k using devices[k % len(devices)]; `threads` is each run's CPU thread
    count when jobs > 1 (None: cores // jobs, at least 1; 0: the environment's)."""
    runs_dir = Path(runs_dir)
    result = SweepResult()
    total = len(runs)
    started = 0
    devices = list(devices or [])
    if jobs > 1:
        todo = []
    for i, run in enumerate(runs, 1):
        run_dir = runs_dir / run.name
        tag = f"[{i}/{total}] {run.name}"
        if refused_for_settings(run, run_dir, extra, tag, result, log):
            continue
        if is_finished(run_dir):
            result.skipped.append(run.name)
            log(f"{tag}: finished, skipped")
            continue
        if max_runs is not None and started >= max_runs:
            result.not_started.append(run.name)
            continue
        started += 1
        device_extra = {"train.device": devices[(started - 1) % jobs % len(devices)]} if devices else {}
        train_cmd, predict_cmd = commands(run, runs_dir, {**(extra or {}), **device_extra}, python)
        need_train = not train_finished(run_dir)
        if dry_run:
            result.planned.append(run.name)
            log(f"{tag}:")
            if need_train:
                log("  " + shlex.join(map(str, train_cmd)))
            log("  " + shlex.join(map(str, predict_cmd)))
            continue
        if jobs > 1:
            todo.append((tag, run))
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        write_settings(run_dir, run.config, run_settings(run, extra))
        log_path = run_dir / "sweep.log"
        t0 = time.time()

        def say(step):
            if step == "train":
                log(f"{tag}: training" + (" (resuming)" if (run_dir / "last.pt").exists() else ""))
            else:
                log(f"{tag}: evaluating the test split")

        reason = _run_steps(run_dir, train_cmd, predict_cmd, need_train, runner, cwd, log_path, say=say)
        if reason is None:
            result.done.append(run.name)
            log(f"{tag}: done in {time.time() - t0:.0f} s")
        else:
            result.failed.append((run.name, reason, log_path))
            log(f"{tag}: FAILED: {reason}; log: {log_path}")
            tail = _tail(log_path)
            if tail:
                log(tail)
    if jobs > 1 and not dry_run:
        if threads is None:
            threads = max(1, available_cores() // jobs)
        unstarted = _run_parallel(todo, runs_dir, result, extra=extra, jobs=jobs, devices=devices,
                                  env=thread_env(threads), runner=runner, python=python, cwd=cwd, log=log)
        order = {run.name: k for k, run in enumerate(runs)}
        for part in (result.done, result.failed, result.interrupted):
            part.sort(key=lambda item: order[item if isinstance(item, str) else item[0]])
        failed = {name: (reason, log_path) for name, reason, log_path in result.failed}
        for run in runs:
            if run.name in result.skipped:
                text = "finished before, skipped"
            elif run.name in result.not_started:
                text = "not started (--max-runs)"
            elif run.name in failed:
                reason, log_path = failed[run.name]
                text = f"FAILED: {reason}" + (f" (log: {log_path})" if log_path else "")
            elif run.name in unstarted:
                text = f"not started ({result.stopped_by})"
            elif run.name in result.interrupted:
                text = f"stopped by {result.stopped_by}: run the same command again to resume it"
            else:
                text = "done"
            result.outcomes.append((run.name, text))
    return result


class _Terminated(KeyboardInterrupt):
    """SIGTERM to a sweep running several runs at once: stop them like Ctrl-C (exit status 143)."""


def _raise_terminated(signum, frame):
    raise _Terminated()


def _run_parallel(todo: list, runs_dir: Path, result: SweepResult, *, extra, jobs: int, devices: list, env: dict,
                  runner: Runner, python: str, cwd: Path, log) -> list:
    """Run `todo` ([(tag, run)], checked and in grid order) on `jobs` job slots, each taking the next run when
    its previous one ends; slot k passes --train.device devices[k % len(devices)]. The console gets one line
    per run start, end and failure. Ctrl-C (or SIGTERM) starts no new run and stops the running ones with
    the same signal (each resumes from its last.pt later); a second Ctrl-C kills them. Returns the names of
    the runs that an interrupt left unstarted (they are in result.interrupted too)."""
    queue = list(todo)
    left: list = []
    lock = threading.Lock()
    stop = threading.Event()
    _CHILDREN.stopping = False

    def say(text):
        with lock:
            log(text)

    def worker(slot: int):
        device = devices[slot % len(devices)] if devices else None
        while True:
            with lock:
                if stop.is_set() or not queue:
                    return
                tag, run = queue.pop(0)
            run_dir = runs_dir / run.name
            log_path = run_dir / "sweep.log"
            device_extra = {"train.device": device} if device else {}
            train_cmd, predict_cmd = commands(run, runs_dir, {**(extra or {}), **device_extra}, python)
            need_train = not train_finished(run_dir)
            t0 = time.time()
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
                write_settings(run_dir, run.config, run_settings(run, extra))
                what = ("training" + (", resuming" if (run_dir / "last.pt").exists() else "")) if need_train \
                    else "evaluating the test split"
                say(f"{tag}: started ({what}" + (f", {device}" if device else "") + ")")
                reason = _run_steps(run_dir, train_cmd, predict_cmd, need_train, runner, cwd, log_path, env=env)
            except Exception as err:  # noqa: BLE001 - one run's problem (a full disk, ...) must not stop the others
                reason = f"the sweep could not run it: {err}"
            with lock:
                if reason is None:
                    result.done.append(run.name)
                    log(f"{tag}: done in {time.time() - t0:.0f} s")
                elif stop.is_set():
                    result.interrupted.append(run.name)
                    log(f"{tag}: stopped ({reason})")
                else:
                    result.failed.append((run.name, reason, log_path))
                    log(f"{tag}: FAILED: {reason}; log: {log_path}")

    finished: set = set()

    def slot_main(slot: int):
        try:
            worker(slot)
        finally:
            finished.add(slot)

    def wait():
        # Not Thread.join: on Python 3.11 a join that Ctrl-C interrupts can mark the joined thread as ended
        # while it still runs. A worker counts once it has an ident (it runs) until it says it finished.
        while any(w.ident is not None and slot not in finished for slot, w in enumerate(workers)):
            time.sleep(0.05)

    workers = [threading.Thread(target=slot_main, args=(slot,), name=f"sweep-job-{slot}", daemon=True)
               for slot in range(min(jobs, len(queue)))]
    in_main = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _raise_terminated) if in_main else None
    try:
        try:
            for w in workers:
                w.start()
            wait()
        except KeyboardInterrupt as err:
            sig, result.stopped_by = (signal.SIGTERM, "SIGTERM") if isinstance(err, _Terminated) else \
                (signal.SIGINT, "Ctrl-C")
            with lock:
                stop.set()
                left = [run.name for _, run in queue]
                queue.clear()
            n = _CHILDREN.stop(sig)
            say(f"\ninterrupted ({result.stopped_by}): stopping {n} running process(es); each run resumes from its "
                f"last.pt when the same command is run again (Ctrl-C again kills them)")
            while True:
                try:
                    wait()
                    break
                except KeyboardInterrupt:
                    _CHILDREN.stop(signal.SIGKILL)
                    say("killing the running processes (their last finished epoch stays resumable)")
            result.interrupted.extend(left)
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, old_term)
    return left


def summary_text(result: SweepResult, dry_run: bool = False) -> str:
    lines = []
    if dry_run:
        lines.append(f"dry run: {len(result.planned)} run(s) to run, {len(result.skipped)} finished, "
                     f"{len(result.not_started)} beyond --max-runs")
    elif result.outcomes:   # several runs at once: every run's outcome, in grid order
        lines.append(f"sweep: {len(result.done)} run(s) done now, {len(result.skipped)} finished before, "
                     f"{len(result.failed)} failed, {len(result.not_started)} not started (--max-runs)"
                     + (f", {len(result.interrupted)} stopped by {result.stopped_by}" if result.stopped_by else ""))
        for name, text in result.outcomes:
            lines.append(f"  {name}: {text}")
        for name, reason, log_path in result.failed:
            tail = _tail(log_path) if log_path else ""
            if tail:
                lines.append(f"  end of {name}'s log:\n{tail}")
        if result.stopped_by:
            lines.append(f"stopped by {result.stopped_by}: run the same command again to resume")
        return "\n".join(lines)
    else:
        lines.append(f"sweep: {len(result.done)} run(s) done now, {len(result.skipped)} finished before, "
                     f"{len(result.failed)} failed, {len(result.not_started)} not started (--max-runs)")
    for name, reason, log_path in result.failed:
        lines.append(f"  FAILED {name}: {reason}" + (f" (log: {log_path})" if log_path else ""))
    return "\n".join(lines)


def parse_devices(text: str) -> list[str]:
    """'cuda:0,cuda:1' -> ['cuda:0', 'cuda:1'] (the engine checks each name when a run starts)."""
    devices = [d.strip() for d in text.split(",")]
    if not all(re.fullmatch(r"[A-Za-z0-9_:]+", d) for d in devices):
        raise GridError(f"--devices {text!r}: write device names separated by commas, e.g. cuda:0,cuda:1")
    return devices


def main(argv=None, runner: Runner = subprocess_runner) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Grid format: see the docstring of tools/sweep.py.")
    parser.add_argument("grid", help="grid file, e.g. experiments/table8.json")
    parser.add_argument("--out", help="folder of the run directories (default: the grid's runs_dir or sweeps/<name>)")
    parser.add_argument("--only", action="append", metavar="SUBSTRING",
                        help="only runs whose name contains SUBSTRING (repeat: any of them)")
    parser.add_argument("--override", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="setting for every run, after the grid's (e.g. train.epochs=2, data.root=DIR)")
    parser.add_argument("--max-runs", type=int, metavar="N", help="start at most N unfinished runs")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="run up to N runs at once (default 1: one after the other)")
    parser.add_argument("--devices", metavar="DEV,DEV,...",
                        help="devices for the runs, round-robin over the job slots (--train.device of each run), "
                             "e.g. cuda:0,cuda:1; default: the config's train.device")
    parser.add_argument("--threads", type=int, metavar="T",
                        help="with --jobs N > 1: CPU threads of each run (OMP_NUM_THREADS, MKL_NUM_THREADS); "
                             "default: cores // N, at least 1; 0 leaves the environment's")
    parser.add_argument("--batch-seeds", action="store_true",
                        help="train the runs of a cell that differ only in the seed with one train.py "
                             "--train.seeds [...] (tools/seed_batches.py; lmttm and ttm), then predict each as usual")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--list", action="store_true", help="print the run names and their state, run nothing")
    parser.add_argument("--status", action="store_true",
                        help="each run's state read from the run directories (queued, running, finished, failed "
                             "with its log), for sweeps on a cluster; runs nothing")
    cluster_args = parser.add_argument_group("cluster (tools/cluster.py; needs submitit)")
    cluster_args.add_argument("--launcher", choices=LAUNCHERS, default="local",
                              help="local (default): run here; slurm: one SLURM job per unfinished run, as a job "
                                   "array; submitit-local: the same jobs on this machine through submitit")
    cluster_args.add_argument("--partition", help="SLURM partition")
    cluster_args.add_argument("--gpus-per-run", type=int, default=0, metavar="G", help="GPUs of each job (default 0)")
    cluster_args.add_argument("--cpus-per-run", type=int, default=4, metavar="C",
                              help="CPU cores of each job, also its OMP/MKL threads (default 4)")
    cluster_args.add_argument("--time", type=int, default=240, metavar="MIN",
                              help="time limit of each job in minutes (default 240); a job out of time is requeued "
                                   "and resumes from last.pt")
    cluster_args.add_argument("--mem", type=int, metavar="GB", help="memory of each job in GB (default: the partition's)")
    cluster_args.add_argument("--slurm-array-parallelism", type=int, default=256, metavar="N",
                              help="at most N jobs of the array run at once (default 256)")
    cluster_args.add_argument("--slurm-extra", action="append", default=[], metavar="KEY=VALUE",
                              help="any other sbatch option, e.g. account=proj42, qos=long, constraint=a100")
    cluster_args.add_argument("--max-requeues", type=int, default=3, metavar="N",
                              help="time-outs a job may be requeued after (pre-emptions do not count; default 3)")
    cluster_args.add_argument("--resubmit", action="store_true",
                              help="also submit runs whose job_state.json says queued or running (their job is gone)")
    args = parser.parse_args(argv)
    try:
        if args.jobs < 1:
            raise GridError(f"--jobs must be at least 1, got {args.jobs}")
        if args.threads is not None and args.threads < 0:
            raise GridError(f"--threads must be 0 or more, got {args.threads}")
        if args.max_runs is not None and args.max_runs < 0:
            raise GridError(f"--max-runs must be 0 or more, got {args.max_runs}")
        grid = load_grid(args.grid)
        runs = select(validate_grid(grid), args.only)
        extra = dict(parse_override(o) for o in args.override)
        devices = parse_devices(args.devices) if args.devices is not None else []
        if devices and "train.device" in extra:
            raise GridError("give the device either with --devices or with --override train.device, not both")
    except GridError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    runs_dir = runs_dir_of(grid, args.out)
    if args.status:
        from tools import cluster

        print("\n".join(cluster.status_lines(runs, runs_dir)))
        return 0
    if args.launcher != "local":
        return _launch_on_cluster(args, runs, runs_dir, extra, grid)
    if args.list:
        for run in runs:
            print(f"{run_state(runs_dir / run.name):9s} {run.name}")
        return 0
    print(f"grid {grid['name']}: {len(runs)} run(s) in {runs_dir}")
    if args.jobs > 1:
        threads = args.threads if args.threads is not None else max(1, available_cores() // args.jobs)
        print(f"up to {args.jobs} runs at once, " + (f"{threads} CPU thread(s) each" if threads else
                                                     "CPU threads as the environment says")
              + (f", devices {', '.join(devices)} round-robin over the job slots" if devices else ""))
    else:
        threads = None
    if len(devices) > args.jobs:
        print(f"note: only the first {args.jobs} of the {len(devices)} --devices are used (one per job slot; "
              f"raise --jobs to use them all)")
    try:
        if args.batch_seeds:  # one process per cell first; the sweep below then only predicts those runs
            from tools import seed_batches

            seed_batches.train_cells(runs, runs_dir, extra=extra, runner=runner, dry_run=args.dry_run)
        result = run_sweep(runs, runs_dir, extra=extra, max_runs=args.max_runs, dry_run=args.dry_run, runner=runner,
                           jobs=args.jobs, devices=devices, threads=threads)
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume", file=sys.stderr)
        return 130
    print(summary_text(result, args.dry_run))
    return result.exit_code


def _launch_on_cluster(args, runs, runs_dir: Path, extra: dict, grid: dict) -> int:
    """--launcher slurm / submitit-local (tools/cluster.py): submit; submitit-local also waits for its jobs."""
    from tools import cluster

    try:
        if args.batch_seeds:
            raise cluster.ClusterError("--batch-seeds runs with --launcher local only for now (a cluster job per "
                                       "cell is not written yet); drop --batch-seeds to submit one job per run")
        if args.jobs != 1 or args.devices or args.dry_run:
            raise cluster.ClusterError("--jobs, --devices and --dry-run belong to --launcher local; a cluster gives "
                                       "each run its own job (--gpus-per-run, --cpus-per-run)")
        slurm_extra = dict(cluster.parse_extra(o) for o in args.slurm_extra)
        for name, value in (("--cpus-per-run", args.cpus_per_run), ("--time", args.time),
                            ("--slurm-array-parallelism", args.slurm_array_parallelism)):
            if value < 1:
                raise cluster.ClusterError(f"{name} must be at least 1, got {value}")
        print(f"grid {grid['name']}: {len(runs)} run(s) in {runs_dir}, launcher {args.launcher}")
        result, jobs = cluster.submit(
            runs, runs_dir, extra=extra, launcher=args.launcher, max_runs=args.max_runs, resubmit=args.resubmit,
            partition=args.partition, gpus_per_run=args.gpus_per_run, cpus_per_run=args.cpus_per_run,
            time_min=args.time, mem_gb=args.mem, array_parallelism=args.slurm_array_parallelism, sbatch_extra=slurm_extra,
            max_requeues=args.max_requeues, job_name=f"lmttm-{grid['name']}")
    except (cluster.ClusterError, GridError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{len(jobs)} job(s) submitted, {len(result.skipped)} run(s) finished before, "
          f"{len(result.not_started)} left out, {len(result.failed)} failed")
    if args.launcher == "slurm":
        print(f"follow them with: python tools/sweep.py {args.grid} --status")
        return 1 if result.failed else 0
    failed = len(result.failed)
    for name, job in jobs:  # submitit-local: the jobs are children of this process; wait for them
        try:
            job.result()
            print(f"{name}: done")
        except Exception as err:  # noqa: BLE001 - a failed job is reported, the others go on
            failed += 1
            print(f"{name}: FAILED: {str(err).strip().splitlines()[-1] if str(err).strip() else err}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
