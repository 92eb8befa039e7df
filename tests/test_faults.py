"""Run directories under kills, races, signals and bad input (issue 15), and the engine's RNG/determinism
handling (issue 8).

The fault-injection test kills the training at every fault point of every atomic write of an uninterrupted
run (inside each write of config.json, best.pt, the epoch files, last.pt, metrics.csv and
train_summary.json: half-written temporary, complete temporary, after the rename), resumes, and compares
everything with the uninterrupted run: weights, optimizer state, best.pt, the epoch files, metrics.csv and
the summary (wall-clock columns aside).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import write_fake_medmnist

import predict
import train
from engine import rundir, saver, setup
from engine.checkpoint import CheckpointError, load_checkpoint
from engine.config import ConfigError
from engine.rundir import FAULTS, RunDirError, RunLock, SimulatedKill

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.filterwarnings("ignore:.*differ from the official")
TINY = ["--model.dim", "8", "--model.memory_tokens", "8", "--model.heads", "2", "--train.batch_size", "8",
        "--eval.batch_size", "16", "--train.lr", "0.01"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_fake_medmnist(root, "adrenalmnist3d", n=(24, 16, 8))
    return root


@pytest.fixture(autouse=True)
def no_faults():
    FAULTS.reset()
    yield
    FAULTS.reset()


def args_for(data_root, out, name="run", epochs=3, *extra):
    return ["adrenalmnist3d.json", *TINY, "--data.root", str(data_root), "--train.epochs", str(epochs),
            "--output.dir", str(out), "--output.name", name, *extra]


def snapshot(run: Path) -> dict:
    """Everything a run directory holds that must not depend on interruptions."""
    last, best = load_checkpoint(run / "last.pt"), load_checkpoint(run / "best.pt")
    metrics = pd.read_csv(run / "metrics.csv").drop(columns=["time_s"])
    summary = json.loads((run / "train_summary.json").read_text())
    summary.pop("seconds")
    epochs = {p.name: load_checkpoint(p)["model"] for p in sorted(run.glob("epoch_*.pt"))}
    leftovers = sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp"))
    return {"last": last, "best": best, "metrics": metrics, "summary": summary, "epochs": epochs,
            "config": {k: v for k, v in json.loads((run / "config.json").read_text()).items() if k != "output"},
            "leftovers": leftovers}


def assert_same_tensors(a, b, where):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_run(a: dict, b: dict, where: str):
    assert b["leftovers"] == [], f"{where}: temporaries left: {b['leftovers']}"
    assert_same_tensors(a["last"]["model"], b["last"]["model"], f"{where}: last.pt weights")
    assert_same_tensors(a["last"]["optimizer"], b["last"]["optimizer"], f"{where}: optimizer state")
    assert_same_tensors(a["last"]["rng"], b["last"]["rng"], f"{where}: rng")
    for key in ("epoch", "best_epoch", "best_val_auc"):
        assert a["last"][key] == b["last"][key], f"{where}: last.pt {key}"
        assert a["best"][key] == b["best"][key], f"{where}: best.pt {key}"
    assert_same_tensors(a["best"]["model"], b["best"]["model"], f"{where}: best.pt weights")
    assert list(a["epochs"]) == list(b["epochs"]), f"{where}: epoch files"
    for name in a["epochs"]:
        assert_same_tensors(a["epochs"][name], b["epochs"][name], f"{where}: {name}")
    pd.testing.assert_frame_equal(a["metrics"], b["metrics"], obj=f"{where}: metrics.csv")
    assert a["summary"] == b["summary"], f"{where}: summary"
    assert a["config"] == b["config"], f"{where}: config.json"


def test_kill_at_every_write_then_resume_equals_an_uninterrupted_run(data_root, tmp_path):
    extra = ("--train.keep_last_k", "1")
    assert train.main(args_for(data_root, tmp_path, "straight", 2, *extra)) == 0
    points = list(FAULTS.log)
    reference = snapshot(tmp_path / "straight")
    # the run exercises every kind of write, best.pt more than once and not every epoch
    names = {name for _, name, _ in points}
    assert {"config.json", "best.pt", "epoch_0001.pt", "last.pt", "metrics.csv", "train_summary.json"} <= names
    assert sum(1 for _, name, stage in points if name == "best.pt" and stage == "replaced") == 2
    assert reference["metrics"]["epoch"].tolist() == [1, 2] and list(reference["epochs"]) == ["epoch_0002.pt"]

    # "replaced" of one file leaves the disk as "partial" of the next one does, less a temporary: only the
    # commit (last.pt) and the very last write are tried after the rename
    tried = [(p, n, st) for p, n, st in points if st != "replaced" or n in ("last.pt", "train_summary.json")]
    assert len(tried) == 23  # 10 writes x (partial, written) + replaced of 2 last.pt and the summary
    for point, name, stage in tried:
        run = f"kill{point}"
        FAULTS.reset(at=point)
        with pytest.raises(SimulatedKill):
            train.main(args_for(data_root, tmp_path, run, 2, *extra))
        FAULTS.reset()
        if name == "metrics.csv" and stage == "partial":  # the row of this epoch is not on disk yet ...
            committed = load_checkpoint(tmp_path / run / "last.pt")["epoch"]
            on_disk = pd.read_csv(tmp_path / run / "metrics.csv")["epoch"].tolist() if committed > 1 else []
            assert on_disk == list(range(1, committed)), f"kill at {point}"
        assert train.main(args_for(data_root, tmp_path, run, 2, *extra)) == 0, f"kill at {point} ({name} {stage})"
        assert_same_run(reference, snapshot(tmp_path / run), f"kill at {point} ({name} {stage})")  # ... now it is


def test_two_kills_in_a_row_and_a_kill_during_the_resume(data_root, tmp_path):
    assert train.main(args_for(data_root, tmp_path, "straight", 3)) == 0
    reference = snapshot(tmp_path / "straight")
    for first, second in ((11, 4), (22, 12)):
        run = f"kills{first}-{second}"
        FAULTS.reset(at=first)
        with pytest.raises(SimulatedKill):
            train.main(args_for(data_root, tmp_path, run, 3))
        FAULTS.reset(at=second)
        with pytest.raises(SimulatedKill):
            train.main(args_for(data_root, tmp_path, run, 3))
        FAULTS.reset()
        assert train.main(args_for(data_root, tmp_path, run, 3)) == 0
        assert_same_run(reference, snapshot(tmp_path / run), run)


def test_real_kill_9_inside_the_last_pt_write_then_resume(data_root, tmp_path, capsys):
    """A real SIGKILL (LMTTM_FAULT_AT_WRITE) in a subprocess: the lock of the dead process does not block the
    resume, the half-written temporary is removed, and the result equals an uninterrupted run."""
    assert train.main(args_for(data_root, tmp_path, "straight", 2)) == 0
    reference = snapshot(tmp_path / "straight")
    point = next(p for p, name, stage in FAULTS.log if name == "last.pt" and stage == "partial" and p > 12)
    cmd = [sys.executable, "train.py", *args_for(data_root, tmp_path, "killed", 2)]
    env = {**os.environ, "LMTTM_FAULT_AT_WRITE": str(point), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    run = tmp_path / "killed"
    assert [p.name for p in run.glob(".last.pt.*.tmp")] and (run / ".lock").exists()
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
    assert train.main(args_for(data_root, tmp_path, "killed", 2)) == 0  # resumed here: the dead process's lock is gone
    out = capsys.readouterr().out
    assert "removed 1 temporary file(s)" in out and "resuming" in out
    assert_same_run(reference, snapshot(run), "kill -9")


# ----------------------------------------------------------------------------------------------------------
# the lock
# ----------------------------------------------------------------------------------------------------------

def test_a_run_being_trained_refuses_a_second_training_and_predict(data_root, tmp_path):
    assert train.main(args_for(data_root, tmp_path, "run", 1)) == 0
    config_before = (tmp_path / "run" / "config.json").read_text()
    with RunLock(tmp_path / "run"):  # what a training process holds (flock is per open file, so this counts)
        with pytest.raises(RunDirError, match=r"in use by another process \(pid \d+\)"):
            train.main(args_for(data_root, tmp_path, "run", 2, "--train.lr", "0.02"))
        with pytest.raises(RunDirError, match="being trained right now"):
            predict.main(args_for(data_root, tmp_path, "run", 1))
    assert (tmp_path / "run" / "config.json").read_text() == config_before
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1
    assert predict.main(args_for(data_root, tmp_path, "run", 1)) == 0  # released: fine again
    with RunLock(tmp_path / "run"):
        pass
    assert train.main(args_for(data_root, tmp_path, "run", 2)) == 0


def test_lock_is_released_on_every_exit(data_root, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise train.NonFiniteLoss("the training loss became nan")

    monkeypatch.setattr(train, "train_one_epoch", boom)
    assert train.main(args_for(data_root, tmp_path, "run", 1)) == 3
    with RunLock(tmp_path / "run"):
        pass


# ----------------------------------------------------------------------------------------------------------
# records: metrics, summary, config, epoch files, eval folders
# ----------------------------------------------------------------------------------------------------------

def test_extending_a_finished_run_invalidates_its_summary_and_keeps_config_of_failed_calls(data_root, tmp_path,
                                                                                       monkeypatch):
    from tools import sweep

    assert train.main(args_for(data_root, tmp_path, "run", 1)) == 0
    run = tmp_path / "run"
    assert sweep.train_finished(run)
    config_before = (run / "config.json").read_text()
    # failed invocations do not rewrite config.json: another model, missing data
    with pytest.raises(CheckpointError, match="trained with another config"):
        train.main(args_for(data_root, tmp_path, "run", 2, "--model.dim", "16"))
    with pytest.raises(Exception, match="not found"):
        train.main(args_for(tmp_path / "nowhere", tmp_path, "run", 2, "--data.download", "false"))
    assert (run / "config.json").read_text() == config_before
    # an extension killed in its first new epoch: the summary no longer says finished
    real = train.train_one_epoch

    def interrupted(model, optimizer, split, cfg, epoch, device, **kwargs):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(model, optimizer, split, cfg, epoch, device, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", interrupted)
    assert train.main(args_for(data_root, tmp_path, "run", 3)) == 130
    assert not (run / "train_summary.json").exists() and not sweep.train_finished(run)
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 3
    monkeypatch.setattr(train, "train_one_epoch", real)
    assert train.main(args_for(data_root, tmp_path, "run", 3)) == 0
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["finished"] is True and summary["epochs"] == 3
    assert pd.read_csv(run / "metrics.csv")["epoch"].tolist() == [1, 2, 3]


def test_a_finished_run_gets_its_lost_summary_back(data_root, tmp_path):
    assert train.main(args_for(data_root, tmp_path, "run", 1)) == 0
    run = tmp_path / "run"
    summary = (run / "train_summary.json").read_text()
    (run / "train_summary.json").unlink()
    (run / "metrics.csv").write_text("epoch,train_loss\n")
    assert train.main(args_for(data_root, tmp_path, "run", 1)) == 0
    assert (run / "train_summary.json").read_text() == summary
    assert pd.read_csv(run / "metrics.csv")["epoch"].tolist() == [1]


def test_lowering_keep_last_k_on_resume_keeps_exactly_the_last_k_and_predict_checks_them(data_root, tmp_path):
    assert train.main(args_for(data_root, tmp_path, "run", 3, "--train.keep_last_k", "3")) == 0
    assert train.main(args_for(data_root, tmp_path, "run", 5, "--train.keep_last_k", "2")) == 0
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("epoch_*.pt")) == ["epoch_0004.pt", "epoch_0005.pt"]
    with pytest.raises(CheckpointError, match=r"epochs 3\.\.5.*epoch_0003.pt is missing"):
        predict.main(args_for(data_root, tmp_path, "run", 5, "--last-k", "3"))
    assert predict.main(args_for(data_root, tmp_path, "run", 5, "--last-k", "2")) == 0
    assert json.loads((run / "eval" / "test-last2" / "metrics.json").read_text())["epochs"] == [4, 5]
    # a file that is not the epoch its name says (copied by hand) is refused
    (run / "epoch_0004.pt").write_bytes((run / "epoch_0005.pt").read_bytes())
    with pytest.raises(CheckpointError, match="holds epoch 5, not epoch 4"):
        predict.main(args_for(data_root, tmp_path, "run", 5, "--last-k", "2"))
    for bad in ("-2", "0"):
        with pytest.raises(ConfigError, match=f"--last-k {bad}: give a positive number"):
            predict.main(args_for(data_root, tmp_path, "run", 5, "--last-k", bad))


def test_foreign_checkpoint_is_scored_into_its_own_folder(data_root, tmp_path):
    assert train.main(args_for(data_root, tmp_path, "mine", 1)) == 0
    from tools import sweep

    assert train.main(args_for(data_root, tmp_path, "other", 1, "--train.seed", "5")) == 0
    foreign = tmp_path / "other" / "best.pt"
    assert predict.main([*args_for(data_root, tmp_path, "mine", 1), "--checkpoint", str(foreign)]) == 0
    assert not sweep.is_finished(tmp_path / "mine")  # the sweep/aggregator do not take it for the run's own result
    assert predict.main(args_for(data_root, tmp_path, "mine", 1)) == 0
    own = (tmp_path / "mine" / "eval" / "test" / "metrics.json").read_text()
    assert sweep.is_finished(tmp_path / "mine")
    assert predict.main([*args_for(data_root, tmp_path, "mine", 1), "--checkpoint", str(foreign)]) == 0
    assert (tmp_path / "mine" / "eval" / "test" / "metrics.json").read_text() == own  # untouched
    (folder,) = [p for p in (tmp_path / "mine" / "eval").iterdir() if p.name != "test"]  # the same folder twice
    assert folder.name.startswith("test-other-best-") and len(folder.name) == len("test-other-best-") + 8
    assert json.loads((folder / "metrics.json").read_text())["checkpoint"] == str(foreign)
    assert predict.main([*args_for(data_root, tmp_path, "mine", 1), "--checkpoint",
                         str(tmp_path / "mine" / "last.pt")]) == 0
    assert (tmp_path / "mine" / "eval" / "test-last" / "metrics.json").is_file()


def test_json_never_holds_nan_or_infinity(tmp_path):
    summary = saver.summary_of({"epoch": 1, "best_epoch": -1, "best_val_auc": -float("inf"), "dataset": {}})
    assert summary["best_val_auc"] is None
    rundir.atomic_write_json({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf")}},
                             tmp_path / "x.json")
    text = (tmp_path / "x.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": {"d": None}}


# ----------------------------------------------------------------------------------------------------------
# bad input and a bad disk: one line, exit 2, nothing lost
# ----------------------------------------------------------------------------------------------------------

def cli_exit(main, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        setup.run_cli(lambda: main(argv))
    err = capsys.readouterr().err.strip()
    return exit_info.value.code, err


@pytest.fixture
def restore_sigterm():
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGTERM, previous[0])
    signal.signal(signal.SIGINT, previous[1])


def test_degenerate_splits_stop_before_anything_is_written(tmp_path, capsys, restore_sigterm):
    one_class = tmp_path / "one"
    write_fake_medmnist(one_class, "adrenalmnist3d", n=(8, 4, 4), num_classes=1)
    code, err = cli_exit(train.main, args_for(one_class, tmp_path, "run", 1), capsys)
    assert code == 2 and err.startswith("error: ") and "val" in err and "\n" not in err
    assert not (tmp_path / "run").exists()
    data = tmp_path / "data"
    write_fake_medmnist(data, "adrenalmnist3d", n=(8, 4, 4))
    assert train.main(args_for(data, tmp_path, "run", 1)) == 0
    write_fake_medmnist(data, "adrenalmnist3d", n=(8, 4, 0))  # the test split is now empty
    code, err = cli_exit(predict.main, args_for(data, tmp_path, "run", 1), capsys)
    assert code == 2 and "test" in err and "empty" in err and "\n" not in err
    assert not (tmp_path / "run" / "eval").exists()


@pytest.mark.parametrize("case", ["long name", "dir is a file", "patch 50"])
def test_bad_output_paths_and_models_exit_2_with_one_line(case, data_root, tmp_path, capsys, restore_sigterm):
    if case == "long name":
        argv, expect = args_for(data_root, tmp_path, "x" * 300, 1), "long"
    elif case == "dir is a file":
        (tmp_path / "file").write_text("")
        argv, expect = args_for(data_root, tmp_path / "file", "run", 1), "is a file"
    else:
        argv, expect = [*args_for(data_root, tmp_path, "run", 1), "--model.patch_size", "50"], "cannot be built"
    code, err = cli_exit(train.main, argv, capsys)
    assert code == 2 and err.startswith("error: ") and expect in err.lower() and "\n" not in err, err
    if case == "patch 50":
        assert not (tmp_path / "run").exists()


def test_full_disk_stops_cleanly_and_the_run_resumes_exactly(data_root, tmp_path, capsys, monkeypatch,
                                                              restore_sigterm):
    assert train.main(args_for(data_root, tmp_path, "straight", 2)) == 0
    reference = snapshot(tmp_path / "straight")
    calls, real_fsync = [], os.fsync

    def full_disk(fd):
        calls.append(fd)
        if len(calls) == 6:  # config.json, best.pt, last.pt, metrics.csv of epoch 1, then best.pt, last.pt of epoch 2
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(rundir.os, "fsync", full_disk)
    code, err = cli_exit(train.main, args_for(data_root, tmp_path, "run", 2), capsys)
    assert code == 2 and "the disk is full" in err and "holds the last finished epoch" in err and "\n" not in err
    run = tmp_path / "run"
    assert load_checkpoint(run / "last.pt")["epoch"] == 1 and not list(run.glob("*.tmp")) + list(run.glob(".*.tmp"))
    monkeypatch.setattr(rundir.os, "fsync", real_fsync)
    assert train.main(args_for(data_root, tmp_path, "run", 2)) == 0
    assert_same_run(reference, snapshot(run), "full disk")


def test_full_disk_before_the_first_epoch_is_saved_leaves_no_run_directory(data_root, tmp_path, capsys, monkeypatch,
                                                                           restore_sigterm):
    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir.os, "fsync", full_disk)
    code, err = cli_exit(train.main, args_for(data_root, tmp_path, "run", 1), capsys)
    assert code == 2 and "the disk is full" in err and "No epoch had finished" in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []


def test_checkpoints_missing_keys_or_with_other_shapes_are_refused(data_root, tmp_path, capsys, restore_sigterm):
    assert train.main(args_for(data_root, tmp_path, "run", 1)) == 0
    ckpt = load_checkpoint(tmp_path / "run" / "best.pt")
    key = next(k for k, v in ckpt["model"].items() if isinstance(v, torch.Tensor) and v.dim() == 2)
    missing = {**ckpt, "model": {k: v for k, v in ckpt["model"].items() if k != key}}
    reshaped = {**ckpt, "model": {**ckpt["model"], key: torch.zeros(3, 3)}}
    for name, bad in (("missing.pt", missing), ("reshaped.pt", reshaped)):
        torch.save(bad, tmp_path / name)
        code, err = cli_exit(predict.main, [*args_for(data_root, tmp_path, "run", 1), "--checkpoint",
                                            str(tmp_path / name)], capsys)
        assert code == 2 and str(tmp_path / name) in err and "\n" not in err, err
        assert "Traceback" not in err


# ----------------------------------------------------------------------------------------------------------
# signals
# ----------------------------------------------------------------------------------------------------------

def test_sigterm_during_an_epoch_exits_143_and_resumes(data_root, tmp_path, capsys, monkeypatch, restore_sigterm):
    rundir.handle_sigterm()
    real = train.train_one_epoch

    def terminated_in_second_epoch(model, optimizer, split, cfg, epoch, device, **kwargs):
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(model, optimizer, split, cfg, epoch, device, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", terminated_in_second_epoch)
    assert train.main(args_for(data_root, tmp_path, "run", 2)) == 143
    assert "terminated (SIGTERM) in epoch 2; that epoch is abandoned" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1
    monkeypatch.setattr(train, "train_one_epoch", real)
    assert train.main(args_for(data_root, tmp_path, "run", 2)) == 0


@pytest.mark.parametrize("exc, code", [(KeyboardInterrupt, 130), (rundir.Terminated, 143)])
def test_interrupt_during_start_up_is_one_line(exc, code, capsys, restore_sigterm):
    def start_up():
        raise exc

    with pytest.raises(SystemExit) as exit_info:
        setup.run_cli(start_up)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == code and "\n" not in err and "before any result was written" in err


# ----------------------------------------------------------------------------------------------------------
# issue 8: determinism flags and RNG state across machines
# ----------------------------------------------------------------------------------------------------------

def test_deterministic_flags_are_applied_and_can_be_switched_off(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    try:
        setup.apply_determinism(True)
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.benchmark is False and torch.backends.cudnn.deterministic is True
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        setup.apply_determinism(False)
        assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic is False
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[2], before[3]


@pytest.mark.parametrize("saved, here, restored, note", [
    (2, 1, [0], "restored the CUDA RNG state of 1 of the 2 GPUs"),
    (0, 1, [], "no CUDA RNG state (saved without CUDA)"),
    (1, 0, [], "not restored (no CUDA here)"),
    (1, 2, [0], "the other 1 GPU(s) here start from the seed"),
    (2, 2, [0, 1], None),
])
def test_rng_state_restores_what_matches_the_gpus_here(saved, here, restored, note, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: here > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: here)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, index: calls.append((index, state[0].item())))
    cpu = torch.get_rng_state()
    torch.manual_seed(1)
    expected_next = torch.rand(1)
    torch.manual_seed(1)
    state = {"torch": torch.get_rng_state()}
    if saved:
        state["cuda"] = [torch.full((4,), 10 + i, dtype=torch.uint8) for i in range(saved)]
    torch.manual_seed(99)
    message = setup.restore_rng_state(state)
    assert torch.equal(torch.rand(1), expected_next)  # the CPU generator is always restored
    torch.set_rng_state(cpu)
    assert calls == [(i, 10 + i) for i in restored]
    assert (message is None) if note is None else (note in message and "\n" not in message)
