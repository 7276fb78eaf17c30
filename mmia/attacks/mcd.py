"""MC-dropout attack (Gomez, AAAI 2026, CLIP-MIA-Bench): the pair's cosine over P stochastic
forward passes with dropout p = 0.05 on the attention weights (`mmia.variants.DropoutPass`),
summarised per pair. A memorised pair is expected to keep a high cosine however the attention
is perturbed:
  mean       mean of the P cosines
  neg_std    minus their standard deviation (stable = member)
  mean_std   mean / std (high and stable)
"""

from __future__ import annotations

import numpy as np

from mmia.attacks.base import Attack, Features, MissingInput

STATISTICS = ("mean", "neg_std", "mean_std")
DEFAULT_STATISTIC = "mean"


class MCD(Attack):
    """A statistic of the pair's cosine over MC-dropout passes of the target."""

    name = "mcd"
    requires = ("mcd",)

    def __init__(self, statistic: str = DEFAULT_STATISTIC) -> None:
        if statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
        self.statistic = statistic

    def score(self, features: Features) -> np.ndarray:
        cos = features.mcd_cosines
        if cos is None or cos.shape[1] == 0:
            raise MissingInput("attack 'mcd' requires Features.mcd_cosines (dropout passes)")
        cos = np.asarray(cos, dtype=np.float32)
        if self.statistic == "mean":
            return cos.mean(axis=1)
        spread = cos.std(axis=1, ddof=1) if cos.shape[1] > 1 else np.zeros(len(cos), np.float32)
        if self.statistic == "neg_std":
            return -spread
        return cos.mean(axis=1) / np.maximum(spread, np.float32(1e-6))
