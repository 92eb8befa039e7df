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
