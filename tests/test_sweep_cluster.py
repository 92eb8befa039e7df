"""tools/sweep.py --launcher slurm / submitit-local (tools/cluster.py): the same runs as a local sweep, a job
interrupted mid-training requeued and resumed to the same weights, --status, the sbatch parameters, and
--batch-seeds as one job per seed cell."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from engine.checkpoint import load_checkpoint
from engine.rundir import atomic_save
from submitit.core.job_environment import JobEnvironment
from tools import cluster, sweep

TINY = {"model.dim": 16, "model.memory_tokens": 16, "model.heads": 2, "output.plots": False}
JOB_FILES = {"job.json", "job_state.json", "job.out", "job.err"}


def grid_file(tmp_path, epochs, seeds=(0, 1)):
    grid = {"name": "tiny", "datasets": ["synthetic3d"], "config": "demo.json", "seeds": list(seeds),
            "overrides": {**TINY, "train.epochs": epochs}}
    path = tmp_path / f"grid{epochs}.json"
    path.write_text(json.dumps(grid))
    return path


def files_of(run_dir: Path) -> set:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file() or p.is_symlink()}


def test_submitit_local_sweep_writes_what_a_local_sweep_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    grid = grid_file(tmp_path, epochs=1)
    assert sweep.main([str(grid), "--out", str(tmp_path / "local")]) == 0
    assert sweep.main([str(grid), "--out", str(tmp_path / "jobs"), "--launcher", "submitit-local",
                       "--cpus-per-run", "1"]) == 0
    for seed in (0, 1):
        a, b = tmp_path / "local" / f"synthetic3d-seed{seed}", tmp_path / "jobs" / f"synthetic3d-seed{seed}"
        assert files_of(b) - JOB_FILES == files_of(a) and JOB_FILES <= files_of(b)
        assert cluster.read_state(b)["state"] == "done" and (b / "job.out").resolve().is_file()
        left, right = pd.read_csv(a / "metrics.csv"), pd.read_csv(b / "metrics.csv")
        pd.testing.assert_frame_equal(left.drop(columns="time_s"), right.drop(columns="time_s"))
        ma, mb = (json.loads((d / "eval" / "test" / "metrics.json").read_text()) for d in (a, b))
        assert (ma["auc"], ma["acc"]) == (mb["auc"], mb["acc"])
    # a second call submits nothing: every run is finished
    assert sweep.main([str(grid), "--out", str(tmp_path / "jobs"), "--launcher", "submitit-local"]) == 0


def test_an_interrupted_job_is_requeued_and_resumes_to_the_same_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    grid = grid_file(tmp_path, epochs=4, seeds=(0,))
    assert sweep.main([str(grid), "--out", str(tmp_path / "local")]) == 0
    runs = sweep.validate_grid(sweep.load_grid(grid))
    out = tmp_path / "jobs"
    _, jobs = cluster.submit(runs, out, launcher="submitit-local", cpus_per_run=1, time_min=10, log=lambda *a: None)
    (name, job), = jobs
    last = out / name / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline:  # wait for the first committed epoch, then pre-empt the job
        with contextlib.suppress(Exception):
            if load_checkpoint(last)["epoch"] >= 1:
                break
        time.sleep(0.05)
    # SLURM's pre-emption signal to the job's process (submitit's USR2; its local executor forwards only the
    # time-out one): RunJob.checkpoint stops train.py and the job is requeued
    os.kill(cluster.read_state(out / name)["pid"], JobEnvironment._usr_sig())
    assert job.result() == "done"
    log = (out / name / "sweep.log").read_text()
    assert "terminated (SIGTERM)" in log and "resuming" in log  # it really was stopped mid-training
    a = load_checkpoint(tmp_path / "local" / name / "last.pt")["model"]
    b = load_checkpoint(last)["model"]
    for key, value in a.items():
        if torch.is_tensor(value):
            torch.testing.assert_close(b[key], value, rtol=0, atol=0)
    assert cluster.read_state(out / name)["state"] == "done"


def test_status_reads_the_run_directories(tmp_path, capsys):
    grid = grid_file(tmp_path, epochs=1, seeds=(0, 1, 2, 3))
    runs = sweep.validate_grid(sweep.load_grid(grid))
    out = tmp_path / "runs"
    finished, failed, queued, running = (out / r.name for r in runs)
    (finished / "eval" / "test").mkdir(parents=True)
    (finished / "train_summary.json").write_text(json.dumps({"finished": True}))
    (finished / "eval" / "test" / "metrics.json").write_text("{}")
    assert sweep.is_finished(finished)  # the rule the local sweep uses
    for run_dir, state, extra in ((failed, "failed", {"reason": "train.py exited with status 2",
                                                      "log": str(failed / "sweep.log")}),
                                  (queued, "queued", {}), (running, "running", {"node": "gpu17"})):
        run_dir.mkdir(parents=True)
        (run_dir / "job.json").write_text(json.dumps({"job_id": "123_4"}))
        cluster.write_state(run_dir, state, **extra)
    atomic_save({"epoch": 5, "model": {"w": torch.ones(64, 64)}}, running / "last.pt")  # a checkpoint, as train.py writes
    assert sweep.main([str(grid), "--out", str(out), "--status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{runs[0].name}: finished"
    assert lines[1].startswith(f"{runs[1].name}: failed (job 123_4): train.py exited with status 2; log: ")
    assert lines[1].endswith(str(failed / "sweep.log"))
    assert lines[2] == f"{runs[2].name}: queued (job 123_4)" and "running (job 123_4) on gpu17" in lines[3]
    assert lines[3].endswith(", epoch 5 done")


class FakeJob:
    def __init__(self, k, folder):
        self.job_id = f"777_{k}"
        self.paths = type("Paths", (), {"stdout": folder / f"777_{k}.out", "stderr": folder / f"777_{k}.err"})()


class RecordingExecutor:
    instances: list = []

    def __init__(self, folder, max_num_timeout):
        self.folder, self.max_num_timeout, self.params, self.submitted = Path(folder), max_num_timeout, {}, []
        self.batched = False
        RecordingExecutor.instances.append(self)

    def update_parameters(self, **params):
        self.params.update(params)

    @contextlib.contextmanager
    def batch(self):
        self.batched = True
        yield

    def submit(self, job):
        self.submitted.append(job)
        return FakeJob(len(self.submitted) - 1, self.folder)


def test_slurm_launcher_sends_one_job_array_with_the_resources(tmp_path, monkeypatch, capsys):
    submitit = pytest.importorskip("submitit")
    monkeypatch.setattr(cluster.shutil, "which", lambda name: "/usr/bin/sbatch" if name == "sbatch" else None)
    monkeypatch.setattr(submitit, "SlurmExecutor", RecordingExecutor)
    RecordingExecutor.instances.clear()
    grid = grid_file(tmp_path, epochs=5)
    out = tmp_path / "runs"
    code = sweep.main([str(grid), "--out", str(out), "--launcher", "slurm", "--partition", "gpu", "--gpus-per-run", "1",
                       "--cpus-per-run", "8", "--time", "90", "--mem", "32", "--slurm-array-parallelism", "5",
                       "--slurm-extra", "account=proj42", "--slurm-extra", "qos=long", "--max-requeues", "7"])
    assert code == 0, capsys.readouterr().err
    (executor,) = RecordingExecutor.instances
    assert executor.batched and executor.max_num_timeout == 7 and len(executor.submitted) == 2
    assert executor.params == {"job_name": "lmttm-tiny", "time": 90, "cpus_per_task": 8, "array_parallelism": 5,
                               "partition": "gpu", "gpus_per_node": 1, "mem": "32GB",
                               "additional_parameters": {"account": "proj42", "qos": "long"}}
    job = executor.submitted[0]  # the job runs the local sweep's command lines, with 8 threads
    train_cmd, predict_cmd = sweep.commands(sweep.validate_grid(sweep.load_grid(grid))[0], out, None)
    assert job.train_cmd == list(map(str, train_cmd)) and job.predict_cmd == list(map(str, predict_cmd))
    assert job.threads == 8
    run_dir = out / "synthetic3d-seed0"
    assert cluster.read_state(run_dir)["state"] == "queued" and cluster.read_state(run_dir)["job_id"] == "777_0"
    assert (run_dir / "sweep_settings.json").is_file()
    # submitted runs are not submitted twice
    assert sweep.main([str(grid), "--out", str(out), "--launcher", "slurm"]) == 0
    assert len(RecordingExecutor.instances) == 1 and "already queued as job 777_0" in capsys.readouterr().out


def test_clear_errors_without_sbatch_or_submitit(tmp_path, monkeypatch, capsys):
    grid = grid_file(tmp_path, epochs=1)
    monkeypatch.setattr(cluster.shutil, "which", lambda name: None)
    assert sweep.main([str(grid), "--out", str(tmp_path / "a"), "--launcher", "slurm"]) == 2
    assert "needs SLURM's sbatch" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "submitit", None)
    assert sweep.main([str(grid), "--out", str(tmp_path / "b"), "--launcher", "slurm"]) == 2
    assert "pip install submitit" in capsys.readouterr().err
    assert sweep.main([str(grid), "--out", str(tmp_path / "c"), "--launcher", "slurm", "--jobs", "2"]) == 2
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_submitit_local_jobs_share_the_cores_by_default(tmp_path, monkeypatch, capsys):
    """Without --cpus-per-run, the submitit-local jobs (all running at once here) get cores // jobs threads;
    SLURM jobs ask for 4 cores and use them."""
    submitit = pytest.importorskip("submitit")
    from tools import launch

    class DoneJob(FakeJob):
        def result(self):
            return "done"

    class LocalRecorder(RecordingExecutor):
        def submit(self, job):
            self.submitted.append(job)
            return DoneJob(len(self.submitted) - 1, self.folder)

    monkeypatch.setattr(submitit, "LocalExecutor", LocalRecorder)
    monkeypatch.setattr(launch, "available_cores", lambda: 7)
    RecordingExecutor.instances.clear()
    grid = grid_file(tmp_path, epochs=1, seeds=(0, 1, 2))
    assert sweep.main([str(grid), "--out", str(tmp_path / "a"), "--launcher", "submitit-local"]) == 0
    (executor,) = RecordingExecutor.instances
    assert executor.params["cpus_per_task"] == 2 and [job.threads for job in executor.submitted] == [2, 2, 2]
    assert cluster.default_cpus("slurm", 3) == 4


def test_resubmit_submits_queued_runs_again(tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    monkeypatch.setattr(cluster.shutil, "which", lambda name: "/usr/bin/sbatch" if name == "sbatch" else None)
    monkeypatch.setattr(submitit, "SlurmExecutor", RecordingExecutor)
    RecordingExecutor.instances.clear()
    grid = grid_file(tmp_path, epochs=5)
    out = tmp_path / "runs"
    assert sweep.main([str(grid), "--out", str(out), "--launcher", "slurm"]) == 0
    assert sweep.main([str(grid), "--out", str(out), "--launcher", "slurm"]) == 0            # queued: left alone
    assert sweep.main([str(grid), "--out", str(out), "--launcher", "slurm", "--resubmit"]) == 0
    assert [len(e.submitted) for e in RecordingExecutor.instances] == [2, 2]


def test_batch_seeds_sends_one_job_per_cell(tmp_path, monkeypatch, capsys):
    """--batch-seeds on SLURM: one array task per cell running the cell's train.py --train.seeds [...] and each
    member's predict.py; every member's job.json names that task; a cell with one seed left to train is per-run."""
    submitit = pytest.importorskip("submitit")
    monkeypatch.setattr(cluster.shutil, "which", lambda name: "/usr/bin/sbatch" if name == "sbatch" else None)
    monkeypatch.setattr(submitit, "SlurmExecutor", RecordingExecutor)
    RecordingExecutor.instances.clear()
    grid = grid_file(tmp_path, epochs=5, seeds=(0, 1, 2))
    runs = sweep.validate_grid(sweep.load_grid(grid))
    out = tmp_path / "runs"
    assert sweep.main([str(grid), "--out", str(out), "--launcher", "slurm", "--batch-seeds"]) == 0
    (job,) = RecordingExecutor.instances[0].submitted
    assert isinstance(job, cluster.CellJob) and job.threads == 4
    single = [[list(map(str, c)) for c in sweep.commands(run, out, None)] for run in runs]
    assert job.predict_cmds == [predict for _, predict in single] and job.train_cmds == [t for t, _ in single]
    # the cell's command: the first run's train.py with the seed list and the cell's name, written out here
    first = single[0][0]
    i, j = first.index("--train.seed"), first.index("--output.name")
    expected = (first[:i] + ["--train.seeds", "[0, 1, 2]"] + first[i + 2:j] + ["--output.name", "synthetic3d"]
                + first[j + 2:])
    assert i < j and job.cell_cmd == expected
    for run in runs:
        assert json.loads((out / run.name / "job.json").read_text())["job_id"] == "777_0"
    assert sweep.main([str(grid), "--out", str(out), "--status"]) == 0
    assert capsys.readouterr().out.splitlines()[-3:] == [f"{run.name}: queued (job 777_0)" for run in runs]
    # pre-empted: every member is marked requeued and the same cell job goes back in the queue
    again = job.checkpoint().function
    assert isinstance(again, cluster.CellJob) and again.cell_cmd == job.cell_cmd and again.members == job.members
    assert {cluster.read_state(out / run.name)["state"] for run in runs} == {"requeued"}
    # two seeds trained already: the third is a per-run job; the trained ones only predict, alone
    other = tmp_path / "other"
    for run in runs[:2]:
        (other / run.name).mkdir(parents=True)
        (other / run.name / "train_summary.json").write_text(json.dumps({"finished": True}))
    assert sweep.main([str(grid), "--out", str(other), "--launcher", "slurm", "--batch-seeds"]) == 0
    jobs = RecordingExecutor.instances[-1].submitted
    assert [type(j) for j in jobs] == [cluster.RunJob] * 3
    assert [j.train_cmd for j in jobs] == [list(map(str, sweep.commands(run, other, None)[0])) for run in runs]


def test_batch_seeds_cell_job_runs_with_submitit_local(tmp_path, monkeypatch):
    """A 2-seed cell as one submitit-local job: one train.py --train.seeds, both members predicted, the same
    metrics as a local --batch-seeds sweep, each member's state "done" under the one job id."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    grid = grid_file(tmp_path, epochs=1)
    assert sweep.main([str(grid), "--out", str(tmp_path / "local"), "--batch-seeds"]) == 0
    out = tmp_path / "jobs"
    assert sweep.main([str(grid), "--out", str(out), "--launcher", "submitit-local", "--batch-seeds",
                       "--cpus-per-run", "1"]) == 0
    ids = {cluster.read_state(out / f"synthetic3d-seed{s}")["job_id"] for s in (0, 1)}
    assert len(ids) == 1
    log = (out / "synthetic3d-seed0" / "sweep.log").read_text()
    assert log.count("--train.seeds [0, 1]") == 1  # one process for the cell; seed 1 only predicted
    assert "train.py" not in (out / "synthetic3d-seed1" / "sweep.log").read_text()
    for seed in (0, 1):
        a, b = tmp_path / "local" / f"synthetic3d-seed{seed}", out / f"synthetic3d-seed{seed}"
        assert cluster.read_state(b)["state"] == "done" and files_of(b) - JOB_FILES == files_of(a)
        ma, mb = (json.loads((d / "eval" / "test" / "metrics.json").read_text()) for d in (a, b))
        assert (ma["auc"], ma["acc"]) == (mb["auc"], mb["acc"])
