"""Blind baseline (Das, Zhang, Tramer 2024): a model-free member classifier.

TF-IDF word 1-2 grams of captions plus simple image statistics feed a logistic regression,
cross-validated on the evaluation set itself. It never queries the target model, so a high AUC
measures distribution shift between members and non-members, not leakage.
"""

from __future__ import annotations

import io

import numpy as np
from sklearn.compose import ColumnTransformer
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_val_predict
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from mmia.attacks.base import Attack, Features, MissingInput
from mmia.metrics import check_labels

N_IMAGE_STATS = 10


def image_stats(data: bytes | None) -> np.ndarray:
    """[mean R,G,B, std R,G,B, log width, log height, log byte size, decode_failed]."""
    out = np.zeros(N_IMAGE_STATS, dtype=np.float64)
    if not data:
        out[-1] = 1.0
        return out
    out[8] = np.log1p(len(data))
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            im = im.convert("RGB")
            im.thumbnail((64, 64))
            arr = np.asarray(im, dtype=np.float64) / 255.0
    except Exception:  # noqa: BLE001 - any undecodable image is just a feature value
        out[-1] = 1.0
        return out
    out[0:3] = arr.reshape(-1, 3).mean(axis=0)
    out[3:6] = arr.reshape(-1, 3).std(axis=0)
    out[6], out[7] = np.log1p(w), np.log1p(h)
    return out


def blind_design(features: Features, use_images: bool = True) -> np.ndarray:
    """(n, 1 [+ N_IMAGE_STATS]) object array: the caption, then the image statistics."""
    captions = np.asarray(list(features.captions), dtype=object)[:, None]
    if not use_images or features.image_bytes is None:
        return captions
    image = np.stack([image_stats(b) for b in features.image_bytes]).astype(object)
    return np.concatenate([captions, image], axis=1)


class Blind(Attack):
    """Captions + image statistics -> logistic regression; scored out-of-fold.

    One scikit-learn `Pipeline`: TF-IDF of caption word 1-2 grams beside standardised image
    statistics, then a class-balanced logistic regression.
    """

    name = "blind"
    requires = ("labels",)

    def __init__(self, n_splits: int = 5, C: float = 1.0, use_images: bool = True) -> None:
        self.n_splits = n_splits
        self.C = C
        self.use_images = use_images

    def make_pipeline(self, n_columns: int) -> Pipeline:
        """The unfitted model for a design matrix of `n_columns` (see `blind_design`)."""
        parts = [("caption", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True,
                                             token_pattern=r"(?u)\b\w+\b"), 0)]
        if n_columns > 1:
            parts.append(("image", StandardScaler(), list(range(1, n_columns))))
        return Pipeline([
            ("features", ColumnTransformer(parts)),
            ("classifier", LogisticRegression(C=self.C, max_iter=2000, class_weight="balanced")),
        ])

    def fit(self, known_nonmembers: Features | None = None, pool: Features | None = None) -> Blind:
        raise MissingInput(
            "the blind baseline is supervised on the evaluation labels: use "
            "cross_val_scores(features, labels, seed) or fit_labeled(features, labels)"
        )

    def fit_labeled(self, features: Features, labels: np.ndarray) -> Blind:
        """Fit on labelled samples (for scoring a different, held-out set)."""
        y = check_labels(labels)
        x = blind_design(features, self.use_images)
        self.model_ = self.make_pipeline(x.shape[1]).fit(x, y)
        return self

    def score(self, features: Features) -> np.ndarray:
        check_is_fitted(self, "model_")
        return self.model_.predict_proba(blind_design(features, self.use_images))[:, 1]

    def cross_val_scores(self, features: Features, labels: np.ndarray, seed: int = 0) -> np.ndarray:
        """Out-of-fold member probabilities from stratified k-fold on the evaluation set, grouped
        by `features.groups` (content digests) when given."""
        y = check_labels(labels)
        if len(y) != len(features):
            raise ValueError("labels and features differ in length")
        k = min(self.n_splits, int(np.bincount(y).min()))
        if k < 2:
            raise MissingInput(
                "the blind baseline needs at least 2 members and 2 non-members to "
                f"cross-validate (got {int(y.sum())} and {int((y == 0).sum())})")
        x = blind_design(features, self.use_images)
        if features.groups is None:
            folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        else:  # copies of one image never sit on both sides of a split
            folds = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        return cross_val_predict(self.make_pipeline(x.shape[1]), x, y, cv=folds,
                                 groups=features.groups, method="predict_proba")[:, 1]
