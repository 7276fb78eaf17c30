"""Blind baseline (Das, Zhang, Tramer 2024): a model-free member classifier.

TF-IDF word 1-2 grams of captions plus simple image statistics feed a logistic regression,
cross-validated on the evaluation set itself. It never queries the target model, so a high AUC
measures distribution shift between members and non-members, not leakage.
"""

from __future__ import annotations

import io

import numpy as np

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


class Blind(Attack):
    """Captions + image statistics -> logistic regression; scored out-of-fold."""

    name = "blind"
    requires = ("labels",)

    def __init__(self, n_splits: int = 5, C: float = 1.0, use_images: bool = True) -> None:
        self.n_splits = n_splits
        self.C = C
        self.use_images = use_images

    def _stats(self, features: Features) -> np.ndarray | None:
        if not self.use_images or features.image_bytes is None:
            return None
        return np.stack([image_stats(b) for b in features.image_bytes])

    def _fit_fold(self, captions: list[str], stats: np.ndarray | None, y: np.ndarray):
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        tfidf = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True)
        scaler = StandardScaler() if stats is not None else None
        x = self._design(captions, stats, tfidf, scaler, fit=True)
        clf = LogisticRegression(C=self.C, max_iter=2000, class_weight="balanced").fit(x, y)
        return tfidf, scaler, clf

    @staticmethod
    def _design(captions, stats, tfidf, scaler, fit: bool):
        from scipy import sparse

        # An all-empty vocabulary is possible on degenerate folds; fall back to a constant column.
        try:
            text = tfidf.fit_transform(captions) if fit else tfidf.transform(captions)
        except ValueError:
            text = sparse.csr_matrix(np.zeros((len(captions), 1)))
        if stats is None:
            return text.tocsr()
        s = scaler.fit_transform(stats) if fit else scaler.transform(stats)
        return sparse.hstack([text, sparse.csr_matrix(s)]).tocsr()

    def fit(self, known_nonmembers: Features | None = None, pool: Features | None = None) -> Blind:
        raise MissingInput(
            "the blind baseline is supervised on the evaluation labels: use "
            "cross_val_scores(features, labels, seed) or fit_labeled(features, labels)"
        )

    def fit_labeled(self, features: Features, labels: np.ndarray) -> Blind:
        """Fit on labelled samples (for scoring a different, held-out set)."""
        y = check_labels(labels)
        self.model_ = self._fit_fold(list(features.captions), self._stats(features), y)
        return self

    def score(self, features: Features) -> np.ndarray:
        if not hasattr(self, "model_"):
            raise MissingInput("Blind.score needs fit_labeled first; see cross_val_scores")
        tfidf, scaler, clf = self.model_
        x = self._design(list(features.captions), self._stats(features), tfidf, scaler, False)
        return clf.predict_proba(x)[:, 1]

    def cross_val_scores(self, features: Features, labels: np.ndarray, seed: int = 0) -> np.ndarray:
        """Out-of-fold member probabilities from stratified k-fold on the evaluation set."""
        from sklearn.model_selection import StratifiedKFold

        y = check_labels(labels)
        if len(y) != len(features):
            raise ValueError("labels and features differ in length")
        k = min(self.n_splits, int(np.bincount(y).min()))
        if k < 2:
            raise ValueError("blind baseline needs at least 2 members and 2 non-members")
        captions = np.asarray(list(features.captions), dtype=object)
        stats = self._stats(features)
        out = np.full(len(y), np.nan)
        folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        for tr, te in folds.split(np.zeros(len(y)), y):
            st_tr = None if stats is None else stats[tr]
            st_te = None if stats is None else stats[te]
            tfidf, scaler, clf = self._fit_fold(list(captions[tr]), st_tr, y[tr])
            x = self._design(list(captions[te]), st_te, tfidf, scaler, False)
            out[te] = clf.predict_proba(x)[:, 1]
        return out
