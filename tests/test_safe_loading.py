"""Loading never runs code: the scikit-learn baselines are saved as arrays + JSON and rebuilt equal to the fitted
estimator (checked against scikit-learn's own predict_proba), and a pickle payload put wherever a loader reads
(estimator file, summary, config, --checkpoint paths, .npz with object arrays, torch .pt, --input files) never
runs."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import predict
import train
from engine import classical
from engine.checkpoint import CheckpointError
from model.classical_state import SavedEstimator, StateError, export_state, state_bytes


def run_payload(marker: str) -> None:
    Path(marker).touch()


class Payload:
    """Unpickling this calls run_payload (creates the marker file): what a malicious file does."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (run_payload, (self.marker,))


@pytest.mark.parametrize("num_classes", [2, 4])
@pytest.mark.parametrize("kind", ["logreg", "hgb"])
def test_rebuilt_estimator_equals_the_fitted_one(kind, num_classes):
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(num_classes)
    x = rng.random((160, 12), dtype=np.float32)
    y = rng.integers(0, num_classes, 160)
    x[:, 0] += y  # learnable
    scaler = StandardScaler().fit(x)
    clf = (LogisticRegression(max_iter=500) if kind == "logreg"
           else HistGradientBoostingClassifier(max_iter=12, min_samples_leaf=4, early_stopping=False))
    pipe = Pipeline([("scale", scaler), ("clf", clf.fit(scaler.transform(x), y))])
    arrays, meta = export_state(pipe)
    with np.load(io.BytesIO(state_bytes(arrays, meta)), allow_pickle=False) as archive:
        rebuilt = SavedEstimator(archive)
    x_new = rng.random((50, 12), dtype=np.float32) * 1.5
    if kind == "hgb":
        x_new[0, 1] = np.nan  # a missing value goes where the fit sent it
    expected = pipe.predict_proba(x_new)
    np.testing.assert_allclose(rebuilt.predict_proba(x_new), expected, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(rebuilt.classes_, pipe.classes_)
    assert np.isfinite(expected).all() and expected.shape == (50, num_classes)


def test_forged_tree_links_are_refused_not_looped():
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.random.default_rng(0).random((80, 3), dtype=np.float32)
    y = (x[:, 0] > 0.5).astype(int)
    scaler = StandardScaler().fit(x)
    pipe = Pipeline([("scale", scaler), ("clf", HistGradientBoostingClassifier(max_iter=2).fit(scaler.transform(x), y))])
    arrays, meta = export_state(pipe)
    arrays["node_left"] = np.zeros_like(arrays["node_left"])  # every split loops back to the root
    with np.load(io.BytesIO(state_bytes(arrays, meta)), allow_pickle=False) as archive, \
            pytest.raises(StateError, match="out of order"):
        SavedEstimator(archive)


def _forge(run: Path, name: str, data: bytes) -> None:
    """What someone who can write the run folder does: a file plus a summary recording its SHA-256."""
    (run / name).write_bytes(data)
    summary = json.loads((run / "train_summary.json").read_text())
    summary.update(estimator=name, estimator_sha256=hashlib.sha256(data).hexdigest())
    (run / "train_summary.json").write_text(json.dumps(summary))


def test_pickle_payloads_never_run_wherever_a_loader_reads(tmp_path, monkeypatch):
    marker = tmp_path / "code_ran"
    evil = pickle.dumps(Payload(marker))
    assert pickle.loads(evil) is None and marker.exists()  # the payload works
    marker.unlink()
    a = ["--output.dir", str(tmp_path), "--output.name", "lr", "--data.name", "synthetic3d", "--model.pool", "7"]
    assert train.main(["baselines/logreg.json", *a]) == 0
    run = tmp_path / "lr"
    good, summary = (run / "model.npz").read_bytes(), (run / "train_summary.json").read_text()
    buffer = io.BytesIO()
    np.savez(buffer, meta_json=np.array([Payload(marker)], dtype=object), classes=np.array([Payload(marker)]))
    object_npz = buffer.getvalue()

    def refused(argv, match, script=predict):
        with pytest.raises(CheckpointError, match=match) as err:
            script.main(argv)
        assert not marker.exists(), argv
        assert "allow_pickle" not in str(err.value) and "unsafe" not in str(err.value)

    _forge(run, "model.npz", evil)  # a pickle named model.npz, its digest recorded
    refused(["baselines/logreg.json", *a], "not a valid estimator file")
    refused(["baselines/logreg.json", *a], "not a valid estimator file", script=train)
    _forge(run, "model.npz", object_npz)  # a real .npz whose arrays are pickled objects
    refused(["baselines/logreg.json", *a], "not a valid estimator file")
    (run / "model.npz").unlink()
    _forge(run, "model.joblib", evil)  # an old-style folder: refused, never unpickled
    refused(["baselines/logreg.json", *a], "older version.*--restart")
    refused(["baselines/logreg.json", *a, "--checkpoint", str(run / "model.joblib")], "older version")
    (run / "model.npz").write_bytes(good)
    (run / "train_summary.json").write_bytes(evil)  # the summary itself
    refused(["baselines/logreg.json", *a], "no finished train_summary.json")
    (run / "train_summary.json").write_text(summary)
    (run / "config.json").write_bytes(evil)
    with pytest.raises(CheckpointError, match="another config"):
        train.main(["baselines/logreg.json", *a])
    assert not marker.exists()
    assert predict.main(["baselines/logreg.json", *a]) == 0  # the genuine estimator still scores

    # torch checkpoints (weights_only) and --input files (allow_pickle=False)
    (tmp_path / "evil.pt").write_bytes(evil)
    torch.save({"model": {}, "payload": Payload(marker)}, tmp_path / "evil2.pt")
    d = ["--output.dir", str(tmp_path), "--output.name", "deep"]
    for pt in ("evil.pt", "evil2.pt"):
        refused(["demo.json", *d, "--checkpoint", str(tmp_path / pt)], "not a checkpoint of this project")
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / "best.pt").write_bytes(evil)
    refused(["demo.json", *d], "not committed")  # without a last.pt, best.pt is not even opened
    (tmp_path / "deep" / "last.pt").write_bytes(evil)  # with one, last.pt is read (weights_only) to commit it
    refused(["demo.json", *d], "not a checkpoint of this project")
    refused(["demo.json", *d, "--input", str(tmp_path)], "not a checkpoint of this project")
    np.save(tmp_path / "scan.npy", np.array([Payload(marker)], dtype=object), allow_pickle=True)
    from engine.inputs import InputError, read_array

    np.savez(tmp_path / "scan.npz", np.array([Payload(marker)], dtype=object))
    for name in ("scan.npy", "scan.npz"):
        with pytest.raises(InputError, match="cannot read"):
            read_array(tmp_path / name)
        assert not marker.exists()


