"""Augmentation-Enhanced Attack: aggregate image-text cosine over augmented views.

The paper's aggregation rule is not public; the options below are this suite's choices:
  mean      mean cos over augmented views 1..K
  mean_all  mean cos over view 0 and views 1..K
  min       minimum cos over views 0..K
  drop      cos(view 0) - mean cos(views 1..K)  (members are said to lose more under transforms)
"""

from __future__ import annotations

import numpy as np

from mmia.attacks.base import Attack, Features, cosine

AGGREGATIONS = ("mean", "mean_all", "min", "drop")


class AEA(Attack):
    """Aggregate the image-text similarity of K augmented views of each image."""

    name = "aea"
    requires = ("views",)

    def __init__(self, aggregation: str = "drop") -> None:
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        self.aggregation = aggregation

    def score(self, features: Features) -> np.ndarray:
        self._check_score_inputs(features)
        base = cosine(features.image, features.text)  # (n,)
        per_view = cosine(features.views, features.text[:, None, :])  # (n, K)
        if self.aggregation == "mean":
            return per_view.mean(axis=1)
        if self.aggregation == "mean_all":
            return np.concatenate([base[:, None], per_view], axis=1).mean(axis=1)
        if self.aggregation == "min":
            return np.minimum(base, per_view.min(axis=1))
        return base - per_view.mean(axis=1)
