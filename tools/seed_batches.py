"""`tools/sweep.py --batch-seeds`: the runs of a cell that differ only in their seed, trained by one train.py
with `--train.seeds [s1, s2, ...]` (engine/ensemble.py) instead of one process per seed.

The members of `--train.seeds` land in `<output.name>-seed<s>`, which is the sweep's own run name
(`<cell>-seed<s>`), and each holds what `--train.seed s` alone would, so everything after the training (the
predict step, the skip and resume rules, tools/aggregate.py) is the sweep's usual per-run handling:
`train_cells` only trains, before the sweep runs; the sweep then finds those runs trained and only predicts.
A member that did not finish (e.g. its loss became non-finite) is trained again by the sweep as a single run.
On a cluster (tools/cluster.py, `CellJob`) the same groups and command run as one job per cell.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

from tools.grid import REPO_ROOT, run_settings
from tools.run_state import LOG_FILE, commands, run_mismatches, train_finished, write_settings


def seed_groups(runs: list) -> list[list]:
    """The runs grouped by everything but the seed (the cell, its config file and settings), in grid order.
    A group of one run (or a run whose name is not `<cell>-seed<s>`) is left to the sweep as it is."""
    groups: dict[str, list] = {}
    for run in runs:
        settings = {k: v for k, v in run.settings.items() if k != "train.seed"}
        key = json.dumps([run.cell, run.config, settings], sort_keys=True, default=str)
        groups.setdefault(key, []).append(run)
    return [group for group in groups.values()
            if len(group) > 1 and all(run.name == f"{run.cell}-seed{run.seed}" for run in group)]


def cell_train_command(group: list, runs_dir: Path, extra: dict | None, python: str = sys.executable) -> list[str]:
    """One train.py command for the runs of `group`: the first run's command with `--train.seeds [...]` for
    its `--train.seed` and the cell as `--output.name` (the members become `<cell>-seed<s>`)."""
    first = group[0]
    cmd, _ = commands(first, runs_dir, extra, python)
    out = []
    i = 0
    while i < len(cmd):
        if cmd[i] == "--train.seed":
            out += ["--train.seeds", json.dumps([run.seed for run in group])]
            i += 2
        elif cmd[i] == "--output.name":
            out += ["--output.name", first.cell]
            i += 2
        else:
            out.append(cmd[i])
            i += 1
    return out


def train_cells(runs: list, runs_dir: Path, *, extra: dict | None, runner, python: str = sys.executable,
                cwd: Path | None = None, dry_run: bool = False, log=print) -> None:
    """Train the unfinished runs of every seed group with one train.py each (output appended to each
    member's sweep.log); runs the sweep would refuse (other settings) or that are trained already are left
    out. Failures are not reported here: the sweep then trains those runs alone and reports them."""
    runs_dir = Path(runs_dir)
    for group in seed_groups(runs):
        todo = [run for run in group if not run_mismatches(runs_dir / run.name, run, extra)
                and not train_finished(runs_dir / run.name)]
        if len(todo) < 2:
            continue
        cmd = cell_train_command(todo, runs_dir, extra, python)
        if dry_run:
            log(f"{todo[0].cell}: seeds {[run.seed for run in todo]} in one process:\n  {shlex.join(map(str, cmd))}")
            continue
        for run in todo:
            (runs_dir / run.name).mkdir(parents=True, exist_ok=True)
            write_settings(runs_dir / run.name, run.config, run_settings(run, extra))
        log_path = runs_dir / todo[0].name / LOG_FILE
        log(f"{todo[0].cell}: training seeds {', '.join(str(run.seed) for run in todo)} in one process "
            f"(log: {log_path})")
        t0 = time.time()
        rc = runner(cmd, cwd or REPO_ROOT, log_path)
        log(f"{todo[0].cell}: train.py --train.seeds exited with status {rc} after {time.time() - t0:.0f} s")
