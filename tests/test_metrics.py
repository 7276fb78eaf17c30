"""Metrics against hand-computed values on tiny arrays."""

import numpy as np
import pytest
from scipy.stats import norm

from mmia.metrics import (
    auc_with_delong,
    bootstrap_tpr_at_fpr,
    check_labels,
    conformal_p_values,
    evaluate,
    threshold_at_fpr,
    tpr_at_fpr,
)

Y4 = np.array([0, 0, 1, 1])
S4 = np.array([0.1, 0.4, 0.35, 0.8])


def test_auc_four_samples_and_positive_class_convention():
    # pairs (member, non-member): (0.35>0.1) (0.35<0.4) (0.8>0.1) (0.8>0.4) -> 3/4
    assert evaluate(Y4, S4, n_bootstrap=0)["auc"] == pytest.approx(0.75)
    assert evaluate(1 - Y4, S4, n_bootstrap=0)["auc"] == pytest.approx(0.25)


def test_tpr_at_fpr_is_interpolation_free():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.3, 0.2, 0.85, 0.1, 0.05, 0.01])
    assert tpr_at_fpr(y, s, 0.0) == pytest.approx(0.25)
    assert tpr_at_fpr(y, s, 0.2) == pytest.approx(0.25)  # no ROC point between 0 and 0.25
    assert tpr_at_fpr(y, s, 0.25) == pytest.approx(1.0)
    # flipping labels (members become non-members) changes the answer: positive class = 1
    assert tpr_at_fpr(1 - y, s, 0.25) == pytest.approx(0.25)


def _p_of(known, t):
    """Conformal p-value of a score at threshold t: (1 + #{known >= t}) / (1 + n)."""
    return (1 + np.sum(known >= t)) / (1 + known.size)


def test_threshold_from_known_nonmembers_is_conformal():
    known = np.arange(199) / 199.0
    t = threshold_at_fpr(known, 0.01)  # (1 + k) / 200 <= 0.01 allows k = 1 known above t
    assert known[-2] < t <= known[-1] and np.sum(known >= t) == 1
    assert threshold_at_fpr(np.arange(98.0), 0.01) == np.inf  # (1 + 0) / 99 > 0.01: nobody
    assert np.mean(known >= threshold_at_fpr(known, 0.0)) == 0.0


def test_threshold_is_tie_safe_and_lowest_valid():
    known = np.array([1.0, 1.0, 1.0] + [0.0] * 197)
    # (1 + 2) / 201 <= 0.015 allows two above t, but three tie at the top: none, not two
    assert np.sum(known >= threshold_at_fpr(known, 0.015)) == 0
    assert np.sum(known >= threshold_at_fpr(known, 0.02)) == 3  # (1 + 3) / 201 <= 0.02
    rng = np.random.default_rng(0)
    for _ in range(50):
        k = rng.integers(0, 5, size=rng.integers(1, 300)).astype(float)
        for fpr in (0.001, 0.01, 0.1, 0.5):
            t = threshold_at_fpr(k, fpr)
            if t == np.inf:  # even a score above every known one has p = 1 / (n + 1) > fpr
                assert 1 / (k.size + 1) > fpr
                continue
            assert _p_of(k, t) <= fpr + 1e-12
            below = k[k < t]  # lowest such threshold: the next tied group would exceed it
            if below.size:
                assert _p_of(k, below.max()) > fpr
            # the decision "score >= t" is the decision "conformal p-value <= fpr"
            grid = np.linspace(-1, 6, 29)
            assert np.array_equal(grid >= t, conformal_p_values(k, grid) <= fpr + 1e-12)


def test_calibrated_threshold_holds_its_fpr_on_fresh_nonmembers():
    rng = np.random.default_rng(5)
    fprs = [np.mean(rng.normal(size=20_000) >= threshold_at_fpr(rng.normal(size=250), 0.01))
            for _ in range(300)]
    # conformal: k = 1 known above t, expected FPR (1 + 1) / 251 = 0.008 <= 1 %; the rank rule
    # k = floor(0.01 * 250) = 2 gave (2 + 1) / 251 = 0.012 > 1 %
    assert abs(np.mean(fprs) - 2 / 251) < 0.001 and np.mean(fprs) <= 0.01


