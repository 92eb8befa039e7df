"""Classical scikit-learn baselines (`logreg`, `hgb`): features, fitting, model selection, saving, loading.

`train.py` hands a run to `train()` when the configured model is a scikit-learn one (`model/classical.py`);
`predict.py` scores it with `load_estimator()` + `predict_proba()` and writes its results with the same code
as for the deep models.

* Features: each volume, scaled to [0, 1], average-pooled by `model.pool` per axis (non-overlapping
  pool³ cubes; 28³ -> 14³ with the default 2), flattened, then standardised with the mean and standard
  deviation of the training split (a `StandardScaler`, part of the saved pipeline).
* `logreg`: `LogisticRegression` (L2, lbfgs; multinomial for more than two classes) fitted on the training
  split for every C of `model.c_grid`; the C with the best validation AUC (medmnist's getAUC, as for the
  deep models) is kept, ties going to the smallest C (the strongest regularisation). The kept model is the
  one fitted on the training split only, not refitted on train + validation: the validation split stays
  what it is for the deep models (model selection only), and `best_val_auc` is the score it was chosen by.
  Deterministic: the seed changes nothing.
* `hgb`: `HistGradientBoostingClassifier` grown on the training split with `warm_start`, scored on the
  validation split after every boosting iteration (staged predictions); growth stops when the validation
  AUC has not improved for `model.n_iter_no_change` iterations (checked every `CHUNK` iterations), and
  the model with the best iteration count is kept (refitted from scratch to that count: the boosting
  is deterministic for a given `train.seed`, so it is the same model). scikit-learn's own early stopping
  is off: it holds out a random part of the training data instead of using the validation split.
* One "epoch": `train_summary.json` has `epochs` = `best_epoch` = 1 and `best_val_auc` = the validation
  AUC of the kept model, so the sweep and the aggregate table read these runs like any other.
* Resume: there is no partial state. A run interrupted before `train_summary.json` was written is fitted
  again from the start by rerunning the same command (seconds to minutes); a finished run is left alone.

Saving and trust: the fitted pipeline is saved as numbers only (model/classical_state.py): `model.npz`
holds the scaler's statistics, the coefficients or every tree's node arrays, and its metadata as JSON text;
it is read with `allow_pickle=False` and evaluated with NumPy, so loading it cannot run code whatever the
folder holds. It is written atomically, then its SHA-256 goes into `train_summary.json` (written after
it); `load_estimator` checks that record, so a file swapped for another run's, edited or truncated is
refused. Runs saved by older versions as a pickle (`model.joblib`) are never unpickled: they are refused
with a message to fit them again.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data import DataError, Split, check_split, data_md5
from engine.checkpoint import CheckpointError, package_versions
from engine.config import Config, ConfigError, config_to_dict
from engine.evaluate import official_metrics
from engine.rundir import (CONFIG_JSON, ESTIMATOR, OLD_ESTIMATOR, TRAIN_SUMMARY, RunDirError, RunDirectory,
                           atomic_write_bytes, atomic_write_json, interrupt_of)
from engine.setup import load_data, seed_everything
from model.classical_state import SavedEstimator, StateError, export_state, state_bytes

FORMAT = "lmttm-classical-estimator"
FORMAT_VERSION = 2
CHUNK = 10  # hgb: boosting iterations grown between two checks of the early-stopping rule


# ----------------------------------------------------------------------------------------------------------
# features
# ----------------------------------------------------------------------------------------------------------

def check_pool(pool: int, size: int) -> None:
    if pool > size or size % pool:
        raise ConfigError(f"model.pool = {pool} does not divide the volume side {size}; choose a divisor "
                          f"(e.g. 1, 2, 4 or 7 for 28³)")


def features(images: torch.Tensor, pool: int, chunk: int = 256) -> np.ndarray:
    """(N, (S/pool)³) float32: uint8 volumes (N, 1, S, S, S) scaled to [0, 1] and average-pooled."""
    out = []
    for start in range(0, images.shape[0], chunk):
        x = images[start:start + chunk].detach().cpu().float() / 255.0
        if pool > 1:
            x = F.avg_pool3d(x, kernel_size=pool, stride=pool)
        out.append(x.flatten(1).numpy())
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(out).astype(np.float32, copy=False)


def expand_proba(proba: np.ndarray, classes: np.ndarray, num_classes: int) -> np.ndarray:
    """Scores (N, num_classes): the estimator's columns placed at their class labels (a class absent from
    the training split scores 0)."""
    out = np.zeros((proba.shape[0], num_classes), dtype=np.float64)
    out[:, np.asarray(classes, dtype=np.int64)] = proba
    return out


def predict_proba(payload: dict, split: Split) -> np.ndarray:
    """Scores (N, K) of a loaded estimator on a split, in dataset order."""
    pipe = payload["pipeline"]
    return expand_proba(pipe.predict_proba(features(split.images, payload["pool"])), pipe.classes_,
                        payload["dataset"]["num_classes"])


# ----------------------------------------------------------------------------------------------------------
# fitting and model selection (on the validation split only)
# ----------------------------------------------------------------------------------------------------------

def _scaler(x_train: np.ndarray):
    from sklearn.preprocessing import StandardScaler

    return StandardScaler().fit(x_train)


def fit_logreg(x_train, y_train, x_val, y_val, mcfg, *, num_classes: int, task: str):
    """(pipeline, selection record, val AUC, val ACC): the C of `mcfg.c_grid` with the best validation AUC."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    scaler = _scaler(x_train)
    xt, xv = scaler.transform(x_train), scaler.transform(x_val)
    curve, best, not_converged = [], None, []
    for c in sorted(set(float(c) for c in mcfg.c_grid)):  # ascending: a tie keeps the smaller C
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            clf = LogisticRegression(C=c, max_iter=mcfg.max_iter).fit(xt, y_train)
        if any(issubclass(w.category, ConvergenceWarning) for w in caught):
            not_converged.append(c)
        auc, acc = official_metrics(y_val, expand_proba(clf.predict_proba(xv), clf.classes_, num_classes), task)
        curve.append({"C": c, "val_auc": auc, "val_acc": acc})
        print(f"  C = {c:g}: val AUC {auc:.4f}  val ACC {acc:.4f}", flush=True)
        if best is None or auc > best[1]:
            best = (clf, auc, acc, c)
    if not_converged:
        print(f"note: lbfgs did not converge in {mcfg.max_iter} iterations for C = "
              f"{', '.join(f'{c:g}' for c in not_converged)} (raise --model.max_iter)")
    clf, auc, acc, c = best
    pipe = Pipeline([("scale", scaler), ("clf", clf)])
    selection = {"chosen": {"C": c}, "curve": curve, "not_converged_C": not_converged}
    return pipe, selection, auc, acc


