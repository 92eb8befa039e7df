"""The scikit-learn baselines (`logreg`, `hgb`) through train.py / predict.py: outputs, model selection on the
validation split only (checked against a hand-written pipeline), binary and multi-class tasks, the official
evaluator's CSV, config errors, refused estimator files, reruns."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import write_fake_medmnist

import predict
import train
from engine.checkpoint import CheckpointError
from engine.config import ConfigError

REPO = Path(__file__).resolve().parent.parent
HGB_TINY = ["--model.max_iter", "15", "--model.n_iter_no_change", "5", "--model.min_samples_leaf", "5"]


def args(tmp_path, name, *extra, root=None):
    out = ["--output.dir", str(tmp_path), "--output.name", name, *extra]
    if root is not None:
        out += ["--data.root", str(root), "--data.download", "false"]
    return out


def summary(run: Path) -> dict:
    return json.loads((run / "train_summary.json").read_text())


def rescore_csv(out: Path, name: str, split: str, root: Path, monkeypatch):
    import medmnist.evaluator as ev

    (csv,) = out.glob(f"{name}_{split}_*.csv")
    monkeypatch.setattr(ev.Evaluator.__init__, "__defaults__", (None, str(root)))  # parse_and_evaluate's root
    return ev.Evaluator.parse_and_evaluate(str(csv), run="rescored")


def pooled_by_hand(images: np.ndarray, pool: int) -> np.ndarray:
    n, s = images.shape[0], images.shape[1] // pool
    x = images.astype(np.float64).reshape(n, s, pool, s, pool, s, pool) / 255.0
    return x.mean(axis=(2, 4, 6)).reshape(n, -1)


# ----------------------------------------------------------------------------------------------------------

def test_logreg_synthetic_end_to_end_and_rerun(tmp_path, capsys):
    a = args(tmp_path, "lr", "--data.name", "synthetic3d", "--model.pool", "4", "--train.epochs", "7")
    assert train.main(["baselines/logreg.json", *a]) == 0
    out = capsys.readouterr().out
    assert out.count("only train.seed is used") == 1  # the ignored train.* keys, said once
    run = tmp_path / "lr"
    assert {p.name for p in run.iterdir()} >= {"config.json", "model.npz", "train_summary.json"}
    assert not (run / "last.pt").exists() and not (run / "best.pt").exists()
    s = summary(run)
    assert s["finished"] is True and s["epochs"] == s["best_epoch"] == 1
    assert s["selection"]["chosen"]["C"] in [0.0001, 0.001, 0.01, 0.1, 1.0]
    assert s["best_val_auc"] == max(r["val_auc"] for r in s["selection"]["curve"])
    assert s["param_count"] == 3 * 7**3 + 3  # multinomial coefficients + intercepts
    assert json.loads((run / "config.json").read_text())["model"]["name"] == "logreg"

    assert predict.main(["baselines/logreg.json", *a]) == 0
    result = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    pred = np.load(run / "eval" / "test" / "predictions.npz")
    assert pred["y_score"].shape == (60, 3) and result["n_samples"] == 60
    np.testing.assert_allclose(pred["y_score"].sum(1), 1, atol=1e-6)
    from medmnist.evaluator import getACC, getAUC
    assert result["auc"] == pytest.approx(getAUC(pred["y_true"], pred["y_score"], "multi-class"), abs=1e-12)
    assert result["acc"] == pytest.approx(getACC(pred["y_true"], pred["y_score"], "multi-class"), abs=1e-12)
    assert result["auc"] > 0.7  # the synthetic classes are learnable from pooled voxels

    # the validation split scored by predict.py is the score the model was chosen by
    assert predict.main(["baselines/logreg.json", *a, "--split", "val"]) == 0
    val = json.loads((run / "eval" / "val" / "metrics.json").read_text())
    assert val["auc"] == pytest.approx(s["best_val_auc"], abs=1e-12)

    # rerunning a finished run does nothing; another config on it is refused; removing the summary refits
    mtime = (run / "model.npz").stat().st_mtime_ns
    capsys.readouterr()
    assert train.main(["baselines/logreg.json", *a]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (run / "model.npz").stat().st_mtime_ns == mtime
    with pytest.raises(CheckpointError, match="another config.*model"):
        train.main(["baselines/logreg.json", *a, "--model.max_iter", "50"])
    (run / "train_summary.json").unlink()  # as after a kill before the commit: the rerun fits again
    assert train.main(["baselines/logreg.json", *a]) == 0
    assert summary(run)["best_val_auc"] == s["best_val_auc"]  # deterministic


def test_hgb_synthetic_early_stopping_on_validation(tmp_path):
    a = args(tmp_path, "hgb", "--data.name", "synthetic3d", "--model.pool", "4", *HGB_TINY)
    assert train.main(["baselines/hgb.json", *a]) == 0
    run = tmp_path / "hgb"
    s = summary(run)
    curve = s["selection"]["val_auc_per_iteration"]
    best = s["selection"]["chosen"]["n_iter"]
    assert 1 <= best <= len(curve) <= 15
    assert best == int(np.argmax(curve)) + 1  # the first iteration count with the best validation AUC
    assert s["best_val_auc"] == pytest.approx(curve[best - 1], abs=1e-6)
    # growth stopped by the rule: either the cap, or n_iter_no_change iterations without improvement
    assert len(curve) == 15 or len(curve) - best >= 5
    # the saved model is the one of `best` iterations: predict.py's validation AUC is the recorded one
    assert predict.main(["baselines/hgb.json", *a, "--split", "val"]) == 0
    val = json.loads((run / "eval" / "val" / "metrics.json").read_text())
    assert val["auc"] == pytest.approx(s["best_val_auc"], abs=1e-12)
    assert predict.main(["baselines/hgb.json", *a]) == 0
    assert np.load(run / "eval" / "test" / "predictions.npz")["y_score"].shape == (60, 3)
    # seeded: the same seed gives the same model
    b = args(tmp_path, "hgb2", "--data.name", "synthetic3d", "--model.pool", "4", *HGB_TINY)
    assert train.main(["baselines/hgb.json", *b]) == 0
    assert summary(tmp_path / "hgb2")["selection"] == s["selection"]


def test_logreg_binary_matches_a_hand_written_pipeline_and_the_official_csv(tmp_path, monkeypatch):
    """Features, choice of C and test scores against numpy pooling + sklearn by hand; the evaluator's CSV
    re-scores to metrics.json."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    root = tmp_path / "data"
    path = write_fake_medmnist(root, "adrenalmnist3d", n=(40, 20, 20), seed=3)
    grid = [0.001, 0.01, 0.1, 1.0, 10.0]
    a = args(tmp_path, "adrenal", "--model.pool", "2", "--model.c_grid", json.dumps(grid), root=root)
    with pytest.warns(UserWarning, match="differ from the official"):
        assert train.main(["baselines/logreg.json", *a]) == 0
    assert predict.main(["baselines/logreg.json", *a]) == 0
    run = tmp_path / "adrenal"

    d = np.load(path)
    x = {s: pooled_by_hand(d[f"{s}_images"], 2) for s in ("train", "val", "test")}
    y = {s: d[f"{s}_labels"].ravel() for s in ("train", "val", "test")}
    mean, std = x["train"].mean(0), x["train"].std(0)
    std[std == 0] = 1.0
    z = {s: (v - mean) / std for s, v in x.items()}
    fits = {c: LogisticRegression(C=c, max_iter=2000).fit(z["train"], y["train"]) for c in grid}
    val_auc = {c: roc_auc_score(y["val"], m.predict_proba(z["val"])[:, 1]) for c, m in fits.items()}
    best = max(val_auc.values())
    chosen = min(c for c in grid if val_auc[c] == best)
    assert len(set(val_auc.values())) > 1, "the test needs a validation curve that is not flat"
    s = summary(run)
    assert s["selection"]["chosen"]["C"] == chosen
    assert [r["val_auc"] for r in s["selection"]["curve"]] == pytest.approx([val_auc[c] for c in grid], abs=1e-9)
    pred = np.load(run / "eval" / "test" / "predictions.npz")
    np.testing.assert_allclose(pred["y_score"], fits[chosen].predict_proba(z["test"]), atol=1e-6)

    result = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    assert result["auc"] == pytest.approx(roc_auc_score(y["test"], pred["y_score"][:, 1]), abs=1e-12)
    rescored = rescore_csv(run / "eval" / "test", "adrenalmnist3d", "test", root, monkeypatch)
    assert rescored.AUC == pytest.approx(result["auc"], abs=1e-9)
    assert rescored.ACC == pytest.approx(result["acc"], abs=1e-9)


