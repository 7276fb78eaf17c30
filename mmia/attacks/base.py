"""Shared contract for all attacks: the `Features` bundle and the `Attack` base class."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from sklearn.base import BaseEstimator

from mmia.errors import MmiaError


class MissingInput(MmiaError, ValueError):
    """Raised when an attack is fitted or scored without an input it requires."""


@dataclass
class Features:
    """Per-sample inputs handed to attacks; row i of every array is sample i.

    image: (n, d) L2-normalised float32 features of view 0; text: (n, d);
    views: (n, K, d) features of augmented views 1..K, or None; captions default to "".
    Pass fields by keyword.
    """

    keys: list[str]
    image: np.ndarray
    text: np.ndarray
    views: np.ndarray | None = None
    captions: list[str] | None = None
    image_bytes: list[bytes] | None = None
    groups: list[str] | None = None  # content digests: cross-validation keeps a group together

    def __post_init__(self) -> None:
        n = len(self.keys)
        if self.captions is None:
            self.captions = [""] * n
        if self.image.shape[0] != n or self.text.shape[0] != n or len(self.captions) != n:
            raise ValueError("Features: keys, image, text and captions must have the same length")
        if self.views is not None and (self.views.ndim != 3 or self.views.shape[0] != n):
            raise ValueError("Features: views must have shape (n, K, d)")
        if self.image_bytes is not None and len(self.image_bytes) != n:
            raise ValueError("Features: image_bytes must have one entry per sample")
        if self.groups is not None and len(self.groups) != n:
            raise ValueError("Features: groups must have one entry per sample")

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, idx: np.ndarray | list[int]) -> Features:
        """Rows `idx` (integer indices or boolean mask) as a new Features."""
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        pick = idx.tolist()
        return Features(
            keys=[self.keys[i] for i in pick],
            image=self.image[idx],
            text=self.text[idx],
            views=None if self.views is None else self.views[idx],
            captions=[self.captions[i] for i in pick],
            image_bytes=None if self.image_bytes is None else [self.image_bytes[i] for i in pick],
            groups=None if self.groups is None else [self.groups[i] for i in pick],
        )


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity along the last axis (inputs need not be normalised)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    num = np.sum(a * b, axis=-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return num / np.maximum(den, 1e-12)


class Attack(BaseEstimator):
    """Base class (scikit-learn contract): parameters in __init__, `fit` validates its inputs
    and sets trailing-underscore state, `score` ranks (higher = more likely member).

    `requires` names the inputs the attack needs: "known_nonmembers", "pool" (fit arguments)
    and "views", "image_bytes" (fields of the Features passed to `score`).
    `learns_from_known_nonmembers`: the audit must then calibrate its threshold on known
    non-members held out of `fit` (scores of its own training negatives are biased low).
    """

    name: ClassVar[str] = "attack"
    requires: ClassVar[tuple[str, ...]] = ()
    learns_from_known_nonmembers: ClassVar[bool] = False

    def fit(self, known_nonmembers: Features | None = None, pool: Features | None = None) -> Attack:
        """Learn whatever the attack needs; the default needs nothing."""
        self._check_fit_inputs(known_nonmembers, pool)
        return self

    def score(self, features: Features) -> np.ndarray:
        """Return (n,) scores, higher = more likely member."""
        raise NotImplementedError

    def _check_fit_inputs(self, known_nonmembers: Features | None, pool: Features | None) -> None:
        given = {"known_nonmembers": known_nonmembers, "pool": pool}
        for req in self.requires:
            if req in given and (given[req] is None or len(given[req]) == 0):
                raise MissingInput(f"attack {self.name!r} requires {req!r} in fit()")

    def _check_score_inputs(self, features: Features) -> None:
        for req in self.requires:
            if req in ("views", "image_bytes") and getattr(features, req) is None:
                raise MissingInput(f"attack {self.name!r} requires Features.{req} to score")
