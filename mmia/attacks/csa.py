"""Cosine Similarity Attack (Ko et al. 2023): score = cos(f_img(x), f_txt(t))."""

from __future__ import annotations

import numpy as np

from mmia.attacks.base import Attack, Features, cosine


class CSA(Attack):
    """Image-text cosine similarity; needs nothing beyond the pair's embeddings."""

    name = "csa"
    requires = ()

    def score(self, features: Features) -> np.ndarray:
        return cosine(features.image, features.text)