def test_evaluate_threshold_metrics_and_achieved_fpr():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.3, 0.2, 0.85, 0.1, 0.05, 0.01])
    known = np.array([0.0, 0.1, 0.2, 0.25])  # target 0.2: (1 + 0) / 5 -> just above 0.25
    r = evaluate(y, s, known, target_fpr=0.2, n_bootstrap=0)
    assert r["threshold_source"] == "known_nonmembers" and r["n_calibration"] == 4
    assert 0.25 < r["threshold"] < 0.3
    # flagged: members 0.9, 0.8, 0.3 (TPR 3/4); non-members 0.85 (achieved FPR 1/4)
    assert r["tpr_at_threshold"] == pytest.approx(0.75)
    assert r["achieved_fpr"] == pytest.approx(0.25)
    assert r["advantage"] == pytest.approx(0.5)
    assert r["balanced_accuracy"] == pytest.approx(0.75)
    assert r["n_members"] == 4 and r["n_nonmembers"] == 4
    # exact binomial intervals of 3/4 and 1/4 (Clopper-Pearson, by hand from the beta quantiles)
    from scipy.stats import beta

    assert r["ci95"]["tpr_at_threshold"] == pytest.approx([beta.ppf(0.025, 3, 2),
                                                          beta.ppf(0.975, 4, 1)])
    assert r["ci95"]["achieved_fpr"] == pytest.approx([beta.ppf(0.025, 1, 4),
                                                      beta.ppf(0.975, 2, 3)])
    assert r["ci_method"]["achieved_fpr"] == "clopper-pearson"
    # advantage TPR - FPR: both rates' 97.5 % intervals, combined (Bonferroni)
    t_lo, f_hi = beta.ppf(0.0125, 3, 2), beta.ppf(0.9875, 2, 3)
    assert r["ci95"]["advantage"][0] == pytest.approx(t_lo - f_hi)
    assert r["ci95"]["balanced_accuracy"][0] == pytest.approx((1 + t_lo - f_hi) / 2)
    r2 = evaluate(y, s, None, target_fpr=0.2, n_bootstrap=0)
    assert r2["threshold_source"] == "evaluation_nonmembers"
    assert r2["ci95"]["achieved_fpr"] is None  # calibrated on itself: no honest interval


def test_delong_matches_hand_computed_variance():
    y = np.array([1, 1, 1, 0, 0])
    s = np.array([0.9, 0.4, 0.6, 0.5, 0.1])
    auc, (lo, hi) = auc_with_delong(y, s)
    # placements: members beat 2, 1, 2 of 2 non-members; non-members beaten by 2 and 3 of 3
    v10, v01 = np.array([1.0, 0.5, 1.0]), np.array([2 / 3, 1.0])
    var = v10.var(ddof=1) / 3 + v01.var(ddof=1) / 2
    assert auc == pytest.approx(5 / 6)
    half = 1.959964 * np.sqrt(var) / (auc * (1 - auc))
    logit = np.log(auc / (1 - auc))
    assert [lo, hi] == pytest.approx([1 / (1 + np.exp(-(logit - half))),
                                      1 / (1 + np.exp(-(logit + half)))], rel=1e-5)


def test_bootstrap_tpr_interval_equals_resampling_by_hand():
    rng = np.random.default_rng(2)
    y = np.r_[np.ones(200), np.zeros(1000)].astype(int)
    s = rng.normal(size=1200) + y
    fast = bootstrap_tpr_at_fpr(y, s, 0.01, 20_000, seed=0)
    pos, neg = s[y == 1], s[y == 0]
    slow = [tpr_at_fpr(y, np.r_[rng.choice(pos, 200), rng.choice(neg, 1000)], 0.01)
            for _ in range(2000)]
    assert fast == pytest.approx(list(np.percentile(slow, [2.5, 97.5])), abs=0.011)