def _hgb(mcfg, seed: int, max_iter: int, warm_start: bool):
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(
        learning_rate=mcfg.learning_rate, max_iter=max_iter, max_leaf_nodes=mcfg.max_leaf_nodes,
        min_samples_leaf=mcfg.min_samples_leaf, l2_regularization=mcfg.l2_regularization,
        early_stopping=False, warm_start=warm_start, random_state=seed)


def fit_hgb(x_train, y_train, x_val, y_val, mcfg, *, seed: int, num_classes: int, task: str):
    """(pipeline, selection record, val AUC, val ACC): boosting stopped early on the validation AUC."""
    from sklearn.pipeline import Pipeline

    scaler = _scaler(x_train)
    xt, xv = scaler.transform(x_train), scaler.transform(x_val)
    clf = _hgb(mcfg, seed, 0, warm_start=True)
    curve, best_auc, best_acc, best_iter, grown = [], -math.inf, math.nan, 0, 0
    while grown < mcfg.max_iter and grown - best_iter < mcfg.n_iter_no_change:
        clf.set_params(max_iter=min(grown + CHUNK, mcfg.max_iter))
        clf.fit(xt, y_train)
        for i, proba in enumerate(clf.staged_predict_proba(xv), start=1):
            if i <= grown:
                continue
            auc, acc = official_metrics(y_val, expand_proba(proba, clf.classes_, num_classes), task)
            curve.append(auc)
            if auc > best_auc:
                best_auc, best_acc, best_iter = auc, acc, i
        grown = clf.n_iter_
        print(f"  {grown} iterations: best val AUC {best_auc:.4f} at iteration {best_iter}", flush=True)
    if best_iter != grown:  # the model of the best iteration count: the same boosting, stopped there
        clf = _hgb(mcfg, seed, best_iter, warm_start=False).fit(xt, y_train)
        auc, acc = official_metrics(y_val, expand_proba(clf.predict_proba(xv), clf.classes_, num_classes), task)
        if abs(auc - best_auc) > 1e-9:
            print(f"note: refitting {best_iter} iterations gave val AUC {auc:.6f}, not {best_auc:.6f} as "
                  f"while growing; keeping the refit and its score")
            best_auc, best_acc = auc, acc
    pipe = Pipeline([("scale", scaler), ("clf", clf)])
    selection = {"chosen": {"n_iter": best_iter}, "iterations_grown": grown,
                 "val_auc_per_iteration": [round(a, 6) for a in curve]}
    return pipe, selection, best_auc, best_acc


