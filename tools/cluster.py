"""A grid's runs as cluster jobs, through submitit (SLURM, or its local executor on a machine without SLURM).

    python tools/sweep.py experiments/table2.json --launcher slurm --partition gpu --gpus-per-run 1 \\
        --cpus-per-run 8 --time 240 --mem 32 --slurm-array-parallelism 20
    python tools/sweep.py experiments/table2.json --status        # from any login node, while it runs
    python tools/sweep.py experiments/table2.json --launcher submitit-local --max-runs 2   # no SLURM: local jobs

Every unfinished run of the grid (the same selection, skip and resume rules as a local sweep) becomes one job;
with `slurm` they go out as one job array (`--slurm-array-parallelism` of them at a time). A job runs the run's
two engine steps exactly as `tools/sweep.py` does locally (train.py, then predict.py on the test split, the same
command lines, output appended to the run's `sweep.log`), with OMP/MKL threads = `--cpus-per-run`.

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
from tools import sweep  # noqa: E402

JOB_FILE = "job.json"  # the submission: launcher, job id, submitit's log files (written by the submitter)
STATE_FILE = "job_state.json"  # queued / running / requeued / done / failed (written by the job)


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


def write_state(run_dir: Path, state: str, **fields) -> None:
    """job_state.json: written by the submitter before the job exists ("queued") and by the job alone after."""
    atomic_write_json({"state": state, "updated": time.strftime("%Y-%m-%d %H:%M:%S"), **fields},
                      Path(run_dir) / STATE_FILE)


def read_state(run_dir: Path) -> dict:
    """The job's state (job_state.json) with the submission record (job.json: job id, log files); a missing or
    unreadable file counts as empty."""
    records = [sweep._read_json(Path(run_dir) / name) for name in (JOB_FILE, STATE_FILE)]
    return {key: value for record in records if isinstance(record, dict) for key, value in record.items()}


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
            self._proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
            try:  # polled, not wait(): a blocking wait holds the lock checkpoint()'s wait needs in the signal handler
                while self._proc.poll() is None:
                    time.sleep(0.2)
                return self._proc.returncode
            finally:
                self._proc = None

    def __call__(self) -> str:
        run_dir = Path(self.run_dir)
        write_state(run_dir, "running", node=socket.gethostname(), pid=os.getpid())
        reason = sweep._run_steps(run_dir, self.train_cmd, self.predict_cmd, not sweep.train_finished(run_dir),
                                  self._runner, Path(self.cwd), run_dir / "sweep.log",
                                  env=sweep.thread_env(self.threads))
        if reason is not None:
            write_state(run_dir, "failed", reason=reason, log=str(run_dir / "sweep.log"))
            raise RuntimeError(f"{run_dir.name}: {reason}; log: {run_dir / 'sweep.log'}")
        write_state(run_dir, "done")
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
           cwd: Path = sweep.REPO_ROOT, log=print, executor=None, resubmit: bool = False, **resources):
    """Submit every unfinished run (sweep rules) as one job; returns (SweepResult, [(run name, job)]).
    A run whose job_state.json says queued, running or requeued is left alone unless `resubmit`."""
    runs_dir = Path(runs_dir)
    result = sweep.SweepResult()
    todo = []
    for i, run in enumerate(runs, 1):
        run_dir = runs_dir / run.name
        tag = f"[{i}/{len(runs)}] {run.name}"
        if sweep.refused_for_settings(run, run_dir, extra, tag, result, log):
            continue
        if sweep.is_finished(run_dir):
            result.skipped.append(run.name)
            continue
        record = read_state(run_dir)
        state = record.get("state")
        if state in ("queued", "running", "requeued") and not resubmit:
            log(f"{tag}: already {state} as job {record.get('job_id')}, not submitted again "
                f"(--resubmit if that job is gone)")
            result.not_started.append(run.name)
            continue
        if max_runs is not None and len(todo) >= max_runs:
            result.not_started.append(run.name)
            continue
        train_cmd, predict_cmd = sweep.commands(run, runs_dir, extra, python)
        todo.append((run, run_dir, RunJob(run_dir, train_cmd, predict_cmd, cwd, resources.get("cpus_per_run", 1))))
    if not todo:
        return result, []
    if executor is None:
        executor = make_executor(launcher, runs_dir / ".submitit" / "%j", **resources)
    # the job process unpickles RunJob from this repository: make it importable there
    os.environ["PYTHONPATH"] = os.pathsep.join([str(sweep.REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    for _, run_dir, _ in todo:
        run_dir.mkdir(parents=True, exist_ok=True)
    for run, run_dir, _ in todo:
        sweep.write_settings(run_dir, run.config, sweep.run_settings(run, extra))
        write_state(run_dir, "queued")  # before the job exists: from now on only the job writes its state
    with executor.batch():  # one job array on SLURM
        jobs = [executor.submit(job) for _, _, job in todo]
    submitted = []
    for (run, run_dir, _), job in zip(todo, jobs):
        paths = job.paths
        atomic_write_json({"job_id": str(job.job_id), "launcher": launcher,
                           "submitted": time.strftime("%Y-%m-%d %H:%M:%S"), "stdout": str(paths.stdout),
                           "stderr": str(paths.stderr)}, run_dir / JOB_FILE)
        _link(run_dir / "job.out", paths.stdout)
        _link(run_dir / "job.err", paths.stderr)
        log(f"{run.name}: submitted as job {job.job_id}")
        submitted.append((run.name, job))
    return result, submitted


def status_lines(runs, runs_dir: Path) -> list[str]:
    """One line per run: finished, failed (with its log), running, queued, requeued, trained, started or new."""
    lines = []
    for run in runs:
        run_dir = Path(runs_dir) / run.name
        record = read_state(run_dir)
        state = record.get("state")
        job = f" (job {record['job_id']})" if record.get("job_id") else ""
        on_disk = sweep.run_state(run_dir)
        if on_disk == "finished":
            text = "finished"
        elif state == "failed":
            text = f"failed{job}: {record.get('reason', '?')}; log: {record.get('log', run_dir / 'sweep.log')}"
        elif state == "running":
            text = f"running{job} on {record.get('node', '?')} since {record.get('updated', '?')}"
        elif state in ("queued", "requeued"):
            text = f"{state}{job}"
        elif on_disk == "trained":
            text = "trained, not evaluated"
        else:
            text = on_disk  # started or new
        if state == "running" or (text == "started" and (run_dir / "last.pt").exists()):
            try:
                import torch

                # memory-mapped: the epoch number without reading the weights and optimizer state
                epoch = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True, mmap=True)["epoch"]
                text += f", epoch {epoch} done"
            except Exception:  # noqa: BLE001 - a status line never fails on an unreadable checkpoint
                pass
        lines.append(f"{run.name}: {text}")
    return lines
