"""Scoring: what reaches the evaluator, the official metrics, best-checkpoint selection and the last-k protocol.

Compared with independent computations: softmax and AUC/ACC written by hand (Mann-Whitney AUC, the
MedMNIST one-vs-rest mean for multi-class, threshold 0.5 on the last column for binary), a scripted
sequence of validation AUCs for the choice of best.pt, and per-checkpoint predict.py runs for the mean
over the last k epochs. train.py and predict.py are driven through their `main(argv)`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import write_fake_medmnist

import predict
import train
from data import Split
from engine.checkpoint import load_checkpoint
from engine.evaluate import official_metrics, predict_scores
from model import build_model


# ----------------------------------------------------------------------------------------------------------
# hand-written metrics
# ----------------------------------------------------------------------------------------------------------

def hand_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counted 1/2."""
    pos, neg = score[positive == 1], score[positive == 0]
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def hand_metrics(labels: np.ndarray, scores: np.ndarray, task: str) -> tuple[float, float]:
    labels = labels.reshape(-1)
    if task == "binary-class":  # the last column, threshold 0.5
        return hand_auc(labels, scores[:, -1]), float(np.mean((scores[:, -1] > 0.5) == labels))
    k = scores.shape[1]  # MedMNIST multi-class: mean of the one-vs-rest AUCs; ACC of the argmax
    auc = sum(hand_auc((labels == c).astype(int), scores[:, c]) for c in range(k)) / k
    return auc, float(np.mean(scores.argmax(axis=1) == labels))


def hand_softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_hand_auc_on_a_worked_example():
    # positives 0.9, 0.4; negatives 0.4, 0.1: pairs (0.9>0.4) (0.9>0.1) (0.4=0.4) (0.4>0.1) -> 3.5 / 4
    assert hand_auc(np.array([1, 1, 0, 0]), np.array([0.9, 0.4, 0.4, 0.1])) == 0.875


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_official_metrics_binary(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=(40, 1))
    scores = hand_softmax(rng.normal(size=(40, 2)) + labels * 0.8)
    scores[:5, 1] = 0.5  # ties at the threshold (not > 0.5) and in the ranking
    scores[:5, 0] = 0.5
    auc, acc = official_metrics(labels, scores, "binary-class")
    want_auc, want_acc = hand_metrics(labels, scores, "binary-class")
    assert auc == pytest.approx(want_auc, abs=1e-12) and acc == pytest.approx(want_acc, abs=1e-12)
    # the last column decides, not the first
    assert hand_auc(labels.reshape(-1), scores[:, 0]) == pytest.approx(1 - want_auc)


@pytest.mark.parametrize("k", [3, 11])
def test_official_metrics_multiclass(k):
    rng = np.random.default_rng(k)
    labels = np.concatenate([np.arange(k), rng.integers(0, k, size=50)]).reshape(-1, 1)
    scores = hand_softmax(rng.normal(size=(len(labels), k)) + np.eye(k)[labels[:, 0]])
    auc, acc = official_metrics(labels, scores, "multi-class")
    want_auc, want_acc = hand_metrics(labels, scores, "multi-class")
    assert auc == pytest.approx(want_auc, abs=1e-12) and acc == pytest.approx(want_acc, abs=1e-12)
    assert official_metrics(labels[:, 0], scores, "multi-class") == (auc, acc)  # (N,) labels too


# ----------------------------------------------------------------------------------------------------------
# predict_scores: softmax probabilities of the model, every sample once, in dataset order
# ----------------------------------------------------------------------------------------------------------

def _split(n=7, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 28, 28, 28), generator=g, dtype=torch.uint8)
    return Split(images=images, labels=torch.arange(n) % classes)


def _tiny_model(**kw):
    torch.manual_seed(0)
    model = build_model("lmttm", in_channels=1, num_classes=3, input_size=28, dim=16, memory_tokens=16, heads=2, **kw)
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))  # logits far from probabilities
        model.head.weight.mul_(3)
    return model


