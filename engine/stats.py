"""Error bars and paired tests for test-split scores (numpy/scipy only; no torch).

- `confidence_intervals`: stratified percentile bootstrap of AUC and ACC (or of their mean over several
  score sets of the same samples, e.g. predict.py's `--last-k` checkpoints or the seeds of a sweep cell).
- `compare_scores`: two models scored on the same samples: ΔAUC with DeLong's test (binary tasks) or a
  paired bootstrap (multi-class, multi-label), ΔACC with McNemar's exact test (binary, multi-class) or a
  paired bootstrap (multi-label).

The metrics are MedMNIST's (medmnist.evaluator.getAUC / getACC): binary tasks use the last score column
(AUC of label 1, ACC at threshold 0.5), multi-class the macro one-vs-rest AUC over the score columns and
the argmax ACC, multi-label the mean over labels of the per-label AUC and of the per-label ACC at 0.5.
A bootstrap resample is a vector of counts (how often each sample was drawn); the metrics are computed
from the counts as weights with one sort per score column (sample weights in the Mann-Whitney form of
the AUC), so 2000 resamples cost a fraction of a second instead of 2000 calls of getAUC.
tests/test_stats.py holds these weighted metrics equal to getAUC / getACC on explicit resamples.

Resampling is stratified by class (each resample keeps every class's count, so every AUC is defined) for
binary and multi-class tasks; multi-label tasks resample the samples as a whole (a resample in which
some label lacks positives or negatives is left out and counted). Seeded: the same scores give the same
interval.
"""

from __future__ import annotations

import numpy as np
from scipy import stats as sps

BINARY, MULTICLASS, MULTILABEL = "binary-class", "multi-class", "multi-label, binary-class"
DEFAULT_SEED = 0
_CHUNK_ELEMENTS = 4_000_000  # resamples x samples per chunk (memory bound; fixed, so results do not vary)


# ----------------------------------------------------------------------------------------------------------
# metrics of weighted samples
# ----------------------------------------------------------------------------------------------------------

def infer_task(y_true: np.ndarray, y_score: np.ndarray) -> str:
    """The MedMNIST task string of labels (N,) / (N, 1) or (N, L) and scores (N, K)."""
    y_true, y_score = np.asarray(y_true), np.asarray(y_score)
    if y_true.ndim == 2 and y_true.shape[1] > 1:
        return MULTILABEL
    return BINARY if y_score.ndim == 1 or y_score.shape[1] <= 2 else MULTICLASS


def _columns(y_true, y_score, task: str) -> tuple[list, list]:
    """[(is positive (N,) bool)], [score (N,)]: the binary problems whose mean is the AUC."""
    y_true, y_score = np.asarray(y_true), np.asarray(y_score, dtype=np.float64)
    if task == MULTILABEL:
        return [y_true[:, j] == 1 for j in range(y_true.shape[1])], [y_score[:, j] for j in range(y_score.shape[1])]
    y = y_true.reshape(len(y_true))
    if task == BINARY:
        return [y == 1], [y_score if y_score.ndim == 1 else y_score[:, -1]]
    return [y == c for c in range(y_score.shape[1])], [y_score[:, c] for c in range(y_score.shape[1])]


def correct(y_true, y_score, task: str) -> np.ndarray:
    """Per-sample correctness (N,) bool, or (N, L) for multi-label (per label, threshold 0.5)."""
    y_true, y_score = np.asarray(y_true), np.asarray(y_score)
    if task == MULTILABEL:
        return (y_score > 0.5) == (y_true == 1)
    y = y_true.reshape(len(y_true))
    if task == BINARY:
        return ((y_score if y_score.ndim == 1 else y_score[:, -1]) > 0.5) == (y == 1)
    return np.argmax(y_score, axis=-1) == y


