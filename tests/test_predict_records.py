"""predict.py's records: a prediction replaces its eval folder as one unit (no CSV of an earlier prediction left
beside the new one), a full disk leaves the earlier results intact with no 0-byte file and a message naming what
could not be written, a changed data file is reported, and NaN weights are a one-line error, not a traceback."""

from __future__ import annotations

import errno

import pytest
import torch
from helpers import write_fake_medmnist
from test_bad_input import cli_error, tiny_checkpoint, tiny_model

import predict
import train


@pytest.fixture
def fitted(tmp_path):
    """A fitted logreg run on a fake AdrenalMNIST3D (seconds) and its arguments."""
    root = tmp_path / "data"
    write_fake_medmnist(root, "adrenalmnist3d", n=(16, 10, 12), seed=3)
    a = ["baselines/logreg.json", "--data.name", "adrenalmnist3d", "--data.root", str(root), "--data.download",
         "false", "--model.pool", "7", "--output.dir", str(tmp_path), "--output.name", "lr"]
    assert train.main(a) == 0
    return a, tmp_path / "lr" / "eval" / "test", root


def test_a_prediction_replaces_its_folder_as_one_unit(fitted):
    a, out, _ = fitted
    assert predict.main(a) == 0
    (csv,) = out.glob("*.csv")
    stale = out / "adrenalmnist3d_test_[AUC]0.123_[ACC]0.456@lr-epoch0.csv"  # an earlier prediction's CSV
    stale.write_text("id,score\n")
    assert predict.main(a) == 0
    assert [p.name for p in out.glob("*.csv")] == [csv.name]
    assert sorted(p.name for p in out.parent.iterdir()) == ["test"]  # no temporary folder left


def test_full_disk_names_the_file_and_keeps_the_earlier_results(fitted, monkeypatch, capsys):
    a, out, _ = fitted
    assert predict.main(a) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import medmnist

    def evaluate_on_a_full_disk(self, y_score, save_folder=None, run=None):
        (predict.Path(save_folder) / "adrenalmnist3d_test_@lr.csv").touch()  # what a full disk leaves: 0 bytes
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(medmnist.Evaluator, "evaluate", evaluate_on_a_full_disk)
    capsys.readouterr()
    message = cli_error(predict.main, a, capsys)
    assert "No space left on device" in message and "evaluator's CSV" in message and str(out) in message
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched, no 0-byte CSV
    assert sorted(p.name for p in out.parent.iterdir()) == ["test"]

    monkeypatch.undo()
    real = predict.atomic_write_bytes

    def full(data, path):
        if path.name == "predictions.npz":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(data, path)

    monkeypatch.setattr(predict, "atomic_write_bytes", full)
    message = cli_error(predict.main, a, capsys)
    assert "predictions.npz" in message and "No space left on device" in message
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_changed_data_file_is_reported(fitted, capsys):
    a, out, root = fitted
    assert predict.main(a) == 0
    assert "MD5" not in capsys.readouterr().err
    write_fake_medmnist(root, "adrenalmnist3d", n=(16, 10, 12), seed=4)  # same shapes, other voxels
    assert predict.main(a) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "MD5" in err and "trained on" in err and err.count("\n") == 1


def test_nan_weights_are_one_line(tmp_path, capsys):
    root = tmp_path / "data"
    write_fake_medmnist(root, "adrenalmnist3d", n=(4, 4, 6), seed=1)
    model = tiny_model()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    torch.save(tiny_checkpoint(model), tmp_path / "nan.pt")
    message = cli_error(predict.main, ["adrenalmnist3d.json", "--checkpoint", str(tmp_path / "nan.pt"), "--data.root",
                                       str(root), "--data.download", "false", "--output.dir", str(tmp_path)], capsys)
    assert "nan.pt gives NaN or infinite scores for 6 of 6 samples" in message
    assert not list(tmp_path.glob("**/metrics.json"))
