"""Reference-calibrated CSA: the pair's cosine under the target, against its cosines under
reference models that did not train on it (the LiRA-offline / "Ref" idea, Carlini et al. 2022).

A pair that every model aligns well (easy content) gets a high cosine from the target whether or
not it was trained on; the references, trained on other data from the same population, measure
that difficulty per pair, and what the target adds beyond it is the membership signal.
Cosines are compared after Fisher's z-transform, atanh (cosines of memorised pairs crowd
against 1, where a difference of 0.01 means more than it does at 0.5; LiRA logit-scales
confidences for the same reason). With c = atanh cos under the target and r_1..r_R the same
under the R references:
  offset   c - mean(r)                                (one reference: c - r)
  z        (c - mean(r)) / sd(r), sd floored at the references' typical spread on known
           non-members (LiRA offline with a per-sample variance; needs R >= 2)
  regress  (c - (a + b . r)) / s: the residual of a least-squares fit of c on r over known
           non-members, in units of its spread s. It learns the mapping between the models'
           scales from known non-members, so its threshold is calibrated on others.
"""

from __future__ import annotations

import numpy as np
from sklearn.utils.validation import check_is_fitted

from mmia.attacks.base import Attack, Features, MissingInput, cosine

CALIBRATIONS = ("regress", "offset", "z")
DEFAULT_CALIBRATION = "offset"  # learns nothing: every known non-member calibrates it
MIN_SPREAD = 1e-6
MAX_COSINE = 1 - 1e-6  # atanh stays finite


class RCSA(Attack):
    """Image-text cosine under the target, calibrated per pair by reference models."""

    name = "rcsa"
    requires = ("references",)

    def __init__(self, calibration: str = DEFAULT_CALIBRATION) -> None:
        if calibration not in CALIBRATIONS:
            raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {calibration!r}")
        self.calibration = calibration

    @property
    def learns_from_known_nonmembers(self) -> bool:  # type: ignore[override]
        return self.calibration in ("regress", "z")

    def fit(self, known_nonmembers: Features | None = None, pool: Features | None = None) -> RCSA:
        """regress: fit c on the references' cosines over known non-members; z: their typical
        per-pair spread; offset: nothing to learn."""
        self.n_references_ = None
        if self.calibration == "offset":
            self.coef_ = self.spread_ = None
            return self
        if known_nonmembers is None or not len(known_nonmembers):
            raise MissingInput(f"rcsa calibration {self.calibration!r} needs known non-members")
        target, refs = self._cosines(known_nonmembers)
        self.n_references_ = refs.shape[1]
        if self.calibration == "z":
            if refs.shape[1] < 2:
                raise MissingInput("rcsa calibration 'z' needs at least two reference models")
            self.coef_ = None
            self.spread_ = float(np.sqrt(np.mean(refs.var(axis=1, ddof=1))))
            return self
        design = np.c_[np.ones(len(refs)), refs].astype(np.float64)
        if len(refs) <= design.shape[1]:
            raise MissingInput(f"rcsa calibration 'regress' needs more known non-members than "
                               f"{design.shape[1]} (one per reference, plus one)")
        self.coef_, *_ = np.linalg.lstsq(design, target.astype(np.float64), rcond=None)
        residual = target - design @ self.coef_
        self.spread_ = float(max(residual.std(ddof=design.shape[1]), MIN_SPREAD))
        return self

    def score(self, features: Features) -> np.ndarray:
        check_is_fitted(self, "spread_")
        target, refs = self._cosines(features)
        if self.n_references_ is not None and refs.shape[1] != self.n_references_:
            raise MissingInput(f"rcsa was fitted with {self.n_references_} reference models, "
                               f"scored with {refs.shape[1]}")
        if self.calibration == "offset":
            return target - refs.mean(axis=1)
        if self.calibration == "z":
            spread = np.maximum(refs.std(axis=1, ddof=1), max(self.spread_, MIN_SPREAD))
            return ((target - refs.mean(axis=1)) / spread).astype(np.float32)
        expected = self.coef_[0] + refs.astype(np.float64) @ self.coef_[1:]
        return ((target - expected) / self.spread_).astype(np.float32)

    def _cosines(self, features: Features) -> tuple[np.ndarray, np.ndarray]:
        """(n,) target and (n, R) reference cosines, Fisher z-transformed."""
        if features.ref_cosines is None or features.ref_cosines.shape[1] == 0:
            raise MissingInput("attack 'rcsa' requires Features.ref_cosines (reference models)")
        return (fisher_z(cosine(features.image, features.text)),
                fisher_z(np.asarray(features.ref_cosines, dtype=np.float32)))


def fisher_z(cosines: np.ndarray) -> np.ndarray:
    """atanh of cosines clipped into (-1, 1), float32."""
    return np.arctanh(np.clip(cosines, -MAX_COSINE, MAX_COSINE)).astype(np.float32)
