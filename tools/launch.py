"""What every launcher of a sweep shares (tools/launch_local.py here, tools/cluster.py on a cluster): which runs
to launch (`plan`), how one run is launched (`prepare`, then `run_steps` where it runs), the CPU threads of a
run, and the result a launcher reports (`SweepResult`).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from tools.grid import Run, run_settings
from tools.run_state import (LOG_FILE, clear_state, is_finished, live_trainer, run_status, train_finished,
                             write_settings, write_state)

Runner = Callable[..., int]  # runner(cmd, cwd, log_path[, env=...]) -> exit status


@dataclass
class SweepResult:
    skipped: list = field(default_factory=list)      # finished before this sweep
    done: list = field(default_factory=list)         # ran to the end now
    failed: list = field(default_factory=list)       # (name, reason, log path)
    not_started: list = field(default_factory=list)  # left for later by --max-runs (or queued as a cluster job)
    busy: list = field(default_factory=list)         # (name, who): a live train.py holds the run; left alone
    planned: list = field(default_factory=list)      # --dry-run: runs that would run
    stopped: list = field(default_factory=list)      # running when Ctrl-C / SIGTERM came; resumable
    unstarted: list = field(default_factory=list)    # not started because of Ctrl-C / SIGTERM
    outcomes: list = field(default_factory=list)     # (name, outcome line) for every run, in grid order
    stopped_by: Optional[str] = None                 # "Ctrl-C" or "SIGTERM" when the sweep was stopped
    one_by_one: bool = True                          # --jobs 1: the failures were shown as they came

    @property
    def interrupted(self) -> list:
        """The runs an interrupt stopped or left unstarted."""
        return self.stopped + self.unstarted

    @property
    def exit_code(self) -> int:
        if self.stopped_by:
            return 143 if self.stopped_by == "SIGTERM" else 130
        return 1 if self.failed or self.busy else 0


def plan(runs: list[Run], runs_dir: Path, result: SweepResult, *, extra: Optional[dict] = None,
         max_runs: Optional[int] = None, log=print, hold: Optional[Callable[[Path], Optional[str]]] = None) -> list:
    """The runs to launch now, [(tag, run)] in grid order, by `run_status`: a run made with other settings
    is a failure (left alone), a finished one is skipped, one a live train.py holds is busy (left alone),
    and beyond `max_runs` they are not started. `hold(run_dir)` (the cluster's: a job is queued) may keep a
    run back with a message. The other outcomes go into `result` as they are decided."""
    todo = []
    for i, run in enumerate(runs, 1):
        run_dir = Path(runs_dir) / run.name
        tag = f"[{i}/{len(runs)}] {run.name}"
        status = run_status(run, runs_dir, extra)
        if status.state == "mismatch":
            log(f"{tag}: FAILED: {status.detail}")
            result.failed.append((run.name, status.detail, None))
        elif status.state == "finished":
            result.skipped.append(run.name)
            log(f"{tag}: finished, skipped")
        elif status.trainer:
            busy_message(result, run.name, status.trainer, tag, log)
        elif hold is not None and (why := hold(run_dir)) is not None:
            log(f"{tag}: {why}")
            result.not_started.append(run.name)
        elif max_runs is not None and len(todo) >= max_runs:
            result.not_started.append(run.name)
        else:
            todo.append((tag, run))
    return todo


def busy_message(result: SweepResult, name: str, who: str, tag: str, log) -> None:
    result.busy.append((name, who))
    log(f"{tag}: not started: it is being trained right now ({who}); run the same command again when that "
        f"process has ended (or stop it)")


def prepare(run: Run, run_dir: Path, extra: Optional[dict]) -> None:
    """Before a run is launched: its directory and the record of the settings it is launched with."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_settings(run_dir, run.config, run_settings(run, extra))


def run_steps(run_dir: Path, train_cmd: list, predict_cmd: list, runner: Runner, cwd: Path, *,
              env: Optional[dict] = None, say=lambda step: None, job: bool = False,
              stopping=lambda: False) -> Optional[str]:
    """Launch one run where it runs: train.py (unless training finished), then predict.py, output appended
    to its sweep.log; None when it finished, else why it did not. The launcher's record (job_state.json)
    says "failed" with the reason after a failure; a cluster job (`job`) also records "running" and "done",
    a local launch clears an earlier record; a run stopped on purpose (`stopping()`, Ctrl-C) is no failure
    there. Raises `Busy` when a live train.py holds the run: its log is left alone."""
    run_dir = Path(run_dir)
    log_path = run_dir / LOG_FILE
    who = live_trainer(run_dir)
    if who is not None:
        raise Busy(who)
    if job:
        write_state(run_dir, "running", node=socket.gethostname(), pid=os.getpid())
    else:
        clear_state(run_dir)
    reason = _steps(run_dir, train_cmd, predict_cmd, runner, cwd, log_path, env, say)
    if reason is not None and not stopping():
        write_state(run_dir, "failed", reason=reason, log=str(log_path))
    elif job:
        write_state(run_dir, "done")
    return reason


class Busy(RuntimeError):
    """A live train.py holds the run directory (a rerun never mixes its output into that run's log)."""


def _steps(run_dir, train_cmd, predict_cmd, runner, cwd, log_path, env, say) -> Optional[str]:
    def call(cmd):
        return runner(cmd, cwd, log_path) if env is None else runner(cmd, cwd, log_path, env=env)

    if not train_finished(run_dir):
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


def available_cores() -> int:
    """CPU cores this process may use (its affinity mask where the system has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def threads_per_run(runs_at_once: int) -> int:
    """The default CPU threads of a run: the cores available here shared by the runs at once, at least 1."""
    return max(1, available_cores() // max(1, runs_at_once))


def thread_env(threads: int) -> dict:
    """The environment of a run's processes with `threads` CPU threads (torch reads OMP_NUM_THREADS when it
    starts; MKL_NUM_THREADS for the BLAS); 0 leaves the environment as it is."""
    env = dict(os.environ)
    if threads > 0:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env