def test_only_the_validation_split_chooses_C(tmp_path):
    """Another test split leaves the choice (and the whole validation curve) unchanged; another
    validation split (here: its labels flipped, which turns every AUC a into 1 - a) changes it."""
    base = tmp_path / "base"
    path = write_fake_medmnist(base, "adrenalmnist3d", n=(40, 20, 20), seed=5)
    d = dict(np.load(path))
    grid = json.dumps([0.0001, 0.01, 1.0, 100.0])

    def variant(name, **changes):
        root = tmp_path / name
        root.mkdir()
        np.savez_compressed(root / path.name, **{**d, **changes})
        a = args(tmp_path, f"run-{name}", "--model.pool", "2", "--model.c_grid", grid, root=root)
        with pytest.warns(UserWarning, match="differ from the official"):
            assert train.main(["baselines/logreg.json", *a]) == 0
        return summary(tmp_path / f"run-{name}")["selection"]

    rng = np.random.default_rng(9)
    same = variant("same")
    new_test = variant("test", test_images=rng.integers(0, 256, d["test_images"].shape, dtype=np.uint8),
                       test_labels=1 - d["test_labels"])
    assert new_test["curve"] == same["curve"] and new_test["chosen"] == same["chosen"]
    aucs = [r["val_auc"] for r in same["curve"]]
    assert max(aucs) > min(aucs), "the test needs a validation curve that is not flat"
    flipped = variant("val", val_labels=1 - d["val_labels"])
    assert [r["val_auc"] for r in flipped["curve"]] == pytest.approx([1 - a for a in aucs], abs=1e-12)
    assert flipped["chosen"] != same["chosen"]


