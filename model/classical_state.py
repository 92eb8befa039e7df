"""A fitted scikit-learn baseline as plain numbers: saved to `.npz` arrays + JSON, rebuilt without pickle.

`export_state(pipeline)` turns the fitted `Pipeline(StandardScaler, LogisticRegression or
HistGradientBoostingClassifier)` of `engine/classical.py` into arrays: the scaler's mean and scale, the
logistic regression's coefficients and intercepts, or the boosting's baseline score and every tree's node
arrays (feature, raw threshold, where missing values go, children, leaf flag, leaf value). `SavedEstimator`
evaluates those arrays with NumPy alone and gives the fitted estimator's `predict_proba` (same arithmetic in
the same order: tests/test_classical.py checks them equal). Loading reads the `.npz` with
`allow_pickle=False` and the metadata as JSON text, so a file, whatever it holds, cannot run code; every
array is checked (dtype, shape, finite values, node indices) before use, so a forged file is refused with
a message instead of crashing or looping.
"""

from __future__ import annotations

import io
import json

import numpy as np

__all__ = ["StateError", "export_state", "state_bytes", "SavedEstimator"]

_NODE_KEYS = ("node_feature", "node_threshold", "node_missing_left", "node_left", "node_right", "node_is_leaf",
              "node_value")


class StateError(ValueError):
    """The file is not a valid saved estimator (says why)."""


# ----------------------------------------------------------------------------------------------------------
# fitted pipeline -> arrays
# ----------------------------------------------------------------------------------------------------------

def export_state(pipe) -> tuple[dict, dict]:
    """(arrays, json-able description) of a fitted Pipeline([("scale", StandardScaler), ("clf", ...)])."""
    scaler, clf = pipe.named_steps["scale"], pipe.named_steps["clf"]
    arrays = {"scale_mean": np.asarray(scaler.mean_, np.float64), "scale_scale": np.asarray(scaler.scale_, np.float64),
              "classes": np.asarray(clf.classes_, np.int64)}
    if hasattr(clf, "coef_"):
        arrays["coef"] = np.asarray(clf.coef_)  # its own dtype (float32 for float32 features): same arithmetic
        arrays["intercept"] = np.asarray(clf.intercept_)
        return arrays, {"estimator": "logistic_regression"}
    trees = [p.nodes for stage in clf._predictors for p in stage]  # iteration-major, then class
    if any(t["is_categorical"].any() for t in trees):
        raise StateError("categorical splits are not supported by the saved format")
    arrays["baseline"] = np.asarray(clf._baseline_prediction, np.float64).reshape(-1)
    arrays["tree_offsets"] = np.cumsum([0] + [len(t) for t in trees]).astype(np.int64)
    nodes = np.concatenate(trees) if trees else np.zeros(0, dtype=clf._predictors[0][0].nodes.dtype)
    arrays.update(node_feature=nodes["feature_idx"].astype(np.int64), node_threshold=nodes["num_threshold"].astype(np.float64),
                  node_missing_left=nodes["missing_go_to_left"].astype(np.bool_), node_left=nodes["left"].astype(np.int64),
                  node_right=nodes["right"].astype(np.int64), node_is_leaf=nodes["is_leaf"].astype(np.bool_),
                  node_value=nodes["value"].astype(np.float64))
    return arrays, {"estimator": "hist_gradient_boosting", "trees_per_iteration": len(clf._predictors[0])}


