"""Membership-inference metrics. Member = label 1 = positive class; higher score = member.

Decision rule everywhere: predict member iff score >= threshold.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import auc as _sk_auc
from sklearn.metrics import roc_curve

LOW_FPRS = {"tpr@1%fpr": 0.01, "tpr@0.1%fpr": 0.001}


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


def _roc(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    fpr, tpr, _ = roc_curve(y, s, pos_label=1, drop_intermediate=False)
    return fpr, tpr


def _tpr_at(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    ok = fpr <= target + 1e-12
    return float(tpr[ok].max())


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr: float) -> float:
    """Max TPR over ROC points whose FPR <= `fpr` (no interpolation)."""
    y = check_labels(labels)
    f, t = _roc(y, _check_scores(scores, len(y)))
    return _tpr_at(f, t, fpr)


def threshold_at_fpr(known_nonmember_scores: np.ndarray, target_fpr: float) -> float:
    """Lowest threshold with fraction(known non-members >= threshold) <= target_fpr.

    Equivalent to the (1 - target_fpr) quantile, made tie-safe: the threshold sits just above the
    (k+1)-th largest known score, k = floor(target_fpr * n), so tied scores are never split.
    """
    s = np.sort(np.asarray(known_nonmember_scores, dtype=np.float64))[::-1]
    if s.size == 0:
        raise ValueError("threshold_at_fpr needs at least one known non-member score")
    if not 0 <= target_fpr < 1:
        raise ValueError("target_fpr must be in [0, 1)")
    k = int(np.floor(target_fpr * s.size + 1e-9))
    return float(np.nextafter(s[k], np.inf))


def _auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    return float(_sk_auc(fpr, tpr))


def _point_metrics(y: np.ndarray, s: np.ndarray, threshold: float) -> dict[str, float]:
    fpr, tpr = _roc(y, s)
    out = {"auc": _auc(fpr, tpr)}
    out.update({k: _tpr_at(fpr, tpr, v) for k, v in LOW_FPRS.items()})
    pred = s >= threshold
    t, f = float(pred[y == 1].mean()), float(pred[y == 0].mean())
    out["balanced_accuracy"] = (t + 1.0 - f) / 2.0
    out["advantage"] = t - f
    out["tpr_at_threshold"] = t
    out["achieved_fpr"] = f
    return out


def evaluate(
    labels: np.ndarray,
    scores: np.ndarray,
    known_nonmember_scores: np.ndarray | None = None,
    target_fpr: float = 0.01,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict:
    """AUC, TPR at 1 % / 0.1 % FPR, thresholded metrics and stratified-bootstrap 95 % CIs.

    The decision threshold comes from `known_nonmember_scores` at `target_fpr`; without them it
    falls back to the evaluation non-members' own quantile ("threshold_source" says which).
    The bootstrap resamples members, non-members and known non-members separately and
    recomputes the threshold in each replicate.
    """
    y = check_labels(labels)
    s = _check_scores(scores, len(y))
    known = None if known_nonmember_scores is None else np.asarray(known_nonmember_scores, float)
    if known is not None and known.size == 0:
        known = None
    source = "known_nonmembers" if known is not None else "evaluation_nonmembers"

    def thr(s_eval: np.ndarray, y_eval: np.ndarray, kn: np.ndarray | None) -> float:
        return threshold_at_fpr(kn if kn is not None else s_eval[y_eval == 0], target_fpr)

    threshold = thr(s, y, known)
    res: dict = _point_metrics(y, s, threshold)
    res.update(
        threshold=threshold,
        threshold_source=source,
        target_fpr=float(target_fpr),
        n_members=int((y == 1).sum()),
        n_nonmembers=int((y == 0).sum()),
        n_known_nonmembers=0 if known is None else int(known.size),
        min_resolvable_fpr=1.0 / int((y == 0).sum()),
    )
    res["ci95"] = _bootstrap(y, s, known, thr, n_bootstrap, seed)
    return res


def _bootstrap(y, s, known, thr, n_bootstrap: int, seed: int) -> dict[str, list[float]]:
    if n_bootstrap <= 0:
        return {}
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    draws: dict[str, list[float]] = {}
    for _ in range(n_bootstrap):
        idx = np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)])
        yb, sb = y[idx], s[idx]
        kb = None if known is None else known[rng.integers(0, known.size, known.size)]
        for k, v in _point_metrics(yb, sb, thr(sb, yb, kb)).items():
            draws.setdefault(k, []).append(v)
    return {
        k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for k, v in draws.items()
    }
