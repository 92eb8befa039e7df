"""engine/stats.py against independent references: medmnist's getAUC/getACC on explicit resamples, DeLong's
placement values written out by hand, scipy's binomial test, and bootstrap coverage of a known population AUC."""

from __future__ import annotations

import math

import numpy as np
import pytest
from medmnist.evaluator import getACC, getAUC
from scipy import stats as sps

from engine import stats

TASKS = ["binary-class", "multi-class", "multi-label, binary-class"]


def fake_scores(task, n, k, rng, ties=True):
    if task == "multi-label, binary-class":
        y = (rng.random((n, k)) < 0.3).astype(int)
        y[0], y[1] = 0, 1
        s = rng.random((n, k))
    else:
        y = np.r_[np.arange(k), rng.integers(0, k, n - k)].reshape(n, 1)
        s = rng.random((n, k))
        s /= s.sum(1, keepdims=True)
    return y, (np.round(s, 1) if ties else s)  # rounding: many tied scores


@pytest.mark.parametrize("task, k", [("binary-class", 2), ("multi-class", 5), ("multi-label, binary-class", 4)])
def test_weighted_metrics_are_medmnist_metrics_of_the_resampled_set(task, k):
    rng = np.random.default_rng(3)
    y, s = fake_scores(task, 80, k, rng)
    counts = stats.resample_counts(stats.strata(y, task), 25, rng)
    auc, acc = stats.weighted_metrics(y, s, task, counts)
    for i in range(25):
        idx = np.repeat(np.arange(len(y)), counts[i])
        assert auc[i] == pytest.approx(getAUC(y[idx], s[idx], task), abs=1e-12)
        assert acc[i] == pytest.approx(getACC(y[idx], s[idx], task), abs=1e-12)
    assert stats.metrics(y, s, task) == pytest.approx((getAUC(y, s, task), getACC(y, s, task)), abs=1e-12)


def test_stratified_resamples_keep_each_class_count():
    y = np.array([0] * 7 + [1] * 3 + [2] * 5)
    counts = stats.resample_counts(stats.strata(y, "multi-class"), 100, np.random.default_rng(0))
    for c, size in ((0, 7), (1, 3), (2, 5)):
        assert (counts[:, y == c].sum(1) == size).all()
    assert counts[:, y == 1].std() > 0  # resampled within the class, not copied


def _psi(x, y):
    return 1.0 if x > y else 0.5 if x == y else 0.0


def test_delong_against_placement_values_by_hand():
    pos_a, neg_a = [0.9, 0.8, 0.8, 0.55, 0.4], [0.7, 0.5, 0.5, 0.3, 0.2, 0.1]
    pos_b, neg_b = [0.6, 0.85, 0.3, 0.7, 0.5], [0.4, 0.5, 0.65, 0.1, 0.2, 0.3]
    m, n = len(pos_a), len(neg_a)
    v10 = np.array([[np.mean([_psi(x, y) for y in neg]) for x in pos] for pos, neg in ((pos_a, neg_a), (pos_b, neg_b))])
    v01 = np.array([[np.mean([_psi(x, y) for x in pos]) for y in neg] for pos, neg in ((pos_a, neg_a), (pos_b, neg_b))])
    s10 = np.array([[sum((v10[r, i] - v10[r].mean()) * (v10[c, i] - v10[c].mean()) for i in range(m)) / (m - 1)
                     for c in range(2)] for r in range(2)])
    s01 = np.array([[sum((v01[r, j] - v01[r].mean()) * (v01[c, j] - v01[c].mean()) for j in range(n)) / (n - 1)
                     for c in range(2)] for r in range(2)])
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
    delta = v10[0].mean() - v10[1].mean()
    p = math.erfc(abs(delta) / math.sqrt(var) / math.sqrt(2))

    positive = np.array([True] * m + [False] * n)
    result = stats.delong_test(positive, np.array(pos_a + neg_a), np.array(pos_b + neg_b))
    assert result["delta"] == pytest.approx(delta, abs=1e-12)
    assert result["variance"] == pytest.approx(var, rel=1e-10)
    assert result["p_value"] == pytest.approx(p, rel=1e-10)
    half = 1.959963984540054 * math.sqrt(var)
    assert result["ci"] == pytest.approx([delta - half, delta + half], rel=1e-9)


