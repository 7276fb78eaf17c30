"""Metrics against hand-computed values on tiny arrays."""

import numpy as np
import pytest

from mmia.metrics import check_labels, evaluate, threshold_at_fpr, tpr_at_fpr

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


def test_threshold_from_known_nonmembers():
    known = np.arange(100) / 100.0
    t = threshold_at_fpr(known, 0.01)
    assert 0.98 < t <= 0.99
    assert np.mean(known >= t) == pytest.approx(0.01)
    assert np.mean(known >= threshold_at_fpr(known, 0.0)) == 0.0


def test_threshold_is_tie_safe():
    known = np.array([1.0, 1.0, 1.0] + [0.0] * 97)
    t = threshold_at_fpr(known, 0.02)  # three tied at the top: cannot take just two of them
    assert np.mean(known >= t) <= 0.02
    rng = np.random.default_rng(0)
    for _ in range(50):
        k = rng.integers(0, 5, size=rng.integers(1, 300)).astype(float)
        for fpr in (0.001, 0.01, 0.1, 0.5):
            t = threshold_at_fpr(k, fpr)
            assert np.mean(k >= t) <= fpr + 1e-12
            # lowest such threshold: including the next tied group would exceed the target
            below = k[k < t]
            if below.size:
                assert np.mean(k >= below.max()) > fpr


def test_evaluate_threshold_metrics_and_achieved_fpr():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.3, 0.2, 0.85, 0.1, 0.05, 0.01])
    known = np.array([0.0, 0.1, 0.2, 0.25])  # target 0 -> threshold just above 0.25
    r = evaluate(y, s, known, target_fpr=0.0, n_bootstrap=0)
    assert r["threshold_source"] == "known_nonmembers"
    assert 0.25 < r["threshold"] < 0.3
    # flagged: members 0.9, 0.8, 0.3 (TPR 3/4); non-members 0.85 (achieved FPR 1/4)
    assert r["achieved_fpr"] == pytest.approx(0.25)
    assert r["advantage"] == pytest.approx(0.5)
    assert r["balanced_accuracy"] == pytest.approx(0.75)
    assert r["n_members"] == 4 and r["n_nonmembers"] == 4
    r2 = evaluate(y, s, None, target_fpr=0.0, n_bootstrap=0)
    assert r2["threshold_source"] == "evaluation_nonmembers"
    assert r2["achieved_fpr"] == 0.0


def test_evaluate_bootstrap_intervals():
    rng = np.random.default_rng(1)
    y = np.r_[np.ones(300), np.zeros(300)].astype(int)
    s = rng.normal(size=600) + y
    r = evaluate(y, s, rng.normal(size=500), n_bootstrap=200, seed=0)
    keys = {"auc", "tpr@1%fpr", "tpr@0.1%fpr", "balanced_accuracy", "advantage"}
    assert keys <= set(r) and keys <= set(r["ci95"])
    lo, hi = r["ci95"]["auc"]
    assert lo < r["auc"] < hi and hi - lo < 0.15
    assert evaluate(y, s, n_bootstrap=50, seed=3) == evaluate(y, s, n_bootstrap=50, seed=3)


@pytest.mark.parametrize("bad", [[1, 1, 1], [0, 2, 1], [[0, 1]], [], [0.5, 1.0]])
def test_bad_labels_rejected(bad):
    with pytest.raises(ValueError):
        check_labels(np.array(bad))
