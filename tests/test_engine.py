"""train.py and predict.py end to end on tiny configs: outputs, resume, errors, official evaluation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from helpers import write_fake_medmnist

import predict
import train
from engine import saver
from engine.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parent.parent
TINY = ["--model.dim", "16", "--model.memory_tokens", "16", "--model.heads", "2", "--train.batch_size", "16",
        "--eval.batch_size", "32", "--train.lr", "0.001"]


def tiny(tmp_path, *extra, name="run", epochs=2):
    return [*TINY, "--train.epochs", str(epochs), "--output.dir", str(tmp_path), "--output.name", name, *extra]


def test_cli_train_then_predict(tmp_path):
    """The way users call it: a subprocess per script, one epoch, outputs on disk."""
    args = tiny(tmp_path, epochs=1)
    for script in ("train.py", "predict.py"):
        done = subprocess.run([sys.executable, script, "demo.json", *args], cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} >= {"config.json", "metrics.csv", "last.pt", "best.pt",
                                              "train_summary.json", "eval"}
    metrics = pd.read_csv(run / "metrics.csv")
    assert list(metrics.columns) == saver.METRICS_HEADER and len(metrics) == 1
    result = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    predictions = np.load(run / "eval" / "test" / "predictions.npz")
    y, score = predictions["y_true"].ravel(), predictions["y_score"]
    assert score.shape == (60, 3) and result["n_samples"] == 60
    np.testing.assert_allclose(score.sum(1), 1, atol=1e-5)
    # the reported numbers are the multi-class MedMNIST metrics of the saved scores (one-vs-rest AUC, argmax ACC)
    assert result["auc"] == pytest.approx(np.mean([roc_auc_score(y == k, score[:, k]) for k in range(3)]))
    assert result["acc"] == pytest.approx(np.mean(score.argmax(1) == y))
    ckpt = load_checkpoint(run / "best.pt")
    assert {"model", "optimizer", "epoch", "best_val_auc", "config", "versions", "dataset"} <= set(ckpt)
    assert ckpt["config"]["model"]["dim"] == 16 and ckpt["versions"]["torch"]


def test_rerun_of_a_finished_run_does_nothing(tmp_path, capsys):
    assert train.main(["demo.json", *tiny(tmp_path, epochs=1)]) == 0
    mtime = (tmp_path / "run" / "last.pt").stat().st_mtime_ns
    assert train.main(["demo.json", *tiny(tmp_path, epochs=1)]) == 0
    assert "already finished" in capsys.readouterr().out
    assert (tmp_path / "run" / "last.pt").stat().st_mtime_ns == mtime


def test_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path, monkeypatch):
    assert train.main(["demo.json", *tiny(tmp_path, name="straight", epochs=3)]) == 0

    real_epoch, calls = train.train_one_epoch, []

    def interrupt_third_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", interrupt_third_epoch)
    assert train.main(["demo.json", *tiny(tmp_path, name="resumed", epochs=3)]) == 130
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 2
    monkeypatch.setattr(train, "train_one_epoch", real_epoch)
    assert train.main(["demo.json", *tiny(tmp_path, name="resumed", epochs=3)]) == 0

    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert a["epoch"] == b["epoch"] == 3
    for key, value in a["model"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b["model"][key]), key
    assert pd.read_csv(tmp_path / "resumed" / "metrics.csv")["epoch"].tolist() == [1, 2, 3]
    straight = pd.read_csv(tmp_path / "straight" / "metrics.csv")
    resumed = pd.read_csv(tmp_path / "resumed" / "metrics.csv")
    assert straight["train_loss"].tolist() == resumed["train_loss"].tolist()


def test_resume_refuses_another_config(tmp_path, capsys):
    assert train.main(["demo.json", *tiny(tmp_path, epochs=1)]) == 0
    with pytest.raises(Exception, match=r"trained with another config .*model\.dim: 16 -> 24"):
        train.main(["demo.json", *tiny(tmp_path, "--model.dim", "24", epochs=2)])


def test_restart_keeps_the_old_run(tmp_path):
    assert train.main(["demo.json", *tiny(tmp_path, epochs=1)]) == 0
    assert train.main(["demo.json", *tiny(tmp_path, "--restart", epochs=1)]) == 0
    assert len(list(tmp_path.glob("run.old-*"))) == 1 and (tmp_path / "run" / "best.pt").exists()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real_loss, calls = train.task_loss, []

    def nan_in_second_epoch(logits, y, **kwargs):
        calls.append(1)
        loss = real_loss(logits, y, **kwargs)
        return loss * float("nan") if len(calls) > 15 else loss  # 15 batches per epoch

    monkeypatch.setattr(train, "task_loss", nan_in_second_epoch)
    assert train.main(["demo.json", *tiny(tmp_path, epochs=3)]) == 3
    assert "loss became nan in epoch 2" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1


def test_missing_dataset_file_exits_with_instructions(tmp_path):
    done = subprocess.run([sys.executable, "train.py", "adrenalmnist3d.json", *tiny(tmp_path),
                           "--data.root", str(tmp_path / "data"), "--data.download", "false"],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2
    assert "bbd3c5a5576322bc4cdfea780653b1ce" in done.stderr and "zenodo" in done.stderr
    assert str(tmp_path / "data" / "adrenalmnist3d.npz") in done.stderr
    assert not (tmp_path / "data" / "adrenalmnist3d.npz").exists()


def test_bad_config_exits_2(tmp_path):
    done = subprocess.run([sys.executable, "train.py", "demo.json", "--train.epoch", "1"], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 2 and "did you mean 'epochs'" in done.stderr


def test_medmnist_run_official_csv_and_refused_checkpoint(tmp_path, monkeypatch):
    """On a MedMNIST-format file: the evaluator's CSV re-scores to metrics.json; another dataset is refused."""
    root = tmp_path / "data"
    write_fake_medmnist(root, "adrenalmnist3d", n=(32, 16, 24))
    data = ["--data.root", str(root)]
    with pytest.warns(UserWarning, match="differ from the official adrenalmnist3d sizes"):
        assert train.main(["adrenalmnist3d.json", *tiny(tmp_path, *data, name="adrenal", epochs=1)]) == 0
    assert predict.main(["adrenalmnist3d.json", *tiny(tmp_path, *data, name="adrenal")]) == 0
    out = tmp_path / "adrenal" / "eval" / "test"
    result = json.loads((out / "metrics.json").read_text())
    (csv,) = out.glob("adrenalmnist3d_test_*.csv")

    import medmnist.evaluator as ev
    monkeypatch.setattr(ev.Evaluator.__init__, "__defaults__", (None, str(root)))  # parse_and_evaluate's root
    rescored = ev.Evaluator.parse_and_evaluate(str(csv), run="rescored")
    assert rescored.AUC == pytest.approx(result["auc"], abs=1e-9)
    assert rescored.ACC == pytest.approx(result["acc"], abs=1e-9)
    assert result["n_samples"] == 24  # full split, nothing dropped

    # a checkpoint trained on another dataset (synthetic3d, 3 classes) is refused with both names
    assert train.main(["demo.json", *tiny(tmp_path, name="synthetic", epochs=1)]) == 0
    with pytest.raises(Exception, match=r"trained on synthetic3d \(28³, 3 classes\) but the config names "
                                        r"adrenalmnist3d \(28³, 2 classes\)"):
        predict.main(["adrenalmnist3d.json", *tiny(tmp_path, *data, name="adrenal"),
                      "--checkpoint", str(tmp_path / "synthetic" / "best.pt")])


