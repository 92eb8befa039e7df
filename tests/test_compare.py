"""tools/compare.py (paired tests between runs), the pooled CIs and --reference of tools/aggregate.py, and the
intervals predict.py writes into metrics.json."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from test_sweep import write_fake_run

from engine import stats
from tools import aggregate, compare, sweep

Y = np.r_[np.ones(30, int), np.zeros(70, int)][np.random.default_rng(0).permutation(100)]


def write_predictions(run_dir, y, p1, split="test", dataset="adrenalmnist3d", epochs=(5,)):
    folder = run_dir / "eval" / split
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "predictions.npz", y_true=y, y_score=np.stack([1 - p1, p1], 1))
    (folder / "metrics.json").write_text(json.dumps({
        "split": split.split("-")[0], "dataset": dataset, "size": 28, "epochs": list(epochs),
        "auc": roc_auc_score(y, p1), "acc": float(np.mean((p1 > 0.5) == y))}))
    return run_dir


def scorer(strength, seed, y=Y):
    rng = np.random.default_rng(seed)
    return 1 / (1 + np.exp(-(strength * (y - 0.3) + rng.normal(size=len(y)))))


def run_json(capsys, *args):
    assert compare.main([*map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_one_pair_json_against_sklearn_and_itself(tmp_path, capsys):
    a = write_predictions(tmp_path / "a", Y, scorer(2.5, 1))
    b = write_predictions(tmp_path / "b", Y, scorer(0.5, 2))
    r = run_json(capsys, a, b)
    expected = roc_auc_score(Y, scorer(2.5, 1)) - roc_auc_score(Y, scorer(0.5, 2))
    assert r["delta_auc"] == pytest.approx(expected) and r["n"] == 100
    assert r["delta_auc_ci"][0] < expected < r["delta_auc_ci"][1] and r["p_value_auc"] < 0.05
    acc = np.mean((scorer(2.5, 1) > 0.5) == Y) - np.mean((scorer(0.5, 2) > 0.5) == Y)
    assert r["delta_acc"] == pytest.approx(acc) and 0 < r["p_value_acc"] <= 1
    assert r["method"] == {"auc": "DeLong", "acc": "McNemar exact"}
    assert run_json(capsys, a, b) == r  # the bootstrap CI of ΔACC is seeded
    same = run_json(capsys, a, a)
    assert same["p_value_auc"] == 1 and same["p_value_acc"] == 1 and same["delta_auc"] == 0


def test_refuses_runs_that_did_not_score_the_same_samples(tmp_path, capsys):
    a = write_predictions(tmp_path / "a", Y, scorer(1, 1))
    order = np.random.default_rng(3).permutation(100)
    cases = {"shuffled": (write_predictions(tmp_path / "shuffled", Y[order], scorer(1, 2)[order]),
                          "not the same samples, or not in the same order"),
             "fewer": (write_predictions(tmp_path / "fewer", Y[:90], scorer(1, 2)[:90]), "different sample counts"),
             "val": (write_predictions(tmp_path / "val", Y, scorer(1, 2), split="val"), "split test vs val"),
             "other": (write_predictions(tmp_path / "other", Y, scorer(1, 2), dataset="vesselmnist3d"),
                       "dataset adrenalmnist3d vs vesselmnist3d")}
    for name, (run, message) in cases.items():
        if name == "val":  # the same folder name on both sides, different splits inside
            (run / "eval" / "val").rename(run / "eval" / "test")
        assert compare.main([str(a), str(run)]) == 2, name
        assert message in capsys.readouterr().err, name
    assert compare.main([str(a), str(tmp_path / "nothing")]) == 2
    assert "no run directory" in capsys.readouterr().err
    assert compare.main([str(a), str(tmp_path / "fewer"), "--split", "val"]) == 2
    assert "does not exist: score the run first" in capsys.readouterr().err


def test_seeds_are_paired_and_combined(tmp_path, capsys):
    deltas = []
    for seed in range(3):
        pa, pb = scorer(2.0, 10 + seed), scorer(1.0, 20 + seed)
        write_predictions(tmp_path / f"lmttm-seed{seed}", Y, pa)
        write_predictions(tmp_path / f"ttm-seed{seed}", Y, pb)
        deltas.append(roc_auc_score(Y, pa) - roc_auc_score(Y, pb))
    write_predictions(tmp_path / "ttm-seed7", Y, scorer(1.0, 99))
    r = run_json(capsys, tmp_path / "lmttm", tmp_path / "ttm")  # sweep cells
    assert [p["seed"] for p in r["pairs"]] == [0, 1, 2] and r["unpaired"] == [str(tmp_path / "ttm-seed7")]
    c = r["combined"]
    assert r["n"] == 100 and r["method"]["auc"] == "DeLong" and "delta_auc" not in r
    assert c["n_pairs"] == 3 and c["delta_auc_mean"] == pytest.approx(np.mean(deltas))
    assert c["delta_auc_std"] == pytest.approx(np.std(deltas, ddof=1))
    assert c["auc_significant"] == sum(p["p_value_auc"] < 0.05 for p in r["pairs"])
    assert run_json(capsys, str(tmp_path / "lmttm-seed*"), str(tmp_path / "ttm-seed[0-2]"))["combined"] == c
    assert compare.main([str(tmp_path / "lmttm"), str(tmp_path / "ttm")]) == 0
    text = capsys.readouterr().out
    assert f"significant (p < 0.05) in {c['auc_significant']}/3" in text and "ttm-seed7" in text
    assert compare.main([str(tmp_path / "lmttm"), str(tmp_path / "ttm"), "--level", "95"]) == 2
    assert "--level and --alpha lie between 0 and 1" in capsys.readouterr().err
    assert compare.main([str(tmp_path / "lmttm"), str(tmp_path / "lmttm-seed0")]) == 0  # 3 vs 1: seed 0 paired
    assert "combined" not in capsys.readouterr().out


def test_multiclass_uses_the_paired_bootstrap(tmp_path, capsys):
    rng = np.random.default_rng(4)
    y = np.r_[np.arange(3), rng.integers(0, 3, 87)]
    for name, strength in (("a", 3.0), ("b", 0.0)):
        logits = strength * np.eye(3)[y] + rng.normal(size=(90, 3))
        folder = tmp_path / name / "eval" / "test"
        folder.mkdir(parents=True)
        np.savez(folder / "predictions.npz", y_true=y, y_score=np.exp(logits) / np.exp(logits).sum(1, keepdims=True))
    r = run_json(capsys, tmp_path / "a", tmp_path / "b", "--resamples", "300")
    assert r["task"] == "multi-class" and r["method"]["auc"].startswith("paired stratified bootstrap")
    assert r["p_value_auc"] == pytest.approx(1 / 301) and r["delta_auc_ci"][0] > 0  # no resample reaches the null


# ----------------------------------------------------------------------------------------------------------
# tools/aggregate.py: pooled CI and --reference
# ----------------------------------------------------------------------------------------------------------

def test_aggregate_pooled_ci_and_reference(tmp_path):
    grid = {"name": "ci", "datasets": ["adrenalmnist3d"], "seeds": [0, 1],
            "variants": [{"label": "ttm", "overrides": {"model.name": "ttm"}},
                         {"label": "lmttm", "overrides": {"model.name": "lmttm"}}]}
    runs = tmp_path / "runs"
    aucs, scores = {}, {}
    for run in sweep.expand(grid):
        write_fake_run(runs / run.name, run.settings)
        p1 = scorer(3.0 if "lmttm" in run.name else 0.3, run.seed)
        write_predictions(runs / run.name, Y, p1)
        aucs[run.name] = roc_auc_score(Y, p1)
        scores[run.name] = np.stack([1 - p1, p1], 1)
    (tmp_path / "ci.json").write_text(json.dumps(grid))
    out = tmp_path / "tables"
    assert aggregate.main([str(tmp_path / "ci.json"), "--runs", str(runs), "--out", str(out), "--reference", "ttm",
                           "--ci-resamples", "500"]) == 0
    with open(out / "table.csv") as f:
        rows = {r["cell"]: r for r in csv.DictReader(f)}
    lm = rows["adrenalmnist3d-lmttm"]
    mean = np.mean([aucs["adrenalmnist3d-lmttm-seed0"], aucs["adrenalmnist3d-lmttm-seed1"]])
    assert float(lm["auc_ci_low"]) < mean < float(lm["auc_ci_high"])
    # the wiring: both seeds' predictions, on shared resamples (engine/stats.py is tested in test_stats.py)
    both = [scores[f"adrenalmnist3d-lmttm-seed{s}"] for s in (0, 1)]
    expected = stats.confidence_intervals(Y, both, "binary-class", n_resamples=500)
    assert [float(lm["auc_ci_low"]), float(lm["auc_ci_high"])] == pytest.approx(expected["auc"], abs=1e-6)
    deltas = [aucs[f"adrenalmnist3d-lmttm-seed{s}"] - aucs[f"adrenalmnist3d-ttm-seed{s}"] for s in (0, 1)]
    assert float(lm["ref_delta_auc_mean"]) == pytest.approx(np.mean(deltas), abs=1e-6)
    assert lm["ref_auc_significant"] == "2" and lm["ref_pairs"] == "2"
    assert rows["adrenalmnist3d-ttm"]["ref_delta_auc_mean"] == ""  # the reference itself
    md = (out / "table.md").read_text()
    assert "AUC pooled CI" in md and "ΔAUC vs ttm (p<0.05)" in md and "(2/2)" in md and "pooled CI:" in md
    assert aggregate.main([str(tmp_path / "ci.json"), "--runs", str(runs), "--out", str(out), "--reference",
                           "resnet"]) == 2


# ----------------------------------------------------------------------------------------------------------
# predict.py: auc_ci / acc_ci in metrics.json
# ----------------------------------------------------------------------------------------------------------

def test_predict_writes_intervals_and_of_the_last_k_mean(tmp_path, capsys):
    import predict
    import train
    from test_engine import tiny

    quiet = tiny(tmp_path, "--output.plots", "false")
    assert train.main(["demo.json", *quiet, "--train.keep_last_k", "2"]) == 0
    assert predict.main(["demo.json", *quiet, "--eval.ci_resamples", "400"]) == 0
    assert "(95% bootstrap intervals)" in capsys.readouterr().out
    result = json.loads((tmp_path / "run" / "eval" / "test" / "metrics.json").read_text())
    assert result["auc_ci"][0] <= result["auc"] <= result["auc_ci"][1]
    assert result["acc_ci"][0] <= result["acc"] <= result["acc_ci"][1] and result["ci"]["resamples"] == 400
    assert predict.main(["demo.json", *quiet, "--last-k", "2", "--eval.ci_resamples", "400"]) == 0
    last = json.loads((tmp_path / "run" / "eval" / "test-last2" / "metrics.json").read_text())
    assert last["auc_ci"][0] <= last["auc"] <= last["auc_ci"][1]
    printed = capsys.readouterr().out
    assert f"AUC {last['auc']:.4f} [{last['auc_ci'][0]:.4f}, {last['auc_ci'][1]:.4f}]" in printed
    assert predict.main(["demo.json", *quiet, "--eval.ci_resamples", "0"]) == 0
    assert "auc_ci" not in json.loads((tmp_path / "run" / "eval" / "test" / "metrics.json").read_text())
