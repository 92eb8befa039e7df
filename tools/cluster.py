"""A grid's runs as cluster jobs, through submitit (SLURM, or its local executor on a machine without SLURM).

    python tools/sweep.py experiments/table2.json --launcher slurm --partition gpu --gpus-per-run 1 \\
        --cpus-per-run 8 --time 240 --mem 32 --slurm-array-parallelism 20
    python tools/sweep.py experiments/table2.json --status        # from any login node, while it runs
    python tools/sweep.py experiments/table2.json --launcher submitit-local --max-runs 2   # no SLURM: local jobs

Every unfinished run of the grid (the same selection, skip and resume rules as a local sweep) becomes one job;
with `slurm` they go out as one job array (`--slurm-array-parallelism` of them at a time). A job runs the run's
two engine steps exactly as `tools/sweep.py` does locally (train.py, then predict.py on the test split, the same
command lines, output appended to the run's `sweep.log`, through the same `launch.plan` and `launch.run_steps`),
with OMP/MKL threads = `--cpus-per-run` (default: 4 on SLURM; with submitit-local, whose jobs all run at once on
this machine, its cores // the number of jobs, at least 1).

Pre-emption and time limits: submitit asks SLURM to signal the job (USR2) shortly before it is stopped. The job
then stops its train.py with SIGTERM (which abandons the epoch in progress; `last.pt` holds the last finished
one), and requeues itself (submitit's checkpointing: `RunJob.checkpoint` returns the same job again); the
requeued job starts train.py again, which resumes from `last.pt`. So a long table finishes however often the
cluster interrupts it (up to `--max-requeues` time-outs per job; pre-emptions do not count). Calling the same
sweep again submits the runs that are neither finished nor queued/running by job_state.json; a job that was killed
outright (scancel, node failure) still says queued or running there: add `--resubmit` to submit it again (it
resumes the same way).

With `--batch-seeds`, the runs of a cell that differ only in their seed and have at least two seeds left to train
are one job (`CellJob`): the cell's one `train.py --train.seeds [...]` (tools/seed_batches.py), then each member's
predict.py as above; pre-empted, it is requeued the same way and train.py resumes every member. A member that
process did not finish is trained alone in the same job. Each member's job.json and job_state.json name the
cell's job, so `--status` shows the members as usual.

Files in each run directory, next to `sweep.log`:
- `job.json`: the submission (launcher, job id, submitit's log files);
- `job_state.json`: the job's state: "queued" (written just before submission), then written by the job itself
  when it starts on its node ("running", with the node's name), when it is requeued ("requeued") and at its end
  ("done", or "failed" with the reason). `--status` reads these with the run's own files, from any machine
  that sees the run directories;
- `job.out`, `job.err`: links to submitit's stdout/stderr files of the job (in `<runs dir>/.submitit/`).

submitit is optional: local sweeps never import it.
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.rundir import atomic_write_json  # noqa: E402
from tools import launch  # noqa: E402  (launch.available_cores is looked up at call time: tests patch it)
from tools.grid import REPO_ROOT  # noqa: E402
from tools.launch import Busy, SweepResult, plan, prepare, run_steps, thread_env  # noqa: E402
from tools.launch_local import parent_death_signal  # noqa: E402
from tools.seed_batches import cell_train_command, seed_groups  # noqa: E402
from tools.run_state import (JOB_FILE, LOG_FILE, STATE_FILE, commands, live_trainer, read_state,  # noqa: E402,F401
                             train_finished, write_state)


class ClusterError(RuntimeError):
    """The cluster launcher cannot run here (submitit missing, no sbatch, bad option): one line for the user."""


def import_submitit():
    try:
        import submitit
    except ImportError:
        raise ClusterError("--launcher slurm/submitit-local needs the submitit package, which is not installed: "
                           "pip install submitit (local sweeps do not need it)") from None
    return submitit


def parse_extra(text: str) -> tuple[str, str]:
    """'account=proj42' -> ('account', 'proj42'): an sbatch option (long name, with _ or -) and its value."""
    key, eq, value = text.partition("=")
    key = key.strip().lstrip("-").replace("-", "_")
    if not eq or not key or not key.replace("_", "").isalnum():
        raise ClusterError(f"--slurm-extra {text!r}: write an sbatch option as key=value, e.g. account=proj42")
    return key, value.strip()


class RunJob:
    """One run of a grid as a submitit job: train.py (resuming from last.pt) then predict.py.

    Picklable (submitit sends it to the node); the running train.py/predict.py process is not part of the
    pickle. `checkpoint()` is submitit's hook for pre-emption and time-outs: it stops the running step with
    SIGTERM and returns the job itself for requeueing."""

    def __init__(self, run_dir, train_cmd, predict_cmd, cwd, threads: int = 0):
        self.run_dir = str(run_dir)
        self.train_cmd, self.predict_cmd = list(map(str, train_cmd)), list(map(str, predict_cmd))
        self.cwd, self.threads = str(cwd), threads
        self._proc = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_proc"] = None
        return state

    def _runner(self, cmd, cwd, log_path, env=None) -> int:
        with open(log_path, "a") as log:
            log.write(f"\n$ {' '.join(cmd)}   # job on {socket.gethostname()}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            log.flush()
            self._proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                          preexec_fn=parent_death_signal())
            try:  # polled, not wait(): a blocking wait holds the lock checkpoint()'s wait needs in the signal handler
                while self._proc.poll() is None:
                    time.sleep(0.2)
                return self._proc.returncode
            finally:
                self._proc = None

    def __call__(self) -> str:
        run_dir = Path(self.run_dir)
        reason = run_steps(run_dir, self.train_cmd, self.predict_cmd, self._runner, Path(self.cwd),
                           env=thread_env(self.threads), job=True)
        if reason is not None:
            raise RuntimeError(f"{run_dir.name}: {reason}; log: {run_dir / LOG_FILE}")
        return "done"

    def checkpoint(self, *args, **kwargs):
        """Pre-empted or out of time: stop the running step cleanly (train.py keeps last.pt) and requeue."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        for run_dir in self.run_dirs():
            write_state(Path(run_dir), "requeued")
        from submitit.helpers import DelayedSubmission

        clone = copy.copy(self)
        clone._proc = None
        return DelayedSubmission(clone)

    def run_dirs(self) -> list[str]:
        return [self.run_dir]