def state_bytes(arrays: dict, meta: dict) -> bytes:
    """The .npz file: the arrays and `meta` as UTF-8 JSON bytes (a uint8 array named `meta_json`)."""
    buffer = io.BytesIO()
    np.savez(buffer, meta_json=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------
# arrays -> predict_proba (NumPy only)
# ----------------------------------------------------------------------------------------------------------

def _expit(z):
    from scipy.special import expit  # scipy comes with scikit-learn; the same function as its predict_proba

    return expit(z)


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    return z / z.sum(axis=1, keepdims=True)


def _array(archive, key: str, kind: str, ndim: int) -> np.ndarray:
    if key not in archive.files:
        raise StateError(f"it has no array {key!r}")
    a = archive[key]
    if a.dtype.kind not in kind or a.ndim != ndim:
        raise StateError(f"its array {key!r} has dtype {a.dtype} and shape {a.shape}")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise StateError(f"its array {key!r} holds NaN or infinite values")
    return a


class SavedEstimator:
    """The rebuilt estimator: `classes_`, `n_features`, `predict_proba(x)` on unscaled features."""

    def __init__(self, archive):
        meta_bytes = _array(archive, "meta_json", "u", 1)
        try:
            self.meta = json.loads(meta_bytes.tobytes().decode())
        except (UnicodeDecodeError, ValueError):
            raise StateError("its metadata is not JSON text") from None
        if not isinstance(self.meta, dict):
            raise StateError("its metadata is not a JSON object")
        self.mean, self.scale = _array(archive, "scale_mean", "f", 1), _array(archive, "scale_scale", "f", 1)
        self.classes_ = _array(archive, "classes", "iu", 1).astype(np.int64)
        self.n_features = len(self.mean)
        if len(self.scale) != self.n_features or len(self.classes_) < 2:
            raise StateError("its scaler or class arrays do not fit together")
        self.kind = self.meta.get("estimator")
        if self.kind == "logistic_regression":
            self.coef, self.intercept = _array(archive, "coef", "f", 2), _array(archive, "intercept", "f", 1)
            rows = 1 if len(self.classes_) == 2 else len(self.classes_)
            if self.coef.shape != (rows, self.n_features) or self.intercept.shape != (rows,):
                raise StateError(f"its coefficients have shape {self.coef.shape}, not ({rows}, {self.n_features})")
        elif self.kind == "hist_gradient_boosting":
            self._load_trees(archive)
        else:
            raise StateError(f"it names the estimator {self.kind!r}")

    def _load_trees(self, archive) -> None:
        k = self.meta.get("trees_per_iteration")
        if k != (1 if len(self.classes_) == 2 else len(self.classes_)):
            raise StateError(f"it holds {k!r} trees per iteration for {len(self.classes_)} classes")
        self.k = k
        self.baseline = _array(archive, "baseline", "f", 1)
        offsets = _array(archive, "tree_offsets", "i", 1)
        kinds = {"node_feature": "i", "node_threshold": "f", "node_missing_left": "b", "node_left": "i",
                 "node_right": "i", "node_is_leaf": "b", "node_value": "f"}
        nodes = {key: _array(archive, key, kinds[key], 1) for key in _NODE_KEYS}
        n = len(nodes["node_value"])
        if (len(self.baseline) != k or len(offsets) < 1 or (len(offsets) - 1) % k or offsets[0] != 0
                or offsets[-1] != n or (np.diff(offsets) < 1).any() or any(len(a) != n for a in nodes.values())):
            raise StateError("its tree arrays do not fit together")
        self.trees = []
        for start, stop in zip(offsets[:-1], offsets[1:]):
            tree = {key: a[start:stop] for key, a in nodes.items()}
            inner = np.flatnonzero(~tree["node_is_leaf"])
            index = np.arange(stop - start)
            for child in (tree["node_left"], tree["node_right"]):  # children after their parent: no cycles
                if ((child[inner] <= index[inner]) | (child[inner] >= stop - start)).any():
                    raise StateError("a tree's node links are out of order or out of range")
            if ((tree["node_feature"][inner] < 0) | (tree["node_feature"][inner] >= self.n_features)).any():
                raise StateError("a tree splits on a feature the scaler does not have")
            self.trees.append(tree)

    def _scaled(self, x: np.ndarray) -> np.ndarray:
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise StateError(f"features of shape {x.shape}, the estimator needs {self.n_features} per sample")
        x = np.array(x, dtype=np.float32)  # as StandardScaler.transform on float32 features: all in float32
        x -= self.mean.astype(np.float32)
        x /= self.scale.astype(np.float32)
        return x

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(N, len(classes_)) class probabilities, as the fitted estimator's predict_proba."""
        x = self._scaled(x)
        if self.kind == "logistic_regression":
            z = x @ self.coef.T + self.intercept
        else:
            z = np.zeros((len(x), self.k), dtype=np.float64)
            z += self.baseline
            x = x.astype(np.float64)
            for i, tree in enumerate(self.trees):
                z[:, i % self.k] += _tree_values(x, tree)
        if len(self.classes_) == 2:
            p = _expit(z[:, 0])
            return np.stack([1.0 - p, p], axis=1)
        return _softmax(z)


def _tree_values(x: np.ndarray, tree: dict) -> np.ndarray:
    """The leaf value each row of `x` reaches (left when x <= threshold; NaN goes where the fit sent it)."""
    node = np.zeros(len(x), dtype=np.int64)
    rows = np.flatnonzero(~tree["node_is_leaf"][node])
    while rows.size:
        at = node[rows]
        v = x[rows, tree["node_feature"][at]]
        left = np.where(np.isnan(v), tree["node_missing_left"][at], v <= tree["node_threshold"][at])
        node[rows] = np.where(left, tree["node_left"][at], tree["node_right"][at])
        rows = rows[~tree["node_is_leaf"][node[rows]]]
    return tree["node_value"][node]
