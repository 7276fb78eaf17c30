"""Membership-inference metrics. Member = label 1 = positive class; higher score = member.

Decision rule everywhere: predict member iff score >= threshold.

Two different kinds of numbers, kept apart by name:
- the ROC on the evaluation set (`auc`, `tpr@1%fpr`, `tpr@0.1%fpr`): oracle thresholds chosen on
  the evaluation set itself, as papers report them; AUC gets a DeLong interval (logit scale),
  TPR at a low FPR a stratified bootstrap interval, but only where the evaluation set holds
  enough non-members to resolve that FPR (`MIN_FALSE_POSITIVES` expected false positives);
- the calibrated decision (`threshold`, `tpr_at_threshold`, `achieved_fpr`): a threshold set on
  known non-members that nothing else used, then applied to the evaluation set; its rates are
  binomial proportions at a fixed threshold and get exact Clopper–Pearson intervals.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

LOW_FPRS = {"tpr@1%fpr": 0.01, "tpr@0.1%fpr": 0.001}
LEVEL = 0.95
# a bootstrap interval for TPR at FPR f needs about this many evaluation non-members above the
# threshold (n_nonmembers * f); below it the percentile bootstrap under-covers: the ROC point
# sits at FPR (k + 1) / (n + 1), not f, a bias the bootstrap keeps (tests/test_metrics)
MIN_FALSE_POSITIVES = 20


def check_labels(labels: np.ndarray) -> np.ndarray:
    """Return labels as int64 0/1; raise ValueError unless 1-D 0/1 with both classes present."""
    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0 or not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be a non-empty 1-D array of 0 (non-member) / 1 (member)")
    if len(np.unique(y)) != 2:
        raise ValueError("labels must contain both members (1) and non-members (0)")
    return y.astype(np.int64)


def _check_scores(scores: np.ndarray, n: int) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != (n,):
        raise ValueError(f"scores must have shape ({n},), got {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf")
    return s


def _allowed_above(n: int, fpr: float) -> int:
    """How many of n non-members may score above an ROC threshold at FPR <= fpr."""
    return int(np.floor(fpr * n + 1e-9))


def _tpr_above(sorted_pos: np.ndarray, cut: np.ndarray | float) -> np.ndarray | float:
    """Fraction of (ascending) member scores strictly above `cut`."""
    n = sorted_pos.size
    return (n - np.searchsorted(sorted_pos, cut, side="right")) / n


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr: float) -> float:
    """Max TPR over ROC points whose FPR <= `fpr` (no interpolation).

    With k = floor(fpr * n_nonmembers), the best such point thresholds just above the
    (k+1)-th largest non-member score.
    """
    return _tpr_at_fpr(*_sorted_classes(labels, scores), fpr)


def _sorted_classes(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(members' scores, non-members' scores), each ascending, after validating both inputs."""
    y = check_labels(labels)
    s = _check_scores(scores, len(y))
    member = y == 1
    return np.sort(s[member]), np.sort(s[~member])


def _tpr_at_fpr(pos: np.ndarray, neg: np.ndarray, fpr: float) -> float:
    """`tpr_at_fpr` from ascending member and non-member scores."""
    k = _allowed_above(neg.size, fpr)
    if k >= neg.size:
        return 1.0
    return float(_tpr_above(pos, neg[neg.size - 1 - k]))