def weighted_auc(positive: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC (B,) of one binary problem for each row of sample weights (B, N): the weighted Mann-Whitney
    statistic, ties counting one half (= roc_auc_score on the samples repeated by their counts).
    NaN where a row gives no weight to the positives or to the negatives."""
    order = np.argsort(score, kind="stable")
    s, pos = score[order], positive[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # groups of tied scores
    w = weights[:, order]
    gp = np.add.reduceat(w * pos, starts, axis=1)           # positive weight per tie group (B, G)
    gn = np.add.reduceat(w * ~pos, starts, axis=1)
    below = np.cumsum(gn, axis=1) - gn                        # negative weight strictly below the group
    pairs = gp.sum(1) * gn.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, (gp * (below + 0.5 * gn)).sum(1) / pairs, np.nan)


def weighted_metrics(y_true, y_score, task: str, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(AUC (B,), ACC (B,)) of MedMNIST's getAUC / getACC for each row of sample weights (B, N)."""
    weights = np.asarray(weights, dtype=np.float64)
    positives, scores = _columns(y_true, y_score, task)
    auc = np.mean([weighted_auc(p, s, weights) for p, s in zip(positives, scores)], axis=0)
    ok = correct(y_true, y_score, task).astype(np.float64)          # (N,) or (N, L): per label
    acc = (weights @ ok.reshape(len(ok), -1)).mean(1) / weights.sum(1)
    return auc, acc


def metrics(y_true, y_score, task: str) -> tuple[float, float]:
    """(AUC, ACC) of the scores as they are (every sample weight 1)."""
    auc, acc = weighted_metrics(y_true, y_score, task, np.ones((1, len(y_true))))
    return float(auc[0]), float(acc[0])


# ----------------------------------------------------------------------------------------------------------
# bootstrap
# ----------------------------------------------------------------------------------------------------------

def strata(y_true, task: str) -> np.ndarray:
    """Stratum of each sample: its class (binary, multi-class); one stratum for multi-label."""
    y_true = np.asarray(y_true)
    return np.zeros(len(y_true), dtype=np.int64) if task == MULTILABEL else y_true.reshape(len(y_true)).astype(np.int64)


def resample_counts(groups: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(n_resamples, N) draw counts: each group's samples drawn with replacement, as many as it holds."""
    n = len(groups)
    rows = np.arange(n_resamples)[:, None] * n
    flat = []
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        flat.append((members[rng.integers(0, len(members), size=(n_resamples, len(members)))] + rows).ravel())
    return np.bincount(np.concatenate(flat), minlength=n_resamples * n).reshape(n_resamples, n)


def bootstrap_metrics(y_true, score_sets: list, task: str, n_resamples: int,
                      seed: int = DEFAULT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(AUC (S, B), ACC (S, B)) of each of S score sets of the same samples on the SAME B stratified
    resamples (paired)."""
    groups = strata(y_true, task)
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, len(groups)))
    aucs, accs = [], []
    for start in range(0, n_resamples, chunk):
        counts = resample_counts(groups, min(chunk, n_resamples - start), rng)
        results = [weighted_metrics(y_true, s, task, counts) for s in score_sets]
        aucs.append(np.stack([r[0] for r in results]))
        accs.append(np.stack([r[1] for r in results]))
    return np.concatenate(aucs, axis=1), np.concatenate(accs, axis=1)


def percentile_interval(samples: np.ndarray, level: float) -> list:
    """[low, high]: the central `level` percentile interval of the finite samples."""
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return [float("nan"), float("nan")]
    low, high = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return [float(low), float(high)]


def confidence_intervals(y_true, score_sets, task: str, n_resamples: int = 2000, level: float = 0.95,
                         seed: int = DEFAULT_SEED) -> dict | None:
    """{'auc': [lo, hi], 'acc': [lo, hi], ...}: percentile bootstrap intervals of the AUC and ACC of one
    score array (N, K), or of their mean over a list of score arrays of the same samples (each resample
    scores every array on the same samples). None when n_resamples is 0."""
    if n_resamples <= 0:
        return None
    if not 0 < level < 1:
        raise ValueError(f"the confidence level must lie between 0 and 1, not {level}")
    sets = [score_sets] if isinstance(score_sets, np.ndarray) else list(score_sets)
    auc, acc = bootstrap_metrics(y_true, sets, task, n_resamples, seed)
    auc, acc = auc.mean(0), acc.mean(0)
    return {"auc": percentile_interval(auc, level), "acc": percentile_interval(acc, level), "level": level,
            "resamples": n_resamples, "resamples_left_out": int(np.sum(~np.isfinite(auc))),
            "method": "percentile bootstrap" + ("" if task == MULTILABEL else ", stratified by class")}


# ----------------------------------------------------------------------------------------------------------
# paired tests
# ----------------------------------------------------------------------------------------------------------

def delong(positive: np.ndarray, score_sets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(AUCs (k,), covariance (k, k)) of k scorers of the same samples by DeLong et al. (1988), from
    midranks (Sun & Xu 2014): the placement value of a positive is the fraction of negatives scored below
    it (ties one half), of a negative the fraction of positives scored above it."""
    score_sets = np.atleast_2d(np.asarray(score_sets, dtype=np.float64))
    pos, neg = score_sets[:, positive], score_sets[:, ~positive]
    m, n = pos.shape[1], neg.shape[1]
    if m < 2 or n < 2:
        raise ValueError(f"DeLong's test needs at least 2 positives and 2 negatives (got {m} and {n})")
    rank_all = sps.rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    v10 = (rank_all[:, :m] - sps.rankdata(pos, axis=1)) / n        # (k, m)
    v01 = 1 - (rank_all[:, m:] - sps.rankdata(neg, axis=1)) / m    # (k, n)
    aucs = v10.mean(1)
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return aucs, cov


def delong_test(positive, score_a, score_b, level: float = 0.95) -> dict:
    """DeLong's test of AUC(a) - AUC(b) on the same samples: delta, its CI, two-sided p-value."""
    aucs, cov = delong(np.asarray(positive, dtype=bool), np.stack([score_a, score_b]))
    delta = float(aucs[0] - aucs[1])
    var = float(max(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1], 0.0))
    sd = np.sqrt(var)
    z = sps.norm.ppf((1 + level) / 2)
    p = 1.0 if sd == 0 else float(2 * sps.norm.sf(abs(delta) / sd))
    return {"delta": delta, "ci": [delta - z * sd, delta + z * sd], "p_value": min(p, 1.0), "variance": var}


def mcnemar_exact(correct_a, correct_b) -> dict:
    """McNemar's exact test: two-sided binomial test (p = 1/2) on the discordant pairs."""
    correct_a, correct_b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    b, c = int(np.sum(correct_a & ~correct_b)), int(np.sum(~correct_a & correct_b))
    p = 1.0 if b + c == 0 else float(min(1.0, 2 * sps.binom.cdf(min(b, c), b + c, 0.5)))
    return {"a_only": b, "b_only": c, "p_value": p}


def paired_bootstrap(deltas: np.ndarray, observed: float, level: float) -> tuple[list, float]:
    """(percentile CI of the difference, two-sided p-value): the share of resampled differences, shifted
    to the null (centred on 0), at least as far from 0 as the observed one, (1 + count) / (1 + B)."""
    finite = deltas[np.isfinite(deltas)]
    extreme = np.sum(np.abs(finite - observed) >= abs(observed) - 1e-12)
    return percentile_interval(finite, level), float((1 + extreme) / (1 + finite.size))


def compare_scores(y_true, score_a, score_b, task: str | None = None, n_resamples: int = 2000,
                   level: float = 0.95, seed: int = DEFAULT_SEED) -> dict:
    """Model a vs model b on the same samples: deltas (a - b) of AUC and ACC with CIs and p-values."""
    task = task or infer_task(y_true, score_a)
    auc_a, acc_a = metrics(y_true, score_a, task)
    auc_b, acc_b = metrics(y_true, score_b, task)
    out = {"n": int(len(y_true)), "task": task, "auc_a": auc_a, "auc_b": auc_b, "acc_a": acc_a, "acc_b": acc_b,
           "delta_auc": auc_a - auc_b, "delta_acc": acc_a - acc_b, "level": level}
    boot_auc = boot_acc = None
    if n_resamples > 0:
        auc, acc = bootstrap_metrics(y_true, [score_a, score_b], task, n_resamples, seed)
        boot_auc, boot_acc = auc[0] - auc[1], acc[0] - acc[1]
    if task == BINARY:
        positive = _columns(y_true, score_a, task)[0][0]
        test = delong_test(positive, *(_columns(y_true, s, task)[1][0] for s in (score_a, score_b)), level=level)
        out.update(delta_auc_ci=test["ci"], p_value_auc=test["p_value"])
        auc_method = "DeLong"
    elif boot_auc is None:
        out.update(delta_auc_ci=None, p_value_auc=None)
        auc_method = "none (eval.ci_resamples 0)"
    else:
        ci, p = paired_bootstrap(boot_auc, out["delta_auc"], level)
        out.update(delta_auc_ci=ci, p_value_auc=p)
        auc_method = f"paired stratified bootstrap ({n_resamples} resamples)"
    if task == MULTILABEL:
        ci, p = (None, None) if boot_acc is None else paired_bootstrap(boot_acc, out["delta_acc"], level)
        out.update(delta_acc_ci=ci, p_value_acc=p)
        acc_method = f"paired bootstrap ({n_resamples} resamples)" if boot_acc is not None else "none"
    else:
        test = mcnemar_exact(correct(y_true, score_a, task), correct(y_true, score_b, task))
        out.update(delta_acc_ci=None if boot_acc is None else percentile_interval(boot_acc, level),
                   p_value_acc=test["p_value"], discordant=[test["a_only"], test["b_only"]])
        acc_method = "McNemar exact"
    out["method"] = {"auc": auc_method, "acc": acc_method}
    return out


def combine(results: list, alpha: float = 0.05) -> dict:
    """Summary of per-seed comparisons: mean and std (ddof 1) over seeds of each delta, and how many seeds
    have the delta positive / significant (p < alpha)."""
    out = {"n_pairs": len(results), "alpha": alpha}
    for key in ("auc", "acc"):
        deltas = np.array([r[f"delta_{key}"] for r in results], dtype=np.float64)
        pvalues = [r[f"p_value_{key}"] for r in results]
        out[f"delta_{key}_mean"] = float(deltas.mean())
        out[f"delta_{key}_std"] = float(deltas.std(ddof=1)) if len(deltas) > 1 else None
        out[f"{key}_a_better"] = int(np.sum(deltas > 0))
        out[f"{key}_significant"] = int(sum(p is not None and p < alpha for p in pvalues))
    return out