class CellJob(RunJob):
    """The runs of a seed cell (`--batch-seeds`) as one submitit job: the cell's one
    `train.py --train.seeds [...]` (tools/seed_batches.py; output in the first member's sweep.log), then each
    member's usual steps (`run_steps`: predict.py, or train.py alone first for a member the cell's process did
    not finish). Pre-empted, it requeues like a RunJob and train.py resumes every member from its last.pt."""

    def __init__(self, run_dirs, cell_cmd, train_cmds, predict_cmds, cwd, threads: int = 0):
        super().__init__(run_dirs[0], train_cmds[0], predict_cmds[0], cwd, threads)
        self.members = [str(d) for d in run_dirs]
        self.cell_cmd = list(map(str, cell_cmd))
        self.train_cmds = [list(map(str, c)) for c in train_cmds]
        self.predict_cmds = [list(map(str, c)) for c in predict_cmds]

    def run_dirs(self) -> list[str]:
        return self.members

    def __call__(self) -> str:
        dirs, env = [Path(d) for d in self.members], thread_env(self.threads)
        for run_dir in dirs:
            write_state(run_dir, "running", node=socket.gethostname(), pid=os.getpid())
        untrained = [d for d in dirs if not train_finished(d)]
        if len(untrained) >= 2 and not any(live_trainer(d) for d in dirs):  # a failure: trained alone below
            self._runner(self.cell_cmd, Path(self.cwd), untrained[0] / LOG_FILE, env=env)
        failures = []
        for run_dir, train_cmd, predict_cmd in zip(dirs, self.train_cmds, self.predict_cmds):
            try:
                reason = run_steps(run_dir, train_cmd, predict_cmd, self._runner, Path(self.cwd), env=env, job=True)
            except Busy as err:
                reason = f"a live train.py holds it ({err})"
                write_state(run_dir, "failed", reason=reason)
            if reason is not None:
                failures.append(f"{run_dir.name}: {reason}; log: {run_dir / LOG_FILE}")
        if failures:
            raise RuntimeError("\n".join(failures))
        return "done"


def make_executor(launcher: str, folder: Path, *, partition=None, gpus_per_run=0, cpus_per_run=1, time_min=60,
                  mem_gb=None, array_parallelism=256, sbatch_extra=None, max_requeues=3, job_name="lmttm"):
    """The submitit executor of `launcher` with the run resources set (sbatch options for `slurm`)."""
    submitit = import_submitit()
    if launcher == "slurm":
        if shutil.which("sbatch") is None:
            raise ClusterError("--launcher slurm needs SLURM's sbatch, which is not on this machine's PATH: run the "
                               "sweep on the cluster's login node (or --launcher submitit-local to try it here)")
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=max_requeues)
        params = {"job_name": job_name, "time": time_min, "cpus_per_task": cpus_per_run,
                  "array_parallelism": array_parallelism, "additional_parameters": dict(sbatch_extra or {})}
        if partition:
            params["partition"] = partition
        if gpus_per_run:
            params["gpus_per_node"] = gpus_per_run
        if mem_gb:
            params["mem"] = f"{mem_gb}GB"
        executor.update_parameters(**params)
        return executor
    executor = submitit.LocalExecutor(folder=folder, max_num_timeout=max_requeues)
    executor.update_parameters(timeout_min=time_min, cpus_per_task=cpus_per_run,
                               **({"gpus_per_node": gpus_per_run} if gpus_per_run else {}))
    return executor


