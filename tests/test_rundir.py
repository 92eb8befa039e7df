"""The owner of a run directory (engine/rundir.RunDirectory, engine/saver.CheckpointSaver) on the faults of
issue 28: records whose last.pt is gone, a best.pt its last.pt never committed, a full disk in the first epoch."""

from __future__ import annotations

import errno
import signal

import pytest
from helpers import write_fake_medmnist

import predict
import train
from engine import rundir, setup
from engine.rundir import FAULTS, SimulatedKill

pytestmark = pytest.mark.filterwarnings("ignore:.*differ from the official")
TINY = ["--model.dim", "8", "--model.memory_tokens", "8", "--model.heads", "2", "--train.batch_size", "8",
        "--eval.batch_size", "16", "--train.lr", "0.01"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_fake_medmnist(root, "adrenalmnist3d", n=(24, 16, 8))
    return root


@pytest.fixture(autouse=True)
def no_faults_and_own_signals():
    FAULTS.reset()
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    yield
    FAULTS.reset()
    signal.signal(signal.SIGTERM, previous[0])
    signal.signal(signal.SIGINT, previous[1])


def args_for(data_root, out, name, epochs, *extra):
    return ["adrenalmnist3d.json", *TINY, "--data.root", str(data_root), "--train.epochs", str(epochs),
            "--output.dir", str(out), "--output.name", name, *extra]


def cli_exit(main, argv, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        setup.run_cli(lambda: main(argv))
    return exit_info.value.code, capsys.readouterr().err.strip()


def files_of(run):
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != rundir.LOCK_NAME}


def test_records_without_their_last_pt_are_refused_not_overwritten(data_root, tmp_path, capsys):
    assert train.main(args_for(data_root, tmp_path, "run", 1)) == 0
    run = tmp_path / "run"
    (run / rundir.LAST).unlink()
    before = files_of(run)
    code, err = cli_exit(train.main, args_for(data_root, tmp_path, "run", 2), capsys)
    assert code == 2 and "--restart" in err and "metrics.csv" in err and "\n" not in err, err
    assert files_of(run) == before  # nothing rewritten, nothing removed
    assert train.main([*args_for(data_root, tmp_path, "run", 1), "--restart"]) == 0  # the way out it names
    (aside,) = tmp_path.glob("run.old-*")
    assert files_of(aside) == before and (run / rundir.LAST).is_file()


@pytest.mark.parametrize("epoch", [1, 2])
def test_a_best_pt_its_last_pt_never_committed_is_not_scored(epoch, data_root, tmp_path, capsys):
    assert train.main(args_for(data_root, tmp_path, "straight", 2)) == 0
    replaced = [p for p, name, stage in FAULTS.log if name == rundir.BEST and stage == "replaced"]
    assert len(replaced) == 2  # this tiny run improves in both epochs
    FAULTS.reset(at=replaced[epoch - 1])  # killed right after best.pt of `epoch`, before its last.pt
    with pytest.raises(SimulatedKill):
        train.main(args_for(data_root, tmp_path, "run", 2))
    FAULTS.reset()
    run = tmp_path / "run"
    code, err = cli_exit(predict.main, args_for(data_root, tmp_path, "run", 2), capsys)
    expected = "is not committed" if epoch == 1 else "holds epoch 2, but"
    assert code == 2 and expected in err and "\n" not in err, err
    assert not (run / rundir.EVAL_DIR).exists()
    assert train.main(args_for(data_root, tmp_path, "run", 2)) == 0  # the resume commits it
    assert predict.main(args_for(data_root, tmp_path, "run", 2)) == 0


def test_full_disk_in_the_first_epoch_leaves_no_epoch_file_behind(data_root, tmp_path, capsys, monkeypatch):
    calls, real_fsync = [], rundir.os.fsync

    def full_disk(fd):  # config.json, best.pt, epoch_0001.pt go in; last.pt, the commit, does not
        calls.append(fd)
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(rundir.os, "fsync", full_disk)
    code, err = cli_exit(train.main, args_for(data_root, tmp_path, "run", 1, "--train.keep_last_k", "1"), capsys)
    assert code == 2 and "the disk is full" in err and "No epoch had finished" in err and "\n" not in err, err
    assert len(calls) == 4 and list(tmp_path.iterdir()) == []
