"""The training loop's batching and numerics options: compat full batches, the loss without per-step host
synchronisation, train.compile (checkpoints interchangeable with eager) and train.tf32."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import predict
import train
from data import Split
from engine.checkpoint import load_checkpoint
from engine.config import config_from_dict
from engine.setup import apply_tf32

TINY = ["--model.dim", "16", "--model.memory_tokens", "16", "--model.heads", "2", "--train.batch_size", "16",
        "--eval.batch_size", "32", "--train.lr", "0.001"]


def tiny(tmp_path, *extra, name="run", epochs=1):
    return [*TINY, "--train.epochs", str(epochs), "--output.dir", str(tmp_path), "--output.name", name, *extra]


def _cfg(**model):
    return config_from_dict([("test", {"model": {"dim": 8, "memory_tokens": 8, "heads": 2, **model},
                                       "train": {"batch_size": 4, "seed": 1}})])


class Recorder(torch.nn.Module):
    """A linear classifier on the first voxel that records every batch size it is called with."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(1, 2)
        self.sizes: list[int] = []

    def forward(self, x):
        self.sizes.append(len(x))
        return self.linear(x.flatten(1)[:, :1])


def _split(n=10):
    return Split(torch.randint(0, 255, (n, 1, 4, 4, 4), dtype=torch.uint8), torch.arange(n) % 2)


@pytest.mark.parametrize("compat, expected", [(False, [4, 4, 2]), (True, [4, 4])])
def test_compat_training_drops_the_last_partial_batch(compat, expected):
    cfg = _cfg(official_compat=compat)
    model = Recorder()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train.train_one_epoch(model, opt, _split(10), cfg, 0, torch.device("cpu"))
    assert model.sizes == expected


def test_epoch_loss_is_the_sample_weighted_mean_of_the_batch_losses(monkeypatch):
    """The loss is summed on the device and read back every `check_every` steps: the value is unchanged."""
    seen = []
    original = torch.nn.functional.cross_entropy

    def record(logits, y):
        loss = original(logits, y)
        seen.append((loss.item(), len(y)))
        return loss

    monkeypatch.setattr(train, "task_loss", record)
    cfg = _cfg()
    model = Recorder()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mean = train.train_one_epoch(model, opt, _split(10), cfg, 0, torch.device("cpu"), check_every=2)
    assert [n for _, n in seen] == [4, 4, 2]
    assert mean == pytest.approx(sum(v * n for v, n in seen) / 10, rel=1e-6)


@pytest.mark.parametrize("check_every", [1, 2, 100])
def test_non_finite_loss_stops_the_epoch_whenever_it_is_checked(monkeypatch, check_every):
    calls = []
    original = torch.nn.functional.cross_entropy

    def nan_at_second_batch(logits, y):
        calls.append(1)
        loss = original(logits, y)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(train, "task_loss", nan_at_second_batch)
    model = Recorder()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(train.NonFiniteLoss, match="in epoch 1"):
        train.train_one_epoch(model, opt, _split(10), _cfg(), 0, torch.device("cpu"), check_every=check_every)


def test_compat_run_validates_and_predicts_in_full_training_batches(tmp_path, monkeypatch):
    calls = []
    original = train.predict_scores

    def spy(model, split, **kw):
        calls.append((len(split), kw["batch_size"], kw.get("full_batches")))
        return original(model, split, **kw)

    monkeypatch.setattr(train, "predict_scores", spy)
    monkeypatch.setattr(predict, "predict_scores", spy)
    args = tiny(tmp_path, "--model.official_compat", "true")
    assert train.main(["demo.json", *args]) == 0
    assert calls == [(60, 16, True)]  # validation at the training batch size, padded, not at eval.batch_size 32
    assert predict.main(["demo.json", *args]) == 0
    assert calls[-1] == (60, 16, True)
    result = json.loads((tmp_path / "run" / "eval" / "test" / "metrics.json").read_text())
    assert result["n_samples"] == 60


def test_protocol_original_is_labelled_and_kept_apart(tmp_path):
    args = tiny(tmp_path, "--train.keep_last_k", "2", epochs=2)
    assert train.main(["demo.json", *args]) == 0
    assert predict.main(["demo.json", *args, "--last-k", "2"]) == 0
    assert predict.main(["demo.json", *args, "--last-k", "2", "--protocol", "original"]) == 0
    eval_dir = tmp_path / "run" / "eval"
    honest = json.loads((eval_dir / "test-last2" / "metrics.json").read_text())
    orig = json.loads((eval_dir / "test-last2-original-protocol" / "metrics.json").read_text())
    assert "ORIGINAL" in orig["protocol"] and orig["divided_by"] == 1
    assert orig["samples_scored"] == 48 and orig["n_samples"] == 60  # 3 full batches of 16 of the 60 test volumes
    per = orig["per_checkpoint"]
    assert orig["auc"] == pytest.approx(per[0]["auc"] + per[1]["auc"])  # sum / (k - 1), sic
    assert orig["auc_divided_by_k"] == pytest.approx((per[0]["auc"] + per[1]["auc"]) / 2)
    assert honest["auc"] <= 1 < orig["auc"] + 1  # the honest file is untouched by the original-protocol run
    assert not (eval_dir / "test").exists()


def test_compiled_run_resumes_eagerly_with_the_same_weights(tmp_path, monkeypatch):
    """train.compile wraps the forward only: checkpoints hold the model's own keys, a compiled run resumes
    eagerly, and (with dynamo's eager backend, i.e. the same kernels) gives the same weights as an eager run."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: real_compile(model, backend="eager"))
    assert train.main(["demo.json", *tiny(tmp_path, "--train.compile", "default", name="mixed", epochs=1)]) == 0
    first = load_checkpoint(tmp_path / "mixed" / "last.pt")
    assert not any("_orig_mod" in key for key in first["model"])
    assert train.main(["demo.json", *tiny(tmp_path, name="mixed", epochs=2)]) == 0  # resumed eagerly
    assert train.main(["demo.json", *tiny(tmp_path, name="eager", epochs=2)]) == 0
    mixed = load_checkpoint(tmp_path / "mixed" / "last.pt")["model"]
    eager = load_checkpoint(tmp_path / "eager" / "last.pt")["model"]
    for key, value in eager.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            np.testing.assert_allclose(mixed[key].numpy(), value.numpy(), rtol=1e-5, atol=1e-6, err_msg=key)


def test_tf32_flags():
    try:
        apply_tf32(True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        apply_tf32(False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        apply_tf32(False)
