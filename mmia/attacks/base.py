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
    image_stats: (n, N_IMAGE_STATS) float32 image statistics for the blind baseline
    (`mmia.attacks.blind.image_stats_of`), which it prefers to decoding `image_bytes`.
    Attacks that need neither features accept zero-width (n, 0) image and text arrays.
    Pass fields by keyword.
    """

    keys: list[str]
    image: np.ndarray
    text: np.ndarray
    views: np.ndarray | None = None
    captions: list[str] | None = None
    image_bytes: list[bytes] | None = None
    groups: list[str] | None = None  # content digests: cross-validation keeps a group together
    image_stats: np.ndarray | None = None
    view_cosines: np.ndarray | None = None  # (n, K) cos(view k, caption): what AEA reads
    ref_cosines: np.ndarray | None = None  # (n, R) the pair's cosine under R reference models
    mcd_cosines: np.ndarray | None = None  # (n, P) its cosine over P MC-dropout passes
    whitebox: np.ndarray | None = None  # (n, 3) projection norm ratios (image, text), scale

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
        if self.image_stats is not None and (self.image_stats.ndim != 2
                                             or self.image_stats.shape[0] != n):
            raise ValueError("Features: image_stats must have shape (n, N_IMAGE_STATS)")
        if self.view_cosines is not None and (self.view_cosines.ndim != 2
                                              or self.view_cosines.shape[0] != n):
            raise ValueError("Features: view_cosines must have shape (n, K)")
        for name in ("ref_cosines", "mcd_cosines", "whitebox"):
            value = getattr(self, name)
            if value is not None and (value.ndim != 2 or value.shape[0] != n):
                raise ValueError(f"Features: {name} must have shape (n, columns)")

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
            image_stats=None if self.image_stats is None else self.image_stats[idx],
            view_cosines=None if self.view_cosines is None else self.view_cosines[idx],
            ref_cosines=None if self.ref_cosines is None else self.ref_cosines[idx],
            mcd_cosines=None if self.mcd_cosines is None else self.mcd_cosines[idx],
            whitebox=None if self.whitebox is None else self.whitebox[idx],
        )


COSINE_BLOCK_BYTES = 4 << 20  # inputs per block: stays in cache between the three reductions


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity along the last axis (inputs need not be normalised).

    float32 throughout, in blocks over the leading axis (a and b broadcast against each other,
    e.g. views (n, K, d) against text[:, None, :]): no float64 or full-size temporary copy of
    the inputs, and each operand's norms are taken on its own shape, not the broadcast one.
    Returns float32 of the broadcast shape without the last axis.
    """
    a, b = np.asarray(a), np.asarray(b)
    shape = np.broadcast_shapes(a.shape, b.shape)
    if len(shape) == 1:
        return _cosine_block(a, b)
    a = a.reshape((1,) * (len(shape) - a.ndim) + a.shape)
    b = b.reshape((1,) * (len(shape) - b.ndim) + b.shape)
    out = np.empty(shape[:-1], dtype=np.float32)
    step = max(1, COSINE_BLOCK_BYTES // max(1, int(np.prod(shape[1:])) * 4))
    for start in range(0, shape[0], step):
        rows = slice(start, min(start + step, shape[0]))
        out[rows] = _cosine_block(a if a.shape[0] == 1 else a[rows],
                                  b if b.shape[0] == 1 else b[rows])
    return out


def _cosine_block(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine along the last axis of one block of broadcastable a and b, in float32."""
    a = a.astype(np.float32, copy=False)
    b = b.astype(np.float32, copy=False)
    num = np.einsum("...d,...d->...", a, b)
    norms = np.einsum("...d,...d->...", a, a) * np.einsum("...d,...d->...", b, b)
    return num / np.maximum(np.sqrt(norms), np.float32(1e-12))


class Attack(BaseEstimator):
    """Base class (scikit-learn contract): parameters in __init__, `fit` validates its inputs
    and sets trailing-underscore state, `score` ranks (higher = more likely member).

    `requires` names the inputs the attack needs: "known_nonmembers", "pool" (fit arguments)
    and "views", "image_bytes", "references" (fields of the Features passed to `score`).
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
            if req == "views" and features.views is None and features.view_cosines is None:
                raise MissingInput(f"attack {self.name!r} requires Features.views or "
                                   "Features.view_cosines to score")
            if req == "image_bytes" and features.image_bytes is None:
                raise MissingInput(f"attack {self.name!r} requires Features.{req} to score")
