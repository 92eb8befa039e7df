"""What a run directory of a sweep says: finished, trained, started or new; the settings it was made with;
a live trainer holding it; the launcher's record of a failed or queued job; and the two commands of a run.

One definition of a run's state serves `--list`, `--status`, `--dry-run`, the local sweep and the cluster
launcher (`run_status`):

    mismatch  the directory was made with other settings (the sweep reports it as FAILED and leaves it alone)
    finished  train_summary.json says finished and eval/test/metrics.json exists: skipped
    running   a train.py holds the directory's lock right now (on this machine)
    failed    the launcher recorded a failure (job_state.json) and the run has not finished since
    queued, requeued   a cluster job is waiting for it (job_state.json)
    trained   training finished, the test split not evaluated: only predict.py runs
    started   the directory exists: train.py resumes it from last.pt
    new       no directory yet
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from engine.rundir import RunDirError, SharedRunLock, atomic_write_json
from tools.grid import NOT_COMPARED, Run, cli_value, path_arg, run_settings

SETTINGS_FILE = "sweep_settings.json"  # the config file and settings a sweep launched the run with
LOG_FILE = "sweep.log"                 # the output of the run's train.py and predict.py, appended
JOB_FILE = "job.json"                  # a cluster submission: launcher, job id, submitit's log files
STATE_FILE = "job_state.json"          # the launcher's record: queued / running / requeued / done / failed


def read_json(path: Path):
    """A JSON file's content, or None when it is missing, unreadable, not UTF-8 or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def train_finished(run_dir: Path) -> bool:
    summary = read_json(Path(run_dir) / "train_summary.json")
    return isinstance(summary, dict) and summary.get("finished") is True


def is_finished(run_dir: Path, split: str = "test") -> bool:
    """Training finished and the split was evaluated."""
    return train_finished(run_dir) and (Path(run_dir) / "eval" / split / "metrics.json").is_file()


def test_metrics(run_dir: Path) -> Optional[tuple[float, float]]:
    """(AUC, ACC) of the run's test evaluation, or None when it has none."""
    metrics = read_json(Path(run_dir) / "eval" / "test" / "metrics.json")
    if not isinstance(metrics, dict):
        return None
    auc, acc = metrics.get("auc"), metrics.get("acc")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (auc, acc)):
        return None
    return float(auc), float(acc)


def metrics_text(run_dir: Path) -> str:
    """'test AUC 0.812, ACC 0.750' of a finished run, or '' when it has no test metrics."""
    metrics = test_metrics(run_dir)
    return "" if metrics is None else f"test AUC {metrics[0]:.3f}, ACC {metrics[1]:.3f}"


# ----------------------------------------------------------------------------------------------------------
# settings of an existing run
# ----------------------------------------------------------------------------------------------------------

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
    config = read_json(Path(run_dir) / "config.json")
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


def write_settings(run_dir: Path, config: str, settings: dict):
    """Record what the sweep launched a run with (so a later --override, or its absence, is noticed)."""
    (Path(run_dir) / SETTINGS_FILE).write_text(json.dumps({"config": config, "settings": settings}, indent=1) + "\n")


def recorded_mismatches(run_dir: Path, config: str, settings: dict) -> list[str]:
    """Differences between the settings recorded by an earlier sweep of this run and the wanted ones, in
    both directions (a key only one side sets counts)."""
    recorded = read_json(Path(run_dir) / SETTINGS_FILE)
    if not isinstance(recorded, dict):
        return []
    out = []
    if recorded.get("config") != config:
        out.append(f"config file: run has {recorded.get('config')}, wanted {config}")
    old = recorded.get("settings") or {}
    config = read_json(Path(run_dir) / "config.json") or {}

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


def run_mismatches(run_dir: Path, run: Run, extra: Optional[dict] = None) -> list[str]:
    """Why an existing run directory does not hold this run (empty list: it does, or it is new)."""
    settings = run_settings(run, extra)
    out = recorded_mismatches(run_dir, run.config, settings)
    keys = {m.split(":")[0] for m in out}
    return out + [m for m in config_mismatches(run_dir, settings) if m.split(":")[0] not in keys]


def mismatch_reason(mismatches: list[str]) -> str:
    return ("existing run directory has other settings (" + "; ".join(mismatches) +
            "); delete it or sweep into another --out")


# ----------------------------------------------------------------------------------------------------------
# the launcher's record (job_state.json) and a live trainer
# ----------------------------------------------------------------------------------------------------------

def write_state(run_dir: Path, state: str, **fields) -> None:
    """job_state.json: a cluster job's state ("queued" by the submitter, then by the job alone), or a local
    sweep's record of a failed run."""
    atomic_write_json({"state": state, "updated": time.strftime("%Y-%m-%d %H:%M:%S"), **fields},
                      Path(run_dir) / STATE_FILE)


