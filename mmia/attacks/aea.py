"""Augmentation-Enhanced Attack: aggregate image-text cosine over augmented views.

Ko et al. never released AEA; these aggregations are this suite's, with c0 = cos(view 0, text)
and c1..cK = cos(augmented view k, text):
  mean      mean(c1..cK)
  mean_all  mean(c0..cK)
  min       min(c0..cK)
  drop      c0 - mean(c1..cK)                      (members are said to lose more under transforms)
  zdrop     (c0 - mean(c1..cK)) / std(c1..cK)      (the drop in units of the views' own spread)
The default is chosen on pilot data by `experiments/aea_aggregation.py`; see README.
"""

from __future__ import annotations

import numpy as np

from mmia.attacks.base import Attack, Features, cosine

AGGREGATIONS = ("mean", "mean_all", "min", "drop", "zdrop")
DEFAULT_AGGREGATION = "zdrop"


class AEA(Attack):
    """Aggregate the image-text similarity of K augmented views of each image."""

    name = "aea"
    requires = ("views",)

    def __init__(self, aggregation: str = DEFAULT_AGGREGATION) -> None:
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        self.aggregation = aggregation

    def score(self, features: Features) -> np.ndarray:
        self._check_score_inputs(features)
        base = cosine(features.image, features.text)  # (n,) float32
        if features.view_cosines is not None:  # what the cache keeps (mmia.cache: pairs)
            per_view = features.view_cosines.astype(np.float32, copy=False)
        else:
            per_view = cosine(features.views, features.text[:, None, :])  # (n, K) float32
        return aggregate(base, per_view, self.aggregation)


def aggregate(base: np.ndarray, per_view: np.ndarray, aggregation: str) -> np.ndarray:
    """Combine view-0 cosines (n,) and augmented-view cosines (n, K) into (n,) scores."""
    if aggregation == "mean":
        return per_view.mean(axis=1)
    if aggregation == "mean_all":
        return np.concatenate([base[:, None], per_view], axis=1).mean(axis=1)
    if aggregation == "min":
        return np.minimum(base, per_view.min(axis=1))
    drop = base - per_view.mean(axis=1)
    if aggregation == "drop":
        return drop
    if aggregation == "zdrop":
        return drop / np.maximum(per_view.std(axis=1), 1e-6)
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