@pytest.mark.parametrize("model", ["logreg", "hgb"])
def test_multiclass_organ_eleven_classes(tmp_path, monkeypatch, model):
    root = tmp_path / "data"
    write_fake_medmnist(root, "organmnist3d", n=(44, 22, 22))
    extra = HGB_TINY if model == "hgb" else ["--model.c_grid", "[0.01, 1.0]"]
    a = args(tmp_path, "organ", "--data.name", "organmnist3d", "--model.pool", "7", *extra, root=root)
    with pytest.warns(UserWarning, match="differ from the official"):
        assert train.main([f"baselines/{model}.json", *a]) == 0
        assert predict.main([f"baselines/{model}.json", *a]) == 0
    out = tmp_path / "organ" / "eval" / "test"
    pred = np.load(out / "predictions.npz")
    assert pred["y_score"].shape == (22, 11)
    np.testing.assert_allclose(pred["y_score"].sum(1), 1, atol=1e-6)
    result = json.loads((out / "metrics.json").read_text())
    rescored = rescore_csv(out, "organmnist3d", "test", root, monkeypatch)
    assert rescored.AUC == pytest.approx(result["auc"], abs=1e-9)
    assert rescored.ACC == pytest.approx(result["acc"], abs=1e-9)


def test_estimator_files_train_py_did_not_write_are_refused(tmp_path):
    a = args(tmp_path, "one", "--data.name", "synthetic3d", "--model.pool", "7")
    assert train.main(["baselines/logreg.json", *a]) == 0
    b = args(tmp_path, "two", "--data.name", "synthetic3d", "--model.pool", "7", "--model.c_grid", "[1.0]")
    assert train.main(["baselines/logreg.json", *b]) == 0
    one, two = tmp_path / "one" / "model.npz", tmp_path / "two" / "model.npz"
    original = one.read_bytes()

    one.write_bytes(original + b"\0")  # altered
    with pytest.raises(CheckpointError, match="not the estimator train.py saved"):
        predict.main(["baselines/logreg.json", *a])
    with pytest.raises(CheckpointError, match="not the estimator train.py saved"):
        train.main(["baselines/logreg.json", *a])  # a rerun does not pass over it silently either
    one.write_bytes(two.read_bytes())  # a valid estimator, but not this run's
    with pytest.raises(CheckpointError, match="not the estimator train.py saved"):
        predict.main(["baselines/logreg.json", *a])
    one.write_bytes(original)
    (tmp_path / "one" / "train_summary.json").unlink()  # no record: not loaded
    with pytest.raises(CheckpointError, match="no finished train_summary.json"):
        predict.main(["baselines/logreg.json", *a])
    # the CLI: exit 2, one line
    done = subprocess.run([sys.executable, "predict.py", "baselines/logreg.json", *b, "--last-k", "2"],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "no epoch checkpoints" in done.stderr


def test_bad_estimator_options_are_config_errors(tmp_path):
    done = subprocess.run([sys.executable, "train.py", "baselines/logreg.json", "--model.c_grid", "[0.1, 0]",
                           *args(tmp_path, "bad")], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "every C must be > 0" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ConfigError, match="c_grid is empty"):
        train.main(["baselines/logreg.json", "--model.c_grid", "[]", *args(tmp_path, "bad")])
    with pytest.raises(ConfigError, match="unknown key model.dim"):
        train.main(["baselines/hgb.json", "--model.dim", "64", *args(tmp_path, "bad")])
    with pytest.raises(ConfigError, match="learning_rate = 2.0 is above its maximum"):
        train.main(["baselines/hgb.json", "--model.learning_rate", "2", *args(tmp_path, "bad")])
    with pytest.raises(ConfigError, match="pool = 3 does not divide the volume side 28"):
        train.main(["baselines/hgb.json", "--data.name", "synthetic3d", "--model.pool", "3", *args(tmp_path, "bad")])
    assert not (tmp_path / "bad").exists()  # nothing written for a bad config