def test_last_k_protocol_is_a_mean_over_k(tmp_path):
    assert train.main(["demo.json", *tiny(tmp_path, "--train.keep_last_k", "2", epochs=3)]) == 0
    assert sorted(p.name for p in (tmp_path / "run").glob("epoch_*.pt")) == ["epoch_0002.pt", "epoch_0003.pt"]
    assert predict.main(["demo.json", *tiny(tmp_path), "--last-k", "2"]) == 0
    result = json.loads((tmp_path / "run" / "eval" / "test-last2" / "metrics.json").read_text())
    assert result["epochs"] == [2, 3]
    assert result["auc"] == pytest.approx(sum(r["auc"] for r in result["per_checkpoint"]) / 2)
    assert not (tmp_path / "run" / "eval" / "test").exists()  # the MedMNIST-protocol folder is not touched
    with pytest.raises(Exception, match=r"needs the last 3 epoch checkpoints .*epochs 1\.\.3.*epoch_0001.pt is missing"):
        predict.main(["demo.json", *tiny(tmp_path), "--last-k", "3"])


def test_predict_scores_with_the_amp_setting_of_the_checkpoint(tmp_path, monkeypatch):
    """Validation during training and test scoring use the same numerics: predict.py takes train.amp from the
    checkpoint's config, not from its own command line."""
    assert train.main(["demo.json", *tiny(tmp_path, "--train.amp", "true", epochs=1)]) == 0
    seen, real = [], predict.predict_scores

    def spy(*args, **kwargs):
        seen.append(kwargs.get("amp"))
        return real(*args, **kwargs)

    monkeypatch.setattr(predict, "predict_scores", spy)
    assert predict.main(["demo.json", *tiny(tmp_path), "--train.amp", "false"]) == 0
    assert seen == [True]