def conformal_p_values(known_nonmember_scores: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """p = (1 + #{known >= s}) / (1 + n_known): valid p-values for "this is a non-member".

    Valid when the known non-members are exchangeable with the scored non-members and the
    attack did not train on them.
    """
    known = np.sort(np.asarray(known_nonmember_scores, dtype=np.float64))
    s = np.asarray(scores, dtype=np.float64)
    above = known.size - np.searchsorted(known, s, side="left")
    return (1.0 + above) / (1.0 + known.size)


def threshold_at_fpr(known_nonmember_scores: np.ndarray, target_fpr: float) -> float:
    """Lowest threshold t whose conformal p-value (1 + #{known >= t}) / (1 + n) <= target_fpr.

    A new non-member exchangeable with the known ones then scores >= t with probability at most
    target_fpr (exactly (k + 1) / (n + 1) for the k known allowed above t). Tie-safe: t sits
    just above a known score, so tied scores are never split. Returns +inf (flag nobody) when
    n is too small for the target: n + 1 < 1 / target_fpr.
    """
    s = np.sort(np.asarray(known_nonmember_scores, dtype=np.float64))[::-1]
    if s.size == 0:
        raise ValueError("threshold_at_fpr needs at least one known non-member score")
    if not 0 <= target_fpr < 1:
        raise ValueError("target_fpr must be in [0, 1)")
    k = int(np.floor(target_fpr * (s.size + 1) + 1e-9)) - 1  # known scores allowed >= t
    if k < 0:
        return float("inf")
    if k >= s.size:
        return float("-inf")
    return float(np.nextafter(s[k], np.inf))


def clopper_pearson(successes: int, trials: int, level: float = LEVEL) -> list[float] | None:
    """Exact binomial interval for a proportion; None without trials."""
    if trials <= 0:
        return None
    ci = stats.binomtest(int(successes), int(trials)).proportion_ci(level, method="exact")
    return [float(ci.low), float(ci.high)]


def auc_with_delong(labels: np.ndarray, scores: np.ndarray,
                    level: float = LEVEL) -> tuple[float, list[float]]:
    """AUC (ties count 1/2) and its DeLong interval, built on the logit scale.

    DeLong et al. 1988: the variance of the Mann–Whitney AUC from the members' and
    non-members' placement values. The logit transform keeps the interval inside (0, 1);
    at AUC 0 or 1 (no placement variance) Hanley–McNeil's variance stands in.
    """
    return _auc_with_delong(*_sorted_classes(labels, scores), level)


def _below(sorted_other: np.ndarray, values: np.ndarray) -> np.ndarray:
    """How many of `sorted_other` lie below each value, ties counting 1/2."""
    less = np.searchsorted(sorted_other, values, side="left")
    return less + 0.5 * (np.searchsorted(sorted_other, values, side="right") - less)


def _auc_with_delong(pos: np.ndarray, neg: np.ndarray,
                     level: float = LEVEL) -> tuple[float, list[float]]:
    """`auc_with_delong` from ascending member and non-member scores: O(n log n), no ranks."""
    m, n = pos.size, neg.size
    v10 = _below(neg, pos) / n  # share of non-members below each member (ties 1/2)
    v01 = 1.0 - _below(pos, neg) / m  # share of members above each non-member
    auc = float(v10.mean())
    var = (v10.var(ddof=1) / m if m > 1 else 0.0) + (v01.var(ddof=1) / n if n > 1 else 0.0)
    a = float(np.clip(auc, 0.5 / (m * n), 1 - 0.5 / (m * n)))
    if var <= 0:  # Hanley & McNeil 1982 at the clipped AUC
        q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
        var = (a * (1 - a) + (m - 1) * (q1 - a * a) + (n - 1) * (q2 - a * a)) / (m * n)
    z = stats.norm.ppf(0.5 + level / 2)
    half = z * np.sqrt(var) / (a * (1 - a))
    logit = np.log(a / (1 - a))
    lo, hi = 1 / (1 + np.exp(-(logit - half))), 1 / (1 + np.exp(-(logit + half)))
    return auc, [float(lo), float(hi)]


def bootstrap_tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr: float,
                         n_bootstrap: int, seed: int = 0,
                         level: float = LEVEL) -> list[float] | None:
    """Stratified percentile-bootstrap interval of `tpr_at_fpr`, in O(n_bootstrap log n).

    Exact resampling without materialising resamples: the (k+1)-th largest of n resampled
    non-members is the empirical quantile at a Beta(n - k, k + 1) level, and the number of
    resampled members above a cut holding c of m members is Binomial(m, c / m).
    """
    pos, neg = _sorted_classes(labels, scores)
    return _bootstrap_tpr_at_fpr(pos, neg, fpr, n_bootstrap, seed, level)


