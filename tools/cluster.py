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
from tools.launch import SweepResult, plan, prepare, run_steps, thread_env  # noqa: E402
from tools.launch_local import parent_death_signal  # noqa: E402
from tools.run_state import JOB_FILE, LOG_FILE, STATE_FILE, commands, read_state, write_state  # noqa: E402,F401


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
        write_state(Path(self.run_dir), "requeued")
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(type(self)(self.run_dir, self.train_cmd, self.predict_cmd, self.cwd, self.threads))


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
           cwd: Path = REPO_ROOT, log=print, executor=None, resubmit: bool = False, **resources):
    """Submit every unfinished run (the local sweep's `plan`) as one job; returns (SweepResult, [(run name, job)]).
    A run whose job_state.json says queued, running or requeued is left alone unless `resubmit`. Without
    `cpus_per_run`, a job gets `default_cpus(launcher, number of jobs)` cores."""
    runs_dir = Path(runs_dir)
    result = SweepResult()
    todo = plan(runs, runs_dir, result, extra=extra, max_runs=max_runs, log=log,
                hold=None if resubmit else _held_by_a_job)
    if not todo:
        return result, []
    if resources.get("cpus_per_run") is None:
        resources["cpus_per_run"] = default_cpus(launcher, len(todo))
    jobs = []
    for _, run in todo:
        train_cmd, predict_cmd = commands(run, runs_dir, extra, python)
        jobs.append(RunJob(runs_dir / run.name, train_cmd, predict_cmd, cwd, resources["cpus_per_run"]))
    if executor is None:
        executor = make_executor(launcher, runs_dir / ".submitit" / "%j", **resources)
    # the job process unpickles RunJob from this repository: make it importable there
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    for _, run in todo:
        prepare(run, runs_dir / run.name, extra)
        write_state(runs_dir / run.name, "queued")  # before the job exists: from now on only the job writes its state
    with executor.batch():  # one job array on SLURM
        submitted_jobs = [executor.submit(job) for job in jobs]
    submitted = []
    for (_, run), job in zip(todo, submitted_jobs):
        run_dir, paths = runs_dir / run.name, job.paths
        atomic_write_json({"job_id": str(job.job_id), "launcher": launcher,
                           "submitted": time.strftime("%Y-%m-%d %H:%M:%S"), "stdout": str(paths.stdout),
                           "stderr": str(paths.stderr)}, run_dir / JOB_FILE)
        _link(run_dir / "job.out", paths.stdout)
        _link(run_dir / "job.err", paths.stderr)
        log(f"{run.name}: submitted as job {job.job_id}")
        submitted.append((run.name, job))
    return result, submitted


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