def learned_numbers(pipe) -> int:
    """`param_count` of the summary: coefficients + intercepts (logreg), tree nodes (hgb)."""
    clf = pipe.named_steps["clf"]
    if hasattr(clf, "coef_"):
        return int(clf.coef_.size + clf.intercept_.size)
    return int(sum(len(p.nodes) for stage in clf._predictors for p in stage))


# ----------------------------------------------------------------------------------------------------------
# saving and loading
# ----------------------------------------------------------------------------------------------------------

def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_summary(run_dir: Path) -> dict | None:
    try:
        summary = json.loads((run_dir / TRAIN_SUMMARY).read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def _refuse_old(path: Path) -> None:
    raise CheckpointError(f"{path} is a pickle saved by an older version of this project; it is not loaded "
                          f"(unpickling a file can run code). Fit the run again: python train.py <config> --restart")


def load_estimator(path: Path) -> dict:
    """The saved estimator of `path` (a model.npz) as a payload dict ("pipeline": a SavedEstimator), loaded
    only if its SHA-256 is the one train.py recorded in train_summary.json beside it. Nothing on this path
    unpickles: the arrays are read with allow_pickle=False. Raises CheckpointError otherwise."""
    path = Path(path)
    if path.suffix == ".joblib" or (path.name == ESTIMATOR and not path.exists()
                                    and (path.parent / OLD_ESTIMATOR).exists()):
        _refuse_old(path if path.suffix == ".joblib" else path.parent / OLD_ESTIMATOR)
    if not path.is_file():
        what = "is not a regular file" if path.exists() else "does not exist"
        raise CheckpointError(f"{path} {what}; train the run first (python train.py <config>)")
    summary = _read_summary(path.parent)
    if not summary or not summary.get("finished") or not summary.get("estimator_sha256"):
        raise CheckpointError(f"{path.parent} has no finished {TRAIN_SUMMARY} recording the estimator's SHA-256; "
                              f"not loading {path.name} (rerun train.py to fit it)")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
    if sha256(data) != summary["estimator_sha256"] or summary.get("estimator") != path.name:
        raise CheckpointError(f"{path} is not the estimator train.py saved for this run (its SHA-256 differs from the "
                              f"one in {path.parent / TRAIN_SUMMARY}); not loading it. Use --restart to "
                              f"fit the run again")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            estimator = SavedEstimator(archive)
    except (StateError, ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        reason = str(err)
        if "pickle" in reason:  # never pass on numpy's advice to load it unsafely
            reason = "it holds pickled Python objects, which this project never writes; they were not loaded"
        raise CheckpointError(f"{path} is not a valid estimator file of this project: {reason}") from None
    meta = estimator.meta
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION or not isinstance(meta.get("dataset"), dict):
        raise CheckpointError(f"{path} is not an estimator file of this project (format {meta.get('format')!r}, "
                              f"version {meta.get('version')!r})")
    data_meta, pool = meta["dataset"], meta.get("pool")
    size, k = data_meta.get("size"), data_meta.get("num_classes")
    if not (type(pool) is int and type(size) is int and type(k) is int and 0 < pool <= size and size % pool == 0
            and estimator.n_features == (size // pool) ** 3 and estimator.classes_.min() >= 0
            and estimator.classes_.max() < k and isinstance(data_meta.get("name"), str)):
        raise CheckpointError(f"{path} is not a valid estimator file of this project: its dataset, pool and "
                              f"arrays do not fit together")
    return {**meta, "pipeline": estimator}


# ----------------------------------------------------------------------------------------------------------
# train.py's work for a classical model
# ----------------------------------------------------------------------------------------------------------

def _same_run(cfg: Config, recorded: dict) -> list[str]:
    """What differs between the config and the one a finished run recorded (keys that change the fit)."""
    mine = config_to_dict(cfg)
    diffs = []
    for s, k in (("data", "name"), ("data", "size"), ("train", "seed")):
        if recorded.get(s, {}).get(k) != mine[s][k]:
            diffs.append(f"{s}.{k}: {recorded.get(s, {}).get(k)!r} -> {mine[s][k]!r}")
    if recorded.get("model") != mine["model"]:
        diffs.append(f"model: {recorded.get('model')} -> {mine['model']}")
    return diffs


def _finished(cfg: Config, run_dir: Path) -> bool:
    """True for a finished run of this config (its estimator intact); CheckpointError for a run of
    another config or a damaged one."""
    summary = _read_summary(run_dir)
    if not summary or not summary.get("finished"):
        return False
    try:
        recorded = json.loads((run_dir / CONFIG_JSON).read_text())
    except (OSError, ValueError):
        recorded = {}
    diffs = _same_run(cfg, recorded)
    if diffs:
        raise CheckpointError(f"{run_dir} holds a finished run of another config ({'; '.join(diffs)}). Use another "
                              f"--output.name, or --restart to fit this run again (the old one is kept aside).")
    load_estimator(run_dir / ESTIMATOR)  # refuses a missing or altered estimator
    return True


def _already_finished(run_dir: Path) -> int:
    print(f"{run_dir} is a finished scikit-learn run; nothing to do. Use --restart to fit it again.")
    return 0


def train(cfg: Config, *, restart: bool = False) -> int:
    """Fit the configured scikit-learn model; same run directory rules as the deep models (`--restart`
    moves the old run aside; a deep-model run's folder is refused). A folder this call created is removed
    again when the fit stops before its summary is written (full disk, Ctrl-C)."""
    with RunDirectory(cfg.run_dir) as run:
        run.open_existing(restart=restart)
        run.refuse_deep_records()
        if run.locked and _finished(cfg, run.path):
            return _already_finished(run.path)
        data = _prepare(cfg)
        if not run.locked:  # the run directory: created and locked only now (as for the deep models)
            run.open()
            run.refuse_deep_records()  # another process may have trained or fitted here meanwhile
            if _finished(cfg, run.path):
                return _already_finished(run.path)
        run.begin()  # temporaries of a killed writer; the run is not finished (any more)
        try:
            return _fit_and_save(cfg, run, *data)
        except RunDirError as err:
            run.discard_if_empty()  # this call made the folder: leave nothing half-written
            raise RunDirError(f"{err}. Nothing of this fit was kept; free space or fix the folder, then rerun the "
                              f"same command.") from None


def _prepare(cfg: Config) -> tuple:
    """(dataset info, data MD5, train and validation features and labels); nothing is written."""
    mcfg = cfg.model
    print(f"note: {cfg.model_name} is a scikit-learn model: of the train.* keys only train.seed is used "
          f"(epochs, lr, batch_size, optimizer, device... are ignored); it runs on the CPU")
    seed_everything(cfg.train.seed)
    info, splits = load_data(cfg, torch.device("cpu"))
    present = torch.unique(splits["train"].labels.cpu()).tolist()
    if len(present) == 1:  # scikit-learn cannot fit one class (a deep model trains on it, with a warning)
        raise DataError(f"the training split of {info.path or info.name} holds only class {int(present[0])} "
                        f"({len(splits['train'])} samples); {cfg.model_name} needs at least two classes to fit. "
                        f"Use a training split with every class" + (f", e.g. the released file (MD5 {info.md5})"
                                                                   if info.md5 else ""))
    check_split(info, "train", splits["train"], need_all_classes=False)
    check_split(info, "val", splits["val"], need_all_classes=True)  # model selection needs a defined AUC
    check_pool(mcfg.pool, info.size)
    md5 = data_md5(cfg.data.name, root=cfg.data.root, size=cfg.data.size)
    print(f"{cfg.model_name} on {info.name} ({info.size}³, {info.num_classes} classes, {info.task}); "
          f"train/val/test {len(splits['train'])}/{len(splits['val'])}/{len(splits['test'])}; "
          f"features: {(info.size // mcfg.pool) ** 3} pooled voxels (pool {mcfg.pool})")
    if md5 is not None:
        print(f"data file {info.path} MD5 {md5} "
              f"({'as in medmnist.INFO' if md5 == info.md5 else f'NOT the released file, which has {info.md5}'})")
    x_train, x_val = features(splits["train"].images, mcfg.pool), features(splits["val"].images, mcfg.pool)
    y_train, y_val = splits["train"].labels.cpu().numpy(), splits["val"].labels.cpu().numpy()
    return info, md5, x_train, y_train, x_val, y_val


def _fit_and_save(cfg: Config, run: RunDirectory, info, md5, x_train, y_train, x_val, y_val) -> int:
    """Fit, select on the validation split, save the estimator, then the summary (the commit of the run)."""
    mcfg, run_dir = cfg.model, run.path
    try:
        atomic_write_json(config_to_dict(cfg), run_dir / CONFIG_JSON)
        t0 = time.time()
        if cfg.model_name == "logreg":
            pipe, selection, val_auc, val_acc = fit_logreg(x_train, y_train, x_val, y_val, mcfg,
                                                           num_classes=info.num_classes, task=info.task)
        else:
            pipe, selection, val_auc, val_acc = fit_hgb(x_train, y_train, x_val, y_val, mcfg, seed=cfg.train.seed,
                                                        num_classes=info.num_classes, task=info.task)
        seconds = time.time() - t0
        arrays, described = export_state(pipe)
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "model": cfg.model_name, **described,
                "pool": mcfg.pool, "config": config_to_dict(cfg),
                "dataset": {"name": info.name, "size": info.size, "num_classes": info.num_classes,
                            "task": info.task, "md5": md5}}
        data = state_bytes(arrays, meta)
        atomic_write_bytes(data, run_dir / ESTIMATOR)
        summary = {"finished": True, "epochs": 1, "best_epoch": 1, "best_val_auc": val_auc, "best_val_acc": val_acc,
                   "param_count": learned_numbers(pipe), "data_md5": md5, "versions": package_versions(),
                   "seconds": round(seconds, 2), "model": cfg.model_name, "selection": selection,
                   "estimator": ESTIMATOR, "estimator_sha256": sha256(data)}
        atomic_write_json(summary, run_dir / TRAIN_SUMMARY)  # the commit point of the run
    except KeyboardInterrupt as err:
        what, code = interrupt_of(err)
        run.discard_if_empty()
        print(f"\n{what} while fitting; nothing was kept. Rerun the same command to fit it again.", file=sys.stderr)
        return code
    print(f"done: {json.dumps(selection['chosen'])}  val AUC {val_auc:.4f}  val ACC {val_acc:.4f}  "
          f"({seconds:.1f}s); estimator in {run_dir / ESTIMATOR}")
    return 0