def read_state(run_dir: Path) -> dict:
    """The job's state (job_state.json) with the submission record (job.json: job id, log files); a missing or
    unreadable file counts as empty."""
    records = [read_json(Path(run_dir) / name) for name in (JOB_FILE, STATE_FILE)]
    return {key: value for record in records if isinstance(record, dict) for key, value in record.items()}


def clear_state(run_dir: Path) -> None:
    """Forget an earlier launcher record (a local sweep starting the run again)."""
    try:
        (Path(run_dir) / STATE_FILE).unlink(missing_ok=True)
    except OSError:
        pass


def live_trainer(run_dir: Path) -> Optional[str]:
    """'train.py, pid N' (or 'another process') when a training holds the run directory's lock right now,
    else None. The lock is seen from the machines that share the run directory's file system lock."""
    try:
        with SharedRunLock(run_dir):
            return None
    except RunDirError as err:
        pid = re.search(r"\(pid (\d+)\)", str(err))
        return f"train.py, pid {pid.group(1)}" if pid else "another process"


# ----------------------------------------------------------------------------------------------------------
# the state of a run, and its commands
# ----------------------------------------------------------------------------------------------------------

@dataclass
class RunStatus:
    state: str                     # one of the states of the module docstring
    detail: str = ""               # why (mismatch, failed), the job, the metrics of a finished run
    trainer: Optional[str] = None  # 'train.py, pid N' when a live training holds the run's lock


def run_status(run: Run, runs_dir: Path, extra: Optional[dict] = None) -> RunStatus:
    """The one definition of a run's state (see the module docstring)."""
    run_dir = Path(runs_dir) / run.name
    if not run_dir.exists():
        return RunStatus("new")
    mismatches = run_mismatches(run_dir, run, extra)
    if mismatches:
        return RunStatus("mismatch", mismatch_reason(mismatches))
    if is_finished(run_dir):
        return RunStatus("finished", metrics_text(run_dir))
    record = read_state(run_dir)
    job = f" (job {record['job_id']})" if record.get("job_id") else ""
    state = record.get("state")
    trainer = live_trainer(run_dir)
    if state == "running":  # a cluster job says so (its node may not share our view of the lock)
        where = f"{job} on {record.get('node', '?')} since {record.get('updated', '?')}"
        return RunStatus("running", where, trainer)
    if trainer:
        return RunStatus("running", f" ({trainer})", trainer)
    if state == "failed":
        return RunStatus("failed", f"{job}: {record.get('reason', '?')}; log: {record.get('log', run_dir / LOG_FILE)}")
    if state in ("queued", "requeued"):
        return RunStatus(state, job)
    return RunStatus("trained" if train_finished(run_dir) else "started")


def status_line(run: Run, runs_dir: Path, extra: Optional[dict] = None) -> str:
    """`--status`: 'NAME: finished: test AUC 0.812, ACC 0.750', 'NAME: failed (job 12_3): REASON; log: PATH',
    'NAME: running (train.py, pid 4711), epoch 3 done', ..."""
    run_dir = Path(runs_dir) / run.name
    status = run_status(run, runs_dir, extra)
    if status.state in ("finished", "mismatch"):
        text = status.state + (f": {status.detail}" if status.detail else "")
    elif status.state == "trained":
        text = "trained, not evaluated"
    else:
        text = status.state + status.detail
    if status.state == "running" or (status.state == "started" and (run_dir / "last.pt").exists()):
        epoch = last_epoch(run_dir)
        if epoch is not None:
            text += f", epoch {epoch} done"
    return f"{run.name}: {text}"


def last_epoch(run_dir: Path) -> Optional[int]:
    """The epoch of the run's last.pt, read memory-mapped (without the weights); None when unreadable."""
    try:
        import torch

        return torch.load(Path(run_dir) / "last.pt", map_location="cpu", weights_only=True, mmap=True)["epoch"]
    except Exception:  # noqa: BLE001 - a status line never fails on an unreadable checkpoint
        return None


def commands(run: Run, runs_dir: Path, extra: Optional[dict] = None, python: str = sys.executable,
             split: str = "test") -> tuple[list[str], list[str]]:
    """The train and predict command lines of a run (to be run from the repository root)."""
    args = [path_arg(run.config_path)]
    for key, value in run_settings(run, extra).items():
        args += [f"--{key}", cli_value(value)]
    args += ["--output.dir", path_arg(runs_dir), "--output.name", run.name]
    return [python, "train.py", *args], [python, "predict.py", *args, "--split", split]
