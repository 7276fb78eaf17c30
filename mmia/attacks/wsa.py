"""Weakly Supervised Attack (Ko et al. 2023, as in their released code).

Known non-members' CSA scores give mu and sigma; every pool sample with CSA >= mu + lambda*sigma
becomes a pseudo-member. A classifier learns pseudo-members vs known non-members from
[image || text] features; the score is its member probability. One round, no relabelling.

The classifier is scikit-learn's: `MLPClassifier` with the released recipe (512-256-128, ReLU,
Adam, lr 1e-3, batch 32, at most 15 epochs, early stopping on a 10 % split with patience 3;
scikit-learn stops on validation accuracy where the released code watched the loss) or
`LogisticRegression`, both on one BLAS thread: small dense layers gain nothing from more and
lose much to oversubscription (10x slower on 2 cores), and one thread fixes the summation order.
WSA trains on its known non-members, so its decision threshold must come from other, held-out
known non-members (`learns_from_known_nonmembers`).
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.utils.validation import check_is_fitted
from threadpoolctl import threadpool_limits

from mmia.attacks.base import Attack, Features, cosine
from mmia.errors import MmiaError

CLASSIFIERS = ("mlp", "logreg")
MIN_EARLY_STOPPING = 20  # fewer training rows than this: no validation split


class NoPseudoMembers(MmiaError, ValueError):
    """No pool sample reached the pseudo-member threshold."""


def _concat(features: Features) -> np.ndarray:
    return np.concatenate([features.image, features.text], axis=1).astype(np.float64)


def _balance(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Subsample the majority class to the size of the minority class, then shuffle."""
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    m = min(len(pos), len(neg))
    idx = np.concatenate([rng.choice(pos, m, replace=False), rng.choice(neg, m, replace=False)])
    idx = rng.permutation(idx)
    return x[idx], y[idx]


class WSA(Attack):
    """Pseudo-label an unlabelled pool by CSA, then train a member classifier."""

    name = "wsa"
    requires = ("known_nonmembers", "pool")
    learns_from_known_nonmembers = True

    def __init__(
        self,
        lam: float = 1.5,
        classifier: str = "mlp",
        hidden: tuple[int, ...] = (512, 256, 128),
        lr: float = 1e-3,
        batch_size: int = 32,
        max_epochs: int = 15,
        patience: int = 3,
        val_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        self.lam = lam
        self.classifier = classifier
        self.hidden = hidden
        self.lr = lr
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.val_fraction = val_fraction
        self.seed = seed

    def _make_classifier(self, n_rows: int):
        if self.classifier == "logreg":
            return LogisticRegression(max_iter=2000, random_state=self.seed)
        return MLPClassifier(
            hidden_layer_sizes=tuple(self.hidden), activation="relu", solver="adam",
            learning_rate_init=self.lr, batch_size=min(self.batch_size, n_rows),
            max_iter=self.max_epochs, early_stopping=n_rows >= MIN_EARLY_STOPPING,
            validation_fraction=self.val_fraction, n_iter_no_change=self.patience,
            random_state=self.seed)

    def fit(self, known_nonmembers: Features | None = None, pool: Features | None = None) -> WSA:
        if self.classifier not in CLASSIFIERS:
            raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {self.classifier!r}")
        self._check_fit_inputs(known_nonmembers, pool)
        known = cosine(known_nonmembers.image, known_nonmembers.text)
        self.mu_, self.sigma_ = float(known.mean()), float(known.std())
        self.threshold_ = self.mu_ + self.lam * self.sigma_
        pool_scores = cosine(pool.image, pool.text)
        self.pseudo_member_idx_ = np.flatnonzero(pool_scores >= self.threshold_)
        self.n_pseudo_members_ = len(self.pseudo_member_idx_)
        if self.n_pseudo_members_ == 0:
            raise NoPseudoMembers(
                f"WSA: no pool sample has CSA >= threshold {self.threshold_:.4f} "
                f"(mu={self.mu_:.4f}, sigma={self.sigma_:.4f}, lam={self.lam}); "
                "lower lam (--wsa-lambda) or use a larger pool"
            )
        x = np.concatenate(
            [_concat(pool.subset(self.pseudo_member_idx_)), _concat(known_nonmembers)]
        )
        y = np.concatenate([np.ones(self.n_pseudo_members_), np.zeros(len(known_nonmembers))])
        x, y = _balance(x, y.astype(np.int64), np.random.default_rng(self.seed))
        self.n_train_ = len(y)
        with warnings.catch_warnings(), threadpool_limits(1):
            warnings.simplefilter("ignore", ConvergenceWarning)  # max_epochs caps training
            self.model_ = self._make_classifier(len(y)).fit(x, y)
        self.epochs_run_ = int(np.max(self.model_.n_iter_))
        return self

    def score(self, features: Features) -> np.ndarray:
        check_is_fitted(self, "model_")
        with threadpool_limits(1):
            return self.model_.predict_proba(_concat(features))[:, 1]

    def pseudo_label_precision(self, pool_labels: np.ndarray) -> float:
        """Fraction of pseudo-members that are true members (pool_labels: 1 = member)."""
        check_is_fitted(self, "pseudo_member_idx_")
        labels = np.asarray(pool_labels)
        return float(np.mean(labels[self.pseudo_member_idx_] == 1))
