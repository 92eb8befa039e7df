"""train.seeds (engine/ensemble.py): the seeds of one config trained as one batched model.

Checked against the single runs themselves (`--train.seed s` alone, the independent reference): with dropout 0
and noise `none` every member's weights, optimizer state and records equal its single run's (float rounding);
a kill inside the commit of an epoch resumes to the uninterrupted ensemble's weights; a member whose loss
becomes NaN stops alone; unsupported models are refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import write_fake_medmnist

import train
from engine import ensemble
from engine.checkpoint import load_checkpoint
from engine.config import ConfigError
from engine.rundir import FAULTS, SimulatedKill
from model.lmttm import LMTTM
from model.processor import TransformerProcessor
from model.ttm import TTM

pytestmark = pytest.mark.filterwarnings("ignore:.*differ from the official", "ignore:.*batching rule")
TINY = ["--model.dim", "8", "--model.memory_tokens", "8", "--model.heads", "2", "--model.read_tokens", "4",
        "--train.batch_size", "8", "--eval.batch_size", "16", "--train.lr", "0.01", "--output.plots", "false"]
EXACT = ["--model.dropout", "0", "--model.noise", "none", "--train.grad_clip", "0.5"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_fake_medmnist(root, "adrenalmnist3d", n=(20, 16, 8))
    return root


@pytest.fixture(autouse=True)
def no_faults():
    FAULTS.reset()
    yield
    FAULTS.reset()


def args(data_root, out, name, epochs=2, *extra):
    return ["adrenalmnist3d.json", *TINY, "--data.root", str(data_root), "--train.epochs", str(epochs),
            "--output.dir", str(out), "--output.name", name, *extra]


def assert_close(a, b, where, exact=False):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b) if exact else torch.allclose(a, b, rtol=1e-4, atol=1e-5), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_close(a[k], b[k], f"{where}.{k}", exact)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{where}[{i}]", exact)
    else:
        assert a == b, where


def without_key_bias(weights: dict) -> dict:
    """The weights less the attention's key bias: it adds a constant to each query's logits, which the softmax
    removes, so its gradient is float rounding noise that Adam's normalisation turns into steps of size lr
    (it differs between any two summation orders, e.g. with another thread count)."""
    out = dict(weights)
    for name, value in weights.items():
        if name.endswith("self_attn.in_proj_bias"):
            dim = value.numel() // 3
            out[name] = torch.cat([value[:dim], value[2 * dim:]])
    return out


@pytest.mark.parametrize("model,fast", [("lmttm", True), ("lmttm", False), ("ttm", True), ("ttm", False)])
def test_members_equal_their_single_runs(data_root, tmp_path, monkeypatch, model, fast):
    for cls in (LMTTM, TTM, TransformerProcessor):
        monkeypatch.setattr(cls, "fast_path", fast)
    extra = ("--model.name", model, *EXACT, "--train.keep_last_k", "1")
    assert train.main(args(data_root, tmp_path, "cell", 2, *extra, "--train.seeds", "[0, 5]")) == 0
    for seed in (0, 5):
        assert train.main(args(data_root, tmp_path / "single", f"cell-seed{seed}", 2, *extra,
                               "--train.seed", str(seed))) == 0
        mine, theirs = tmp_path / f"cell-seed{seed}", tmp_path / "single" / f"cell-seed{seed}"
        assert sorted(p.name for p in mine.iterdir()) == sorted(p.name for p in theirs.iterdir())
        a, b = load_checkpoint(mine / "last.pt"), load_checkpoint(theirs / "last.pt")
        assert_close(without_key_bias(a["model"]), without_key_bias(b["model"]), f"seed {seed} weights")
        assert_close(a["optimizer"], b["optimizer"], f"seed {seed} optimizer")
        assert (a["epoch"], a["best_epoch"], a["param_count"]) == (b["epoch"], b["best_epoch"], b["param_count"])
        ma, mb = pd.read_csv(mine / "metrics.csv"), pd.read_csv(theirs / "metrics.csv")
        pd.testing.assert_frame_equal(ma.drop(columns="time_s"), mb.drop(columns="time_s"), atol=1e-4)
        ca, cb = (json.loads((p / "config.json").read_text()) for p in (mine, theirs))
        ca["output"].pop("dir"), cb["output"].pop("dir")
        assert ca == cb and ca["train"]["seed"] == seed and ca["train"]["seeds"] is None
        assert json.loads((mine / "train_summary.json").read_text())["finished"]
    # the two members differ (own initialisation and data order)
    w0, w5 = (load_checkpoint(tmp_path / f"cell-seed{s}" / "last.pt")["model"]["head.weight"] for s in (0, 5))
    assert not torch.allclose(w0, w5)


def last_states(out: Path, seeds=(0, 5)) -> dict:
    runs = {}
    for seed in seeds:
        run = out / f"cell-seed{seed}"
        last = load_checkpoint(run / "last.pt")
        metrics = pd.read_csv(run / "metrics.csv").drop(columns="time_s")
        runs[seed] = {"model": last["model"], "optimizer": last["optimizer"], "rng": last["rng"],
                      "best": load_checkpoint(run / "best.pt")["model"], "metrics": metrics.to_dict("list"),
                      "leftovers": sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp"))}
    return runs


def test_resume_after_a_kill_equals_the_uninterrupted_run(data_root, tmp_path, monkeypatch):
    """Dropout and noise on (the default): a kill inside an epoch's training, and one between the members'
    renames of last.pt, resume to exactly the weights of the uninterrupted ensemble."""
    seeds = ("--train.seeds", "[0, 5]")
    assert train.main(args(data_root, tmp_path / "straight", "cell", 2, *seeds)) == 0
    reference = last_states(tmp_path / "straight")
    renames = [point for point, name, stage in FAULTS.log if name == "last.pt" and stage == "replaced"]
    assert len(renames) == 4  # 2 epochs x 2 members

    calls = {"n": 0}
    real = ensemble.member_losses

    def killed_in_epoch_2(logits, y):
        calls["n"] += 1
        if calls["n"] == 5:  # step 2 of epoch 2 (3 steps per epoch)
            raise SimulatedKill("kill in the middle of epoch 2")
        return real(logits, y)

    monkeypatch.setattr(ensemble, "member_losses", killed_in_epoch_2)
    with pytest.raises(SimulatedKill):
        train.main(args(data_root, tmp_path / "mid", "cell", 2, *seeds))
    monkeypatch.setattr(ensemble, "member_losses", real)
    assert train.main(args(data_root, tmp_path / "mid", "cell", 2, *seeds)) == 0
    assert_close(last_states(tmp_path / "mid"), reference, "kill mid-epoch", exact=True)

    FAULTS.reset(at=renames[2])  # epoch 2: member 0's last.pt renamed, member 5's not yet
    with pytest.raises(SimulatedKill):
        train.main(args(data_root, tmp_path / "commit", "cell", 2, *seeds))
    FAULTS.reset()
    epochs = [load_checkpoint(tmp_path / "commit" / f"cell-seed{s}" / "last.pt")["epoch"] for s in (0, 5)]
    assert epochs == [2, 1]
    assert train.main(args(data_root, tmp_path / "commit", "cell", 2, *seeds)) == 0
    assert_close(last_states(tmp_path / "commit"), reference, "kill between the renames", exact=True)


def test_a_member_with_a_nan_loss_stops_alone(data_root, tmp_path, monkeypatch):
    real = ensemble.member_losses
    calls = {"n": 0}

    def nan_for_seed_5_in_epoch_2(logits, y):
        calls["n"] += 1
        losses = real(logits, y)
        if calls["n"] == 4:  # step 1 of epoch 2; seed 5 is member 1
            losses = losses * torch.tensor([1.0, float("nan")])
        return losses

    monkeypatch.setattr(ensemble, "member_losses", nan_for_seed_5_in_epoch_2)
    extra = ("--train.seeds", "[0, 5]", *EXACT)
    assert train.main(args(data_root, tmp_path, "cell", 3, *extra)) == 3
    good, bad = tmp_path / "cell-seed0", tmp_path / "cell-seed5"
    assert json.loads((good / "train_summary.json").read_text())["epochs"] == 3
    assert not (good / ensemble.DIVERGED).exists()
    assert not (bad / "train_summary.json").exists()
    note = json.loads((bad / ensemble.DIVERGED).read_text())
    assert note["seed"] == 5 and note["epoch"] == 2 and note["committed_epoch"] == 1 and "nan" in note["error"]
    last = load_checkpoint(bad / "last.pt")
    assert last["epoch"] == 1 and all(torch.isfinite(v).all() for v in last["model"].values()
                                      if isinstance(v, torch.Tensor))
    # the other member went on as if alone: it equals its single run
    monkeypatch.setattr(ensemble, "member_losses", real)
    assert train.main(args(data_root, tmp_path / "single", "cell-seed0", 3, *EXACT, "--train.seed", "0")) == 0
    assert_close(without_key_bias(load_checkpoint(good / "last.pt")["model"]),
                 without_key_bias(load_checkpoint(tmp_path / "single" / "cell-seed0" / "last.pt")["model"]), "seed 0")


@pytest.mark.parametrize("extra,words", [(("--model.name", "resnet18_3d"), ["resnet18_3d", "BatchNorm"]),
                                         (("--model.stem", "3dBN"), ["3dBN", "BatchNorm"]),
                                         (("--model.name", "medmamba3d"), ["medmamba3d", "autograd.Function"]),
                                         (("--model.name", "logreg"), ["logreg", "scikit-learn"])])
def test_unsupported_models_are_refused_by_name(data_root, tmp_path, extra, words):
    with pytest.raises(ConfigError) as err:
        train.main(["adrenalmnist3d.json", "--data.root", str(data_root), "--output.dir", str(tmp_path),
                    "--train.seeds", "[0, 1]", *extra])
    for word in words:
        assert word in str(err.value)
    assert not any(tmp_path.iterdir())  # nothing written


def test_sweep_batch_seeds_trains_a_cell_in_one_process(data_root, tmp_path, monkeypatch):
    import predict
    from tools import seed_batches, sweep

    monkeypatch.chdir(Path(train.__file__).parent)  # the sweep's commands are relative to the repository
    overrides = {key[2:]: json.loads(value) for key, value in zip(TINY[::2], TINY[1::2])}
    grid = {"name": "tiny", "datasets": ["adrenalmnist3d"], "seeds": [0, 5],
            "overrides": {**overrides, "train.epochs": 1, "model.dropout": 0.0},
            "axes": {"model.name": ["lmttm", "ttm"]}}
    (tmp_path / "grid.json").write_text(json.dumps(grid))
    calls = []

    def in_process(cmd, cwd, log_path, env=None):
        calls.append(cmd[1:])
        script = {"train.py": train.main, "predict.py": predict.main}[cmd[1]]
        return script(cmd[2:])

    runs = sweep.validate_grid(grid)
    assert [[r.name for r in g] for g in seed_batches.seed_groups(runs)] == [
        ["adrenalmnist3d-lmttm-seed0", "adrenalmnist3d-lmttm-seed5"], ["adrenalmnist3d-ttm-seed0", "adrenalmnist3d-ttm-seed5"]]
    out = tmp_path / "out"
    rc = sweep.main([str(tmp_path / "grid.json"), "--out", str(out), "--batch-seeds",
                     "--override", f"data.root={data_root}"], runner=in_process)
    assert rc == 0
    trains = [c for c in calls if c[0] == "train.py"]
    assert len(trains) == 2 and all("--train.seeds" in c and "--train.seed" not in c for c in trains)
    assert trains[0][trains[0].index("--train.seeds") + 1] == "[0, 5]"
    assert sum(c[0] == "predict.py" for c in calls) == 4
    for run in runs:
        assert sweep.is_finished(out / run.name), run.name
    assert sweep.main([str(tmp_path / "grid.json"), "--out", str(out), "--batch-seeds",
                       "--override", f"data.root={data_root}"], runner=in_process) == 0
    assert len(calls) == 6  # finished: nothing trained or predicted again


def test_members_train_into_the_folders_of_their_single_runs():
    """Without --output.name a member's folder is the one `--train.seed s` alone names (engine/runname.py);
    with it, <name>-seed<s> (the sweep's run names)."""
    from engine.config import load_config
    from engine.ensemble import member_run_dirs

    both = ["--model.dim", "16", "--train.epochs", "2"]
    cfg = load_config("demo.json", [*both, "--train.seeds", "[3407,1,2]"])  # 3407: the default train.seed
    singles = [load_config("demo.json", [*both, "--train.seed", str(s)]).run_dir for s in (3407, 1, 2)]
    assert member_run_dirs(cfg) == singles
    assert singles[0].name == "demo-dim16-epochs2" and singles[1].name == "demo-dim16-epochs2-seed1"
    named = load_config("demo.json", [*both, "--train.seeds", "[3,4]", "--output.name", "cell"])
    assert [p.name for p in member_run_dirs(named)] == ["cell-seed3", "cell-seed4"]
