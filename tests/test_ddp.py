"""torchrun: two CPU processes (gloo) train the same weights as one process with the same global batch, and a
torchrun run killed in an epoch resumes to the weights of an uninterrupted one."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.checkpoint import load_checkpoint
from engine.distributed import Distributed

REPO = Path(__file__).resolve().parent.parent
TINY = ["demo.json", "--model.dim", "16", "--model.memory_tokens", "16", "--model.heads", "2", "--train.device", "cpu",
        "--eval.batch_size", "64", "--output.plots", "false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(tmp_path, name, *extra, nproc=1, env=None):
    args = [*TINY, "--output.dir", str(tmp_path), "--output.name", name, *extra]
    command = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
                "127.0.0.1", "--master_port", str(free_port()), "train.py", *args] if nproc > 1
               else [sys.executable, "train.py", *args])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180, env=env)


def weights(path):
    return {k: v for k, v in load_checkpoint(path)["model"].items() if torch.is_tensor(v)}


def test_shards_cover_the_global_batch_with_weights_that_give_its_mean():
    x, y = torch.arange(7.0)[:, None], torch.arange(7)
    parts = [Distributed(rank, 3).shard(x, y) for rank in range(3)]
    assert [p[1].tolist() for p in parts] == [[0, 1, 2], [3, 4], [5, 6]]
    # DDP averages over the 3 ranks: sum_r weight_r * (sum of the shard) / 3 = mean over the 7 samples
    assert sum(p[2] * p[0].sum() for p in parts) / 3 == pytest.approx(x.mean())
    empty = Distributed(1, 2).shard(x[:1], y[:1])
    assert empty[2] == 0.0 and len(empty[1]) == 1  # joins the all-reduce with nothing


def test_two_processes_train_the_weights_of_one(tmp_path):
    """Batch 239 of the 240 training volumes: step 1 splits 120 / 119, step 2 leaves rank 1 without a sample."""
    common = ["--train.batch_size", "239", "--train.epochs", "2", "--train.optimizer", "sgd", "--train.lr", "0.05",
              "--model.dropout", "0", "--model.noise", "none"]
    one = run(tmp_path, "one", *common)
    two = run(tmp_path, "two", *common, nproc=2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr[-3000:]
    assert "torchrun: 2 processes" in two.stdout and two.stdout.count("epoch   1/2") == 1  # rank 0 alone logs
    a, b = weights(tmp_path / "one" / "last.pt"), weights(tmp_path / "two" / "last.pt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    # the same logged numbers (the global mean loss; validation AUC up to ties the float noise can reorder)
    for r2, r1 in zip(load_checkpoint(tmp_path / "two" / "last.pt")["metrics"],
                      load_checkpoint(tmp_path / "one" / "last.pt")["metrics"], strict=True):
        assert float(r2["train_loss"]) == pytest.approx(float(r1["train_loss"]), abs=2e-6)
        assert float(r2["val_auc"]) == pytest.approx(float(r1["val_auc"]), abs=2e-3)
    assert load_checkpoint(tmp_path / "two" / "last.pt")["world_size"] == 2


def test_a_killed_torchrun_run_resumes_to_the_uninterrupted_weights(tmp_path):
    """Dropout and noise on: each rank's stream is reseeded per epoch, so the resumed epochs draw the same."""
    common = ["--train.batch_size", "48", "--train.epochs", "3", "--train.lr", "0.001"]
    straight = run(tmp_path, "straight", *common, nproc=2)
    assert straight.returncode == 0, straight.stderr[-3000:]
    # write points: config.json 1-3, epoch 1 best.pt 4-6, last.pt 7-9, metrics.csv 10-12; 13 = in epoch 2
    killed = run(tmp_path, "resumed", *common, nproc=2, env={"LMTTM_FAULT_AT_WRITE": "13"})
    assert killed.returncode != 0
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 1
    resumed = run(tmp_path, "resumed", *common, nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    a, b = weights(tmp_path / "straight" / "last.pt"), weights(tmp_path / "resumed" / "last.pt")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)


def _rank_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes (its children with RANK in their environment)."""
    out = {}
    for child in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split():
        try:
            env = dict(v.split("=", 1) for v in Path(f"/proc/{child}/environ").read_text().split("\0") if "=" in v)
        except OSError:
            continue
        if "RANK" in env:
            out[int(env["RANK"])] = int(child)
    return out


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] in "ZX"
    except (OSError, IndexError):
        return True


def test_a_frozen_rank_stops_the_other_with_one_line(tmp_path):
    """Rank 1 stopped (SIGSTOP) after epoch 1: rank 0 gives up after train.dist_timeout_min (0.05 min here), not
    gloo's 30 minutes, with one error line and no traceback of its own."""
    import signal
    import time

    args = [*TINY, "--output.dir", str(tmp_path), "--output.name", "run", "--train.epochs", "200",
            "--train.batch_size", "16", "--train.dist_timeout_min", "0.05"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "train.py", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    launcher = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    pids = {}
    try:
        deadline = time.time() + 120
        while not (tmp_path / "run" / "metrics.csv").exists() and time.time() < deadline:  # epoch 1 is done
            time.sleep(0.2)
        pids = _rank_pids(launcher)
        t0 = time.time()
        os.kill(pids[1], signal.SIGSTOP)
        while not _gone(pids[0]) and time.time() < t0 + 100:
            time.sleep(0.2)
        waited = time.time() - t0
    finally:
        for pid in pids.values():  # the stopped rank would keep the launcher waiting 30 s before its SIGKILL
            for sig in (signal.SIGKILL, signal.SIGCONT):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        out, err = launcher.communicate(timeout=60)
    assert waited < 60 and launcher.returncode != 0
    assert "error: torchrun rank 0 of 2: another rank did not answer within train.dist_timeout_min" in err, err[-3000:]
    assert 'train.py", line' not in err and "RuntimeError" not in err, err[-3000:]


def test_a_lost_rank_is_one_line_and_other_errors_are_left_alone(capsys, monkeypatch):
    from engine.setup import run_cli

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")

    def lost():  # what gloo raises in the survivor's next collective when a peer died
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                           "[127.0.0.1]:41234")

    with pytest.raises(SystemExit) as done:
        run_cli(lost)
    err = capsys.readouterr().err
    assert done.value.code == 1 and err.count("\n") == 1
    assert err.startswith("error: torchrun rank 1 of 2: lost contact with another rank (Connection closed by peer")

    def bug():
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="mat1"):
        run_cli(bug)


def test_ranks_end_when_the_launcher_is_killed(tmp_path):
    import signal
    import time

    args = [*TINY, "--output.dir", str(tmp_path), "--output.name", "run", "--train.epochs", "200"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "train.py", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    launcher = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    pids = {}
    try:
        deadline = time.time() + 120
        while not (tmp_path / "run" / "config.json").exists() and time.time() < deadline:  # training started
            time.sleep(0.2)
        pids = _rank_pids(launcher)
        assert len(pids) == 2
        launcher.kill()  # SIGKILL: the launcher cannot pass anything on
        launcher.wait()
        deadline = time.time() + 30
        while not all(_gone(pid) for pid in pids.values()) and time.time() < deadline:
            time.sleep(0.2)
        assert all(_gone(pid) for pid in pids.values())
    finally:
        for pid in pids.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if launcher.poll() is None:
            launcher.kill()