def test_old_joblib_run_is_refused_by_train_too(tmp_path):
    a = ["--output.dir", str(tmp_path), "--output.name", "old", "--data.name", "synthetic3d", "--model.pool", "7"]
    assert train.main(["baselines/logreg.json", *a]) == 0
    run = tmp_path / "old"
    (run / "model.npz").rename(run / "model.joblib")
    with pytest.raises(CheckpointError, match="older version"):
        train.main(["baselines/logreg.json", *a])
    with pytest.raises(CheckpointError, match="older version"):
        classical.load_estimator(run / "model.npz")


def test_pickled_objects_in_data_and_input_files_are_named_without_unsafe_advice(tmp_path):
    from data import DataError, load_splits
    from engine.inputs import InputError, read_array

    marker = tmp_path / "code_ran"
    evil = pickle.dumps(Payload(marker))
    (tmp_path / "raw.npy").write_bytes(evil)  # numpy would advise allow_pickle=True here
    np.save(tmp_path / "obj.npy", np.array([Payload(marker)], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "obj.npz", np.array([Payload(marker)], dtype=object))
    (tmp_path / "text.npz").write_text("not an array\n")  # nor is a text file "pickled objects"
    for name, reason in (("raw.npy", "it holds pickled"), ("obj.npy", "its arrays hold pickled"),
                         ("obj.npz", "its arrays hold pickled"), ("text.npz", "it is not a NumPy file")):
        with pytest.raises(InputError, match=reason) as err:
            read_array(tmp_path / name)
        assert "allow_pickle" not in str(err.value) and "unsafe" not in str(err.value), name
        assert ("pickle" in str(err.value)) == (name != "text.npz"), err.value
    root = tmp_path / "data"
    root.mkdir()
    zeros = np.zeros((1, 28, 28, 28), np.uint8)
    np.savez(root / "adrenalmnist3d.npz", train_images=np.array([Payload(marker)], dtype=object),
             train_labels=np.zeros((1, 1)), val_images=zeros, val_labels=np.zeros((1, 1)), test_images=zeros,
             test_labels=np.zeros((1, 1)))  # a real zip archive: not "not a valid .npz file"
    with pytest.raises(DataError, match="its arrays hold pickled Python objects") as err:
        load_splits("adrenalmnist3d", root=root, download=False)
    assert "allow_pickle" not in str(err.value) and "b'PK'" not in str(err.value)
    assert not marker.exists()