@pytest.mark.parametrize("task, k", [("binary-class", 2), ("multi-class", 4), ("multi-label, binary-class", 3)])
def test_a_model_against_itself_gives_p_one(task, k):
    y, s = fake_scores(task, 60, k, np.random.default_rng(1), ties=False)
    r = stats.compare_scores(y, s, s.copy(), task, n_resamples=200)
    assert r["delta_auc"] == 0 and r["delta_acc"] == 0
    assert r["p_value_auc"] == 1 and r["p_value_acc"] == 1
    assert r["delta_auc_ci"] == pytest.approx([0, 0], abs=1e-12)


def test_independent_random_scorers_give_uniform_p_values():
    """Two scorers unrelated to the labels and to each other: under the null, p ~ U(0, 1)."""
    rng = np.random.default_rng(7)
    positive = np.r_[np.ones(40, bool), np.zeros(80, bool)]
    p = np.array([stats.delong_test(positive, rng.random(120), rng.random(120))["p_value"] for _ in range(400)])
    assert sps.kstest(p, "uniform").pvalue > 0.01
    assert 8 <= np.sum(p < 0.05) <= 35  # 20 expected; binomial(400, 0.05) 99.9 % range ~ [7, 36]


def test_mcnemar_is_scipys_binomial_test_on_the_discordant_pairs():
    rng = np.random.default_rng(2)
    for _ in range(30):
        a, b = rng.random(50) < rng.random(), rng.random(50) < rng.random()
        only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
        expected = 1.0 if only_a + only_b == 0 else sps.binomtest(only_a, only_a + only_b, 0.5).pvalue
        r = stats.mcnemar_exact(a, b)
        assert (r["a_only"], r["b_only"]) == (only_a, only_b)
        assert r["p_value"] == pytest.approx(expected, rel=1e-9)


def test_bootstrap_interval_covers_the_population_auc_and_acc():
    """Binormal model: negatives N(0, 1), positives N(d, 1): AUC = Phi(d / sqrt 2); at threshold t the accuracy
    of a set with fixed class counts is (P Phi(d - t) + N Phi(t)) / (P + N). 200 sets of 70 + 230 samples."""
    d, t, n_pos, n_neg, sets = 1.0, 0.8, 70, 230, 200
    true_auc = sps.norm.cdf(d / math.sqrt(2))
    true_acc = (n_pos * sps.norm.cdf(d - t) + n_neg * sps.norm.cdf(t)) / (n_pos + n_neg)
    rng = np.random.default_rng(11)
    y = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
    hits = np.zeros(2, int)
    for _ in range(sets):
        z = rng.normal(size=n_pos + n_neg) + d * y
        p1 = 1 / (1 + np.exp(-(z - t)))  # > 0.5 exactly when z > t
        ci = stats.confidence_intervals(y, np.stack([1 - p1, p1], 1), "binary-class", n_resamples=300)
        hits += [ci["auc"][0] <= true_auc <= ci["auc"][1], ci["acc"][0] <= true_acc <= ci["acc"][1]]
    # Binomial(200, 0.95): P(X <= 181) ~ 0.2 %, P(X >= 199) ~ 0.4 %
    assert (182 <= hits).all() and (hits <= 198).all(), hits


def test_intervals_are_reproducible_and_seeded():
    y, s = fake_scores("multi-class", 90, 3, np.random.default_rng(5))
    first = stats.confidence_intervals(y, s, "multi-class", n_resamples=500)
    assert stats.confidence_intervals(y, s.copy(), "multi-class", n_resamples=500) == first
    assert stats.confidence_intervals(y, s, "multi-class", n_resamples=500, seed=1)["auc"] != first["auc"]
    assert first["auc"][0] < stats.metrics(y, s, "multi-class")[0] < first["auc"][1]
    assert stats.confidence_intervals(y, s, "multi-class", n_resamples=0) is None


def test_interval_of_a_mean_uses_the_same_resamples_for_every_score_set():
    """--last-k: the interval of the mean over k checkpoints; each resample scores every checkpoint on the
    same samples (checked with getAUC on the explicit resamples)."""
    rng = np.random.default_rng(9)
    y, s1 = fake_scores("binary-class", 50, 2, rng, ties=False)
    s2 = np.clip(s1 + rng.normal(0, 0.2, s1.shape), 0, 1)
    ci = stats.confidence_intervals(y, [s1, s2], "binary-class", n_resamples=60, seed=4)
    counts = stats.resample_counts(stats.strata(y, "binary-class"), 60, np.random.default_rng(4))
    means = []
    for row in counts:
        idx = np.repeat(np.arange(len(y)), row)
        means.append((getAUC(y[idx], s1[idx], "binary-class") + getAUC(y[idx], s2[idx], "binary-class")) / 2)
    assert ci["auc"] == pytest.approx(list(np.quantile(means, [0.025, 0.975])), abs=1e-12)