def test_evaluate_intervals_and_resolution():
    rng = np.random.default_rng(1)
    y = np.r_[np.ones(300), np.zeros(300)].astype(int)
    s = rng.normal(size=600) + y
    r = evaluate(y, s, rng.normal(size=500), n_bootstrap=200, seed=0)
    for k in ("auc", "tpr@1%fpr", "tpr@0.1%fpr", "tpr_at_threshold", "achieved_fpr",
              "balanced_accuracy", "advantage"):
        assert k in r and k in r["ci95"] and k in r["ci_method"]
    lo, hi = r["ci95"]["auc"]
    assert lo < r["auc"] < hi and hi - lo < 0.15
    # 300 non-members x 1 % = 3 expected false positives: too few for a valid interval
    assert r["ci95"]["tpr@1%fpr"] is None and r["ci95"]["tpr@0.1%fpr"] is None
    y2 = np.r_[np.ones(300), np.zeros(2000)].astype(int)
    s2 = rng.normal(size=2300) + y2
    r2 = evaluate(y2, s2, n_bootstrap=200, seed=0)
    lo, hi = r2["ci95"]["tpr@1%fpr"]
    assert lo <= r2["tpr@1%fpr"] <= hi and r2["ci95"]["tpr@0.1%fpr"] is None
    assert evaluate(y, s, n_bootstrap=50, seed=3) == evaluate(y, s, n_bootstrap=50, seed=3)


def _coverage(rng, d, n_pos, n_neg, reps=600):
    """Share of replicates whose 95 % intervals hold the truth, per metric that has one."""
    true_auc = norm.cdf(d / np.sqrt(2))
    true_tpr = norm.sf(norm.isf(0.01) - d)
    y = np.r_[np.ones(n_pos), np.zeros(n_neg)].astype(int)
    hits, given = {}, {}
    for r in range(reps):
        s = np.r_[rng.normal(d, 1, n_pos), rng.normal(0, 1, n_neg)]
        m = evaluate(y, s, rng.normal(size=500), n_bootstrap=1000, seed=r)
        t = m["threshold"]
        truth = {"auc": true_auc, "tpr@1%fpr": true_tpr, "tpr_at_threshold": norm.sf(t - d),
                 "achieved_fpr": norm.sf(t), "advantage": norm.sf(t - d) - norm.sf(t)}
        for k, v in truth.items():
            ci = m["ci95"][k]
            given[k] = given.get(k, 0) + (ci is not None)
            hits[k] = hits.get(k, 0) + (ci is not None and ci[0] <= v <= ci[1])
    return {k: hits[k] / given[k] for k in truth if given[k]}


@pytest.mark.parametrize("d,n_pos,n_neg", [(1.4, 300, 1000), (0.5, 200, 2000),
                                           (2.0, 3000, 2000)])
def test_interval_coverage_by_simulation(d, n_pos, n_neg):
    coverage = _coverage(np.random.default_rng(7), d, n_pos, n_neg)
    # TPR@1%FPR gets an interval only with >= 20 expected false positives
    assert ("tpr@1%fpr" in coverage) == (n_neg * 0.01 >= 20)
    assert min(coverage.values()) >= 0.93, coverage


@pytest.mark.parametrize("bad", [[1, 1, 1], [0, 2, 1], [[0, 1]], [], [0.5, 1.0]])
def test_bad_labels_rejected(bad):
    with pytest.raises(ValueError):
        check_labels(np.array(bad))


def test_delong_placements_from_sorted_scores_equal_pairwise_counts():
    """The AUC and its DeLong variance, read off the two sorted classes with ties, equal the
    O(m n) pairwise definition."""
    rng = np.random.default_rng(3)
    y = (rng.random(400) < 0.4).astype(int)
    s = rng.integers(0, 12, size=400).astype(float) + y  # heavy ties
    pos, neg = s[y == 1], s[y == 0]
    wins = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = wins.mean(axis=1), wins.mean(axis=0)
    var = v10.var(ddof=1) / pos.size + v01.var(ddof=1) / neg.size
    auc, (lo, hi) = auc_with_delong(y, s)
    assert auc == pytest.approx(wins.mean(), abs=1e-12)
    half = norm.ppf(0.975) * np.sqrt(var) / (auc * (1 - auc))
    logit = np.log(auc / (1 - auc))
    assert [lo, hi] == pytest.approx([1 / (1 + np.exp(half - logit)),
                                      1 / (1 + np.exp(-logit - half))], rel=1e-9)
    r = evaluate(y, s, n_bootstrap=100, seed=1)
    assert r["auc"] == auc and r["ci95"]["auc"] == [lo, hi]
    assert r["tpr@1%fpr"] == tpr_at_fpr(y, s, 0.01)
