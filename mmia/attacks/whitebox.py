"""White-box attacks (Gomez, AAAI 2026): the pair's contrastive loss against a fixed set of
in-distribution negatives, and the norm of that loss's gradient with respect to the target's
two projection layers (lower = more likely member; scores are negated).

The negatives (at most `n_negatives`, drawn with `seed`, then held fixed) come from the pool
(`negatives="pool"`: in-distribution pairs that are neither scored nor calibrated on, so every
known non-member calibrates the threshold) or from the known non-members ("known_nonmembers":
the audit then calibrates on the other known non-members, as for WSA).
For a pair with unit image and text features e, t, negatives E, T and logit scale s:
  L = ½ [-log softmax(s·[e·t, e·T])₀ - log softmax(s·[t·e, t·E])₀]
Only the pair's own features depend on the projections (the negatives are constants), so with
u = W h the projection's output and e = u/‖u‖, ∂L/∂W = h (∂L/∂u)ᵀ and
  ‖∂L/∂W‖ = ‖h‖/‖u‖ · ‖(I - e eᵀ) ∂L/∂e‖;
the embedding phase caches ‖h‖/‖u‖ per image and per caption (`mmia.variants.WhiteboxNorms`)
and the gradient norm is sqrt(‖∂L/∂W_image‖² + ‖∂L/∂W_text‖²).
"""

from __future__ import annotations

import numpy as np
from scipy.special import log_softmax, softmax
from sklearn.utils.validation import check_is_fitted

from mmia.attacks.base import Attack, Features, MissingInput

N_NEGATIVES = 1024
BLOCK = 4096  # pairs per block: (BLOCK x n_negatives) logits


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(1e-12))


def loss_and_grad(image: np.ndarray, text: np.ndarray, whitebox: np.ndarray,
                  neg_image: np.ndarray, neg_text: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n,) contrastive losses and (n,) gradient norms w.r.t. the projection layers."""
    e, t = _unit(image).astype(np.float64), _unit(text).astype(np.float64)
    neg_e, neg_t = _unit(neg_image).astype(np.float64), _unit(neg_text).astype(np.float64)
    ratio_e, ratio_t, scale = (whitebox[:, i].astype(np.float64) for i in range(3))
    pos = scale * np.einsum("nd,nd->n", e, t)
    a = np.c_[pos, scale[:, None] * (e @ neg_t.T)]  # image -> texts
    b = np.c_[pos, scale[:, None] * (t @ neg_e.T)]  # text -> images
    loss = -0.5 * (log_softmax(a, axis=1)[:, 0] + log_softmax(b, axis=1)[:, 0])
    p, q = softmax(a, axis=1), softmax(b, axis=1)
    half = 0.5 * scale[:, None]
    d_e = half * ((p[:, :1] - 1 + q[:, :1] - 1) * t + p[:, 1:] @ neg_t)
    d_t = half * ((q[:, :1] - 1 + p[:, :1] - 1) * e + q[:, 1:] @ neg_e)

    def tangent_norm(g: np.ndarray, unit: np.ndarray) -> np.ndarray:
        return np.linalg.norm(g - np.einsum("nd,nd->n", g, unit)[:, None] * unit, axis=1)

    grad = np.hypot(ratio_e * tangent_norm(d_e, e), ratio_t * tangent_norm(d_t, t))
    return loss, grad


NEGATIVES = ("pool", "known_nonmembers")


class _Whitebox(Attack):
    requires = ("known_nonmembers", "whitebox")
    output = 0  # 0: loss, 1: gradient norm

    def __init__(self, negatives: str = "known_nonmembers", n_negatives: int = N_NEGATIVES,
                 seed: int = 0) -> None:
        if negatives not in NEGATIVES:
            raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
        self.negatives, self.n_negatives, self.seed = negatives, n_negatives, seed

    @property
    def learns_from_known_nonmembers(self) -> bool:  # type: ignore[override]
        return self.negatives == "known_nonmembers"

    def fit(self, known_nonmembers: Features | None = None, pool: Features | None = None):
        self._check_fit_inputs(known_nonmembers, pool)
        source = pool if self.negatives == "pool" else known_nonmembers
        if source is None or not len(source):
            raise MissingInput(f"attack {self.name!r} takes its negatives from "
                               f"{self.negatives!r}, which is empty")
        n = len(source)
        pick = np.sort(np.random.default_rng(self.seed).permutation(n)[: self.n_negatives])
        self.negative_image_ = _unit(source.image[pick])
        self.negative_text_ = _unit(source.text[pick])
        return self

    def score(self, features: Features) -> np.ndarray:
        check_is_fitted(self, "negative_text_")
        if features.whitebox is None:
            raise MissingInput(f"attack {self.name!r} requires Features.whitebox "
                               "(the projection norms)")
        out = np.empty(len(features), np.float32)
        for start in range(0, len(features), BLOCK):
            rows = slice(start, start + BLOCK)
            values = loss_and_grad(features.image[rows], features.text[rows],
                                   features.whitebox[rows], self.negative_image_,
                                   self.negative_text_)
            out[rows] = -values[self.output]
        return out


class Loss(_Whitebox):
    """Minus the pair's contrastive loss against fixed known non-member negatives."""

    name = "loss"
    output = 0


class Grad(_Whitebox):
    """Minus the norm of that loss's gradient w.r.t. the image and text projections."""

    name = "grad"
    output = 1
