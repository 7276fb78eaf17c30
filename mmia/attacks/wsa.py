"""Weakly Supervised Attack (Ko et al. 2023, as in their released code).

Known non-members' CSA scores give mu and sigma; every pool sample with CSA >= mu + lambda*sigma
becomes a pseudo-member. A classifier learns pseudo-members vs known non-members from
[image || text] features; the score is its member probability. One round, no relabelling.

The classifier is scikit-learn's: `MLPClassifier` with the released recipe (512-256-128, ReLU,
Adam, lr 1e-3, batch 32, at most 15 epochs, early stopping on a 10 % split with patience 3;
scikit-learn stops on validation accuracy where the released code watched the loss) or
`LogisticRegression`, both on one BLAS thread: small dense layers gain nothing from more and
lose much to oversubscription (10x slower on 2 cores), and one thread fixes the summation order.
Scoring runs in blocks of SCORE_BLOCK rows, in float32 on SCORE_THREADS BLAS threads (large
matrix products do gain from a second core; a fixed count keeps the scores reproducible), so
its memory does not grow with n: 10^6 evaluation samples cost about 11 s on 2 cores.
WSA trains on its known non-members, so its decision threshold must come from other, held-out
known non-members (`learns_from_known_nonmembers`).

lam="auto" picks λ from Ko et al.'s released ablation grid (LAMBDA_GRID: 2.5, 1.5, 0.5, 0, -0.5,
-1.5, -2.5): the largest λ not above the paper's 1.5 whose threshold selects at least
`min_pseudo_members` pool samples (default 20: fewer positives than that give a 2d-input
classifier a handful of points, and scikit-learn's early stopping a validation split of one or
two). 2.5 is left out so that auto never asks more than the paper; where 1.5 selects enough it
is kept. If no λ selects enough, the smallest (-2.5, the most pseudo-members) is used; if it
selects nobody, NoPseudoMembers names it. A number keeps the released behaviour exactly.
features="concat_cos" appends the pair's cosine (CSA's score) to [image || text], Gomez's variant.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.special import expit
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.utils.validation import check_is_fitted
from threadpoolctl import threadpool_limits

from mmia.attacks.base import Attack, Features, cosine
from mmia.errors import MmiaError

CLASSIFIERS = ("mlp", "logreg")
FEATURE_SETS = ("concat", "concat_cos")  # [image || text], [image || text || cosine]
LAMBDA_GRID = (2.5, 1.5, 0.5, 0.0, -0.5, -1.5, -2.5)  # Ko et al.'s released lambda_selection
PAPER_LAMBDA = 1.5
AUTO_LAMBDAS = tuple(lam for lam in LAMBDA_GRID if lam <= PAPER_LAMBDA)  # tried in this order
MIN_PSEUDO_MEMBERS = 20  # auto's target: the fewest pseudo-members worth training on
MIN_EARLY_STOPPING = 20  # fewer training rows than this: no validation split
SCORE_BLOCK = 8192  # rows per scoring block: (8192 x 1024) float32 inputs, 32 MB
SCORE_THREADS = 2


class NoPseudoMembers(MmiaError, ValueError):
    """No pool sample reached the pseudo-member threshold."""


def design(image: np.ndarray, text: np.ndarray, feature_set: str = "concat",
           dtype: type = np.float64) -> np.ndarray:
    """The classifier's input: [image || text], and the pair's cosine for "concat_cos"."""
    columns = [image, text]
    if feature_set == "concat_cos":
        columns.append(cosine(image, text)[:, None])
    return np.concatenate([np.asarray(c, dtype=dtype) for c in columns], axis=1)


def _balance(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Subsample the majority class to the size of the minority class, then shuffle."""
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    m = min(len(pos), len(neg))
    idx = np.concatenate([rng.choice(pos, m, replace=False), rng.choice(neg, m, replace=False)])
    idx = rng.permutation(idx)
    return x[idx], y[idx]


def _float32_layers(model) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """A fitted ReLU MLP's (weights, bias) per layer in float32; None for other classifiers."""
    if not isinstance(model, MLPClassifier) or model.activation != "relu" \
            or model.out_activation_ != "logistic":
        return None
    return [(w.astype(np.float32), b.astype(np.float32))
            for w, b in zip(model.coefs_, model.intercepts_, strict=True)]