def _link(link: Path, target: Path) -> None:
    try:
        link.unlink(missing_ok=True)
        link.symlink_to(target)
    except OSError:
        pass  # a file system without links: job.json names the files too


def submit(runs, runs_dir: Path, *, extra=None, launcher="slurm", max_runs=None, python=sys.executable,
           cwd: Path = REPO_ROOT, log=print, executor=None, resubmit: bool = False, batch_seeds: bool = False,
           **resources):
    """Submit every unfinished run (the local sweep's `plan`) as one job, or with `batch_seeds` the runs of a
    seed cell with at least two seeds left to train as one `CellJob`; returns (SweepResult, [(names, job)]).
    A run whose job_state.json says queued, running or requeued is left alone unless `resubmit`. Without
    `cpus_per_run`, a job gets `default_cpus(launcher, number of jobs)` cores."""
    runs_dir = Path(runs_dir)
    result = SweepResult()
    todo = [run for _, run in plan(runs, runs_dir, result, extra=extra, max_runs=max_runs, log=log,
                                   hold=None if resubmit else _held_by_a_job)]
    if not todo:
        return result, []
    units = job_units(todo, runs_dir) if batch_seeds else [[run] for run in todo]
    if resources.get("cpus_per_run") is None:
        resources["cpus_per_run"] = default_cpus(launcher, len(units))
    jobs = []
    for unit in units:
        cmds = [commands(run, runs_dir, extra, python) for run in unit]
        if len(unit) == 1:
            jobs.append(RunJob(runs_dir / unit[0].name, *cmds[0], cwd, resources["cpus_per_run"]))
        else:
            untrained = [run for run in unit if not train_finished(runs_dir / run.name)]
            cell_cmd = cell_train_command(untrained, runs_dir, extra, python)
            jobs.append(CellJob([runs_dir / run.name for run in unit], cell_cmd, [c[0] for c in cmds],
                                [c[1] for c in cmds], cwd, resources["cpus_per_run"]))
    if executor is None:
        executor = make_executor(launcher, runs_dir / ".submitit" / "%j", **resources)
    # the job process unpickles RunJob from this repository: make it importable there
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    for run in todo:
        prepare(run, runs_dir / run.name, extra)
        write_state(runs_dir / run.name, "queued")  # before the job exists: from now on only the job writes its state
    with executor.batch():  # one job array on SLURM
        submitted_jobs = [executor.submit(job) for job in jobs]
    submitted = []
    for unit, job in zip(units, submitted_jobs):
        paths = job.paths
        for run in unit:  # every member of a cell points at the cell's job
            run_dir = runs_dir / run.name
            atomic_write_json({"job_id": str(job.job_id), "launcher": launcher,
                               "submitted": time.strftime("%Y-%m-%d %H:%M:%S"), "stdout": str(paths.stdout),
                               "stderr": str(paths.stderr)}, run_dir / JOB_FILE)
            _link(run_dir / "job.out", paths.stdout)
            _link(run_dir / "job.err", paths.stderr)
        names = ", ".join(run.name for run in unit)
        log(f"{names}: submitted as job {job.job_id}" + (" (the seeds in one process)" if len(unit) > 1 else ""))
        submitted.append((names, job))
    return result, submitted


def job_units(todo: list, runs_dir: Path) -> list[list]:
    """`todo` as the runs of one job each, in grid order: the runs of a seed cell (`seed_groups`) with at least
    two seeds left to train together, every other run alone."""
    cell_of = {}
    for group in seed_groups(todo):
        if sum(not train_finished(Path(runs_dir) / run.name) for run in group) >= 2:
            for run in group:
                cell_of[run.name] = group
    units, seen = [], set()
    for run in todo:
        unit = cell_of.get(run.name, [run])
        if unit[0].name not in seen:
            seen.add(unit[0].name)
            units.append(unit)
    return units


def _held_by_a_job(run_dir: Path):
    record = read_state(run_dir)
    state = record.get("state")
    if state in ("queued", "running", "requeued"):
        return (f"already {state} as job {record.get('job_id')}, not submitted again "
                f"(--resubmit if that job is gone)")
    return None


def default_cpus(launcher: str, n_jobs: int) -> int:
    """--cpus-per-run when not given: SLURM gives each job the cores it asks for (4); submitit-local runs
    every job at once on this machine, so they share its cores (cores // jobs, at least 1)."""
    if launcher == "slurm":
        return 4
    return max(1, launch.available_cores() // max(1, n_jobs))