def test_predict_scores_are_softmax_of_the_logits_in_order():
    model = _tiny_model()
    split = _split()
    model.train()  # predict_scores must switch to eval mode itself
    scores = predict_scores(model, split, batch_size=3, device="cpu")
    assert not model.training
    with torch.no_grad():
        logits = model(split.images.float() / 255).numpy()
    assert scores.shape == (7, 3)
    np.testing.assert_allclose(scores, hand_softmax(logits.astype(np.float64)), atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(scores.sum(axis=1), 1, atol=1e-6)
    assert (scores > 0).all() and (scores < 1).all()
    # any batch size gives the same scores
    np.testing.assert_allclose(predict_scores(model, split, batch_size=7, device="cpu"), scores, atol=1e-6)
    np.testing.assert_allclose(predict_scores(model, split, batch_size=1, device="cpu"), scores, atol=1e-6)


def test_predict_scores_full_batches_pads_with_the_first_samples_and_drops_the_padding():
    """A batch-dependent model: the last batch (samples 4, 5) is completed with samples 0, 1; their scores
    are those of that batch, and the padding is not returned."""
    model = _tiny_model(compat_batch_attention=True).eval()
    split = _split(n=6)
    scores = predict_scores(model, split, batch_size=4, device="cpu", full_batches=True)
    x = split.images.float() / 255
    with torch.no_grad():
        first = model(x[:4]).double().softmax(-1).numpy()
        last = model(x[[4, 5, 0, 1]]).double().softmax(-1).numpy()[:2]
        alone = model(x[4:6]).double().softmax(-1).numpy()
    assert scores.shape == (6, 3)
    np.testing.assert_allclose(scores, np.concatenate([first, last]), atol=1e-6)
    assert not np.allclose(last, alone, atol=1e-4)  # the padding really changed the scores


# ----------------------------------------------------------------------------------------------------------
# train.py / predict.py on a tiny fake MedMNIST file
# ----------------------------------------------------------------------------------------------------------

pytestmark = pytest.mark.filterwarnings("ignore:.*differ from the official:UserWarning")
TINY = ["--model.dim", "16", "--model.memory_tokens", "16", "--model.heads", "2", "--train.batch_size", "8",
        "--eval.batch_size", "16", "--train.lr", "0.003"]


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_fake_medmnist(root, "adrenalmnist3d", n=(16, 10, 12), seed=3)
    return root


def _args(tmp_path, root, name, *extra):
    return ["adrenalmnist3d.json", *TINY, "--data.root", str(root), "--output.dir", str(tmp_path),
            "--output.name", name, *extra]


def _train(tmp_path, root, name, epochs, *extra):
    assert train.main(_args(tmp_path, root, name, "--train.epochs", str(epochs), *extra)) == 0


def _predict(tmp_path, root, name, *extra) -> dict:
    """predict.py's metrics.json (whichever eval folder it chose; the earlier results are removed first)."""
    for old in (tmp_path / name).glob("eval/*/metrics.json"):
        old.unlink()
    assert predict.main(_args(tmp_path, root, name, *extra)) == 0
    (path,) = (tmp_path / name).glob("eval/*/metrics.json")
    result = json.loads(path.read_text())
    result["folder"] = path.parent
    return result


def _test_split(root):
    data = np.load(root / "adrenalmnist3d.npz")
    images = torch.from_numpy(data["test_images"]).unsqueeze(1)
    return Split(images=images, labels=torch.from_numpy(data["test_labels"][:, 0].astype(np.int64)))


def _hand_score(ckpt_path, root) -> tuple[float, float]:
    """AUC/ACC of a checkpoint on the test split: the model's logits, softmax and metrics by hand."""
    ckpt = load_checkpoint(ckpt_path)
    m = ckpt["config"]["model"]
    model = build_model("lmttm", in_channels=1, num_classes=2, input_size=28, dim=m["dim"],
                        memory_tokens=m["memory_tokens"], heads=m["heads"])
    model.load_state_dict(ckpt["model"])
    model.eval()
    split = _test_split(root)
    with torch.no_grad():
        logits = model(split.images.float() / 255).double().numpy()
    return hand_metrics(split.labels.numpy(), hand_softmax(logits), "binary-class")


def test_best_checkpoint_is_the_epoch_of_the_best_validation_auc(tmp_path, fake_root, monkeypatch):
    """Scripted validation AUCs 0.6, 0.9, 0.9 (a tie), 0.7: best.pt is epoch 2, the first of the best."""
    script = iter([0.6, 0.9, 0.9, 0.7])
    calls = []

    def scripted(labels, scores, task):
        calls.append(np.asarray(scores).copy())
        return next(script), 0.5

    monkeypatch.setattr(train, "official_metrics", scripted)
    _train(tmp_path, fake_root, "run", 4, "--train.keep_last_k", "4")
    assert len(calls) == 4
    for scores in calls:  # validation probabilities reached the evaluator
        assert scores.shape == (10, 2)
        np.testing.assert_allclose(scores.sum(axis=1), 1, atol=1e-5)
    run = tmp_path / "run"
    best = load_checkpoint(run / "best.pt")
    assert best["epoch"] == 2 and best["best_epoch"] == 2 and best["best_val_auc"] == 0.9
    last = load_checkpoint(run / "last.pt")
    assert last["epoch"] == 4 and last["best_epoch"] == 2 and last["best_val_auc"] == 0.9
    assert json.loads((run / "train_summary.json").read_text())["best_epoch"] == 2
    epoch2 = load_checkpoint(run / "epoch_0002.pt")["model"]
    epoch3 = load_checkpoint(run / "epoch_0003.pt")["model"]
    weights = [k for k, v in epoch2.items() if isinstance(v, torch.Tensor)]
    assert all(torch.equal(best["model"][k], epoch2[k]) for k in weights)
    assert not all(torch.equal(best["model"][k], epoch3[k]) for k in weights)

    # predict.py (default protocol) scores best.pt = epoch 2; its numbers are the hand-computed ones
    result = _predict(tmp_path, fake_root, "run")
    assert result["epochs"] == [2] and result["checkpoint"].endswith("best.pt")
    auc, acc = _hand_score(run / "best.pt", fake_root)
    assert result["auc"] == pytest.approx(auc, abs=1e-6) and result["acc"] == pytest.approx(acc, abs=1e-6)
    saved = np.load(result["folder"] / "predictions.npz")
    np.testing.assert_allclose(saved["y_score"].sum(axis=1), 1, atol=1e-5)


def test_last_k_mean_is_over_exactly_the_last_k_checkpoints(tmp_path, fake_root):
    _train(tmp_path, fake_root, "run", 4, "--train.keep_last_k", "4")
    run = tmp_path / "run"
    per = {}
    for epoch in (1, 2, 3, 4):
        one = _predict(tmp_path, fake_root, "run", "--checkpoint", str(run / f"epoch_{epoch:04d}.pt"))
        assert one["epochs"] == [epoch]
        auc, acc = _hand_score(run / f"epoch_{epoch:04d}.pt", fake_root)
        assert one["auc"] == pytest.approx(auc, abs=1e-6) and one["acc"] == pytest.approx(acc, abs=1e-6)
        per[epoch] = (one["auc"], one["acc"])
    for k in (1, 3):
        result = _predict(tmp_path, fake_root, "run", "--last-k", str(k))
        epochs = list(range(5 - k, 5))
        assert result["epochs"] == epochs
        assert result["auc"] == pytest.approx(sum(per[e][0] for e in epochs) / k, abs=1e-9)
        assert result["acc"] == pytest.approx(sum(per[e][1] for e in epochs) / k, abs=1e-9)
        assert [r["auc"] for r in result["per_checkpoint"]] == pytest.approx([per[e][0] for e in epochs])
    assert sum(per[e][0] for e in (2, 3, 4)) > 0  # a sum/(k-1) would differ