def _mlp_probability(layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> np.ndarray:
    """P(member) from a float32 forward pass: ReLU hidden layers, logistic output."""
    h = x.astype(np.float32, copy=False)
    for weights, bias in layers[:-1]:
        h = h @ weights
        h += bias
        np.maximum(h, 0, out=h)
    weights, bias = layers[-1]
    return expit((h @ weights + bias)[:, 0].astype(np.float64))


class WSA(Attack):
    """Pseudo-label an unlabelled pool by CSA, then train a member classifier."""

    name = "wsa"
    requires = ("known_nonmembers", "pool")
    learns_from_known_nonmembers = True

    def __init__(
        self,
        lam: float | str = PAPER_LAMBDA,
        classifier: str = "mlp",
        hidden: tuple[int, ...] = (512, 256, 128),
        lr: float = 1e-3,
        batch_size: int = 32,
        max_epochs: int = 15,
        patience: int = 3,
        val_fraction: float = 0.1,
        seed: int = 0,
        features: str = "concat",
        min_pseudo_members: int = MIN_PSEUDO_MEMBERS,
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
        self.features = features
        self.min_pseudo_members = min_pseudo_members

    def _make_classifier(self, n_rows: int):
        if self.classifier == "logreg":
            return LogisticRegression(max_iter=2000, random_state=self.seed)
        return MLPClassifier(
            hidden_layer_sizes=tuple(self.hidden), activation="relu", solver="adam",
            learning_rate_init=self.lr, batch_size=min(self.batch_size, n_rows),
            max_iter=self.max_epochs, early_stopping=n_rows >= MIN_EARLY_STOPPING,
            validation_fraction=self.val_fraction, n_iter_no_change=self.patience,
            random_state=self.seed)

    @property
    def auto(self) -> bool:
        """Whether λ is chosen from the grid (lam="auto") rather than given."""
        return isinstance(self.lam, str)

    def _check_settings(self) -> None:
        if self.classifier not in CLASSIFIERS:
            raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {self.classifier!r}")
        if self.features not in FEATURE_SETS:
            raise ValueError(f"features must be one of {FEATURE_SETS}, got {self.features!r}")
        if self.auto and self.lam != "auto":
            raise ValueError(f"lam must be a number or 'auto', got {self.lam!r}")
        if self.auto and not (isinstance(self.min_pseudo_members, int)
                              and self.min_pseudo_members >= 1):
            raise ValueError(f"min_pseudo_members must be an integer >= 1, "
                             f"got {self.min_pseudo_members!r}")

    def _choose_lambda(self, pool_scores: np.ndarray) -> float:
        """lam as given, or auto's pick: the first of AUTO_LAMBDAS whose threshold selects
        at least min_pseudo_members pool samples, else the last (the most selected)."""
        if not self.auto:
            return float(self.lam)
        for lam in AUTO_LAMBDAS:
            if np.count_nonzero(pool_scores >= self.mu_ + lam * self.sigma_) \
                    >= self.min_pseudo_members:
                return lam
        return AUTO_LAMBDAS[-1]

    def _no_pseudo_members(self) -> NoPseudoMembers:
        """Nobody passed: the threshold, and for auto the grid down to the smallest λ tried."""
        stats = f"mu={self.mu_:.4f}, sigma={self.sigma_:.4f}"
        if not self.auto:
            return NoPseudoMembers(
                f"WSA: no pool sample has CSA >= threshold {self.threshold_:.4f} "
                f"({stats}, lam={self.lam}); lower lam (--wsa-lambda) or use a larger pool")
        grid = ", ".join(f"{lam:g}" for lam in AUTO_LAMBDAS)
        return NoPseudoMembers(
            f"WSA: no pool sample has CSA >= mu + lam*sigma for any lam of the auto grid "
            f"({grid}); at the smallest tried, lam={self.lam_:g}, the threshold is "
            f"{self.threshold_:.4f} ({stats}): use a larger pool")

    def fit(self, known_nonmembers: Features | None = None, pool: Features | None = None) -> WSA:
        self._check_settings()
        self._check_fit_inputs(known_nonmembers, pool)
        known = cosine(known_nonmembers.image, known_nonmembers.text).astype(np.float64)
        self.mu_, self.sigma_ = float(known.mean()), float(known.std())
        pool_scores = cosine(pool.image, pool.text)
        self.lam_ = self._choose_lambda(pool_scores)
        self.threshold_ = self.mu_ + self.lam_ * self.sigma_
        self.pseudo_member_idx_ = np.flatnonzero(pool_scores >= self.threshold_)
        self.n_pseudo_members_ = len(self.pseudo_member_idx_)
        if self.n_pseudo_members_ == 0:
            raise self._no_pseudo_members()
        picked = self.pseudo_member_idx_
        x = np.concatenate([
            design(pool.image[picked], pool.text[picked], self.features),
            design(known_nonmembers.image, known_nonmembers.text, self.features)])
        y = np.concatenate([np.ones(self.n_pseudo_members_), np.zeros(len(known_nonmembers))])
        x, y = _balance(x, y.astype(np.int64), np.random.default_rng(self.seed))
        self.n_train_ = len(y)
        with warnings.catch_warnings(), threadpool_limits(1):
            warnings.simplefilter("ignore", ConvergenceWarning)  # max_epochs caps training
            self.model_ = self._make_classifier(len(y)).fit(x, y)
        self.epochs_run_ = int(np.max(self.model_.n_iter_))
        return self

    def score(self, features: Features) -> np.ndarray:
        """Member probabilities (float64), computed in blocks of SCORE_BLOCK rows."""
        check_is_fitted(self, "model_")
        n = len(features)
        out = np.empty(n, dtype=np.float64)
        layers = _float32_layers(self.model_)
        with threadpool_limits(SCORE_THREADS):
            for start in range(0, n, SCORE_BLOCK):
                rows = slice(start, min(start + SCORE_BLOCK, n))
                image, text = features.image[rows], features.text[rows]
                if layers is None:
                    x = design(image, text, self.features)
                    out[rows] = self.model_.predict_proba(x)[:, 1]
                else:
                    x = design(image, text, self.features, np.float32)
                    out[rows] = _mlp_probability(layers, x)
        return out

    def pseudo_label_precision(self, pool_labels: np.ndarray) -> float:
        """Fraction of pseudo-members that are true members (pool_labels: 1 = member)."""
        check_is_fitted(self, "pseudo_member_idx_")
        labels = np.asarray(pool_labels)
        return float(np.mean(labels[self.pseudo_member_idx_] == 1))