def _bootstrap_tpr_at_fpr(pos: np.ndarray, neg: np.ndarray, fpr: float, n_bootstrap: int,
                          seed: int = 0, level: float = LEVEL) -> list[float] | None:
    """`bootstrap_tpr_at_fpr` from ascending member and non-member scores."""
    if n_bootstrap <= 0:
        return None
    rng = np.random.default_rng(seed)
    n, m = neg.size, pos.size
    k = _allowed_above(n, fpr)
    if k >= n:
        return [1.0, 1.0]
    u = rng.beta(n - k, k + 1, size=n_bootstrap)  # (n-k)-th smallest of n uniforms
    cut = neg[np.clip(np.ceil(u * n).astype(np.int64) - 1, 0, n - 1)]
    draws = rng.binomial(m, _tpr_above(pos, cut)) / m
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(draws, tail)), float(np.percentile(draws, 100 - tail))]


def evaluate(
    labels: np.ndarray,
    scores: np.ndarray,
    known_nonmember_scores: np.ndarray | None = None,
    target_fpr: float = 0.01,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict:
    """ROC figures and the calibrated decision of one attack, each with its own 95 % interval.

    `known_nonmember_scores` must come from known non-members the attack did not train on;
    without them the threshold falls back to the evaluation non-members' own quantile
    (`threshold_source` says which) and the achieved FPR gets no interval (it is not an
    independent estimate then). `ci95[name]` is None where no valid interval exists;
    `ci_method[name]` names the method of each interval.
    """
    y = check_labels(labels)
    s = _check_scores(scores, len(y))
    known = None if known_nonmember_scores is None else np.asarray(known_nonmember_scores, float)
    if known is not None and known.size == 0:
        known = None
    calibration = known if known is not None else s[y == 0]
    threshold = threshold_at_fpr(calibration, target_fpr)
    member = y == 1
    pos, neg = np.sort(s[member]), np.sort(s[~member])  # the one sort of each class
    n_pos, n_neg = pos.size, neg.size
    flagged_pos = int(n_pos - np.searchsorted(pos, threshold, side="left"))
    flagged_neg = int(n_neg - np.searchsorted(neg, threshold, side="left"))
    tpr, fpr = flagged_pos / n_pos, flagged_neg / n_neg

    auc, auc_ci = _auc_with_delong(pos, neg)
    res: dict = {"auc": auc}
    ci: dict[str, list[float] | None] = {"auc": auc_ci}
    method = {"auc": "delong"}
    for name, f in LOW_FPRS.items():
        res[name] = _tpr_at_fpr(pos, neg, f)
        resolvable = n_neg * f >= MIN_FALSE_POSITIVES
        ci[name] = (_bootstrap_tpr_at_fpr(pos, neg, f, n_bootstrap, seed) if resolvable
                    else None)
        method[name] = "bootstrap"
    res.update(
        threshold=threshold,
        threshold_source="known_nonmembers" if known is not None else "evaluation_nonmembers",
        target_fpr=float(target_fpr),
        n_calibration=int(calibration.size),
        tpr_at_threshold=tpr,
        achieved_fpr=fpr,
        balanced_accuracy=(tpr + 1.0 - fpr) / 2.0,
        advantage=tpr - fpr,
        n_members=n_pos,
        n_nonmembers=n_neg,
        n_known_nonmembers=0 if known is None else int(known.size),
        min_resolvable_fpr=1.0 / n_neg,
    )
    ci["tpr_at_threshold"] = clopper_pearson(flagged_pos, n_pos)
    ci["achieved_fpr"] = clopper_pearson(flagged_neg, n_neg) if known is not None else None
    ci["advantage"] = ci["balanced_accuracy"] = None
    if known is not None:  # TPR and FPR are independent: both 97.5 % intervals hold at 95 %
        t_lo, t_hi = clopper_pearson(flagged_pos, n_pos, 1 - (1 - LEVEL) / 2)
        f_lo, f_hi = clopper_pearson(flagged_neg, n_neg, 1 - (1 - LEVEL) / 2)
        ci["advantage"] = [t_lo - f_hi, t_hi - f_lo]
        ci["balanced_accuracy"] = [(1 + t_lo - f_hi) / 2, (1 + t_hi - f_lo) / 2]
    method.update(tpr_at_threshold="clopper-pearson", achieved_fpr="clopper-pearson",
                  advantage="clopper-pearson-bonferroni",
                  balanced_accuracy="clopper-pearson-bonferroni")
    res["ci95"] = ci
    res["ci_method"] = method
    return res
