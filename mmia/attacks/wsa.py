"""Weakly Supervised Attack (Ko et al. 2023, as in their released code).

Known non-members' CSA scores give mu and sigma; every pool sample with CSA >= mu + lambda*sigma
becomes a pseudo-member. A classifier learns pseudo-members vs known non-members from
[image || text] features; the score is its member probability. One round, no relabelling.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager

import numpy as np

from mmia.attacks.base import Attack, Features, cosine
from mmia.errors import MmiaError

CLASSIFIERS = ("mlp", "logreg")


class NoPseudoMembers(MmiaError, ValueError):
    """No pool sample reached the pseudo-member threshold."""


def _concat(features: Features) -> np.ndarray:
    return np.concatenate([features.image, features.text], axis=1).astype(np.float32)


@contextmanager
def _torch_single_thread():
    """Small MLPs run far faster on one thread (and avoid oversubscribing shared CPUs)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
        if classifier not in CLASSIFIERS:
            raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {classifier!r}")
        self.lam = lam
        self.classifier = classifier
        self.hidden = tuple(hidden)
        self.lr = lr
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.val_fraction = val_fraction
        self.seed = seed

    def fit(self, known_nonmembers: Features | None = None, pool: Features | None = None) -> WSA:
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
        rng = np.random.default_rng(self.seed)
        x, y = _balance(x, y.astype(np.int64), rng)
        self.n_train_ = len(y)
        if self.classifier == "logreg":
            from sklearn.linear_model import LogisticRegression

            self.model_ = LogisticRegression(max_iter=2000, random_state=self.seed).fit(x, y)
        else:
            self.model_ = self._fit_mlp(x, y, rng)
        return self

    def _fit_mlp(self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator):
        """MLP d->hidden->2 with Adam, early stopping on a validation split; best weights kept."""
        import torch
        from torch import nn

        n_val = round(self.val_fraction * len(y)) if len(y) >= 10 else 0
        perm = rng.permutation(len(y))
        val, tr = perm[:n_val], perm[n_val:]
        with torch.random.fork_rng(devices=[]), _torch_single_thread():
            torch.manual_seed(self.seed)
            dims = (x.shape[1], *self.hidden)
            layers: list[nn.Module] = []
            for a, b in itertools.pairwise(dims):
                layers += [nn.Linear(a, b), nn.ReLU()]
            net = nn.Sequential(*layers, nn.Linear(dims[-1], 2))
            opt = torch.optim.Adam(net.parameters(), lr=self.lr)
            loss_fn = nn.CrossEntropyLoss()
            xt, yt = torch.from_numpy(x), torch.from_numpy(y)
            gen = torch.Generator().manual_seed(self.seed)
            best, best_state, bad = float("inf"), None, 0
            self.epochs_run_ = 0
            for _ in range(self.max_epochs):
                net.train()
                order = torch.from_numpy(tr)[torch.randperm(len(tr), generator=gen)]
                for i in range(0, len(order), self.batch_size):
                    b = order[i : i + self.batch_size]
                    opt.zero_grad()
                    loss_fn(net(xt[b]), yt[b]).backward()
                    opt.step()
                self.epochs_run_ += 1
                if n_val == 0:
                    continue
                net.eval()
                with torch.no_grad():
                    v = float(loss_fn(net(xt[val]), yt[val]))
                if v < best - 1e-6:
                    best, bad = v, 0
                    best_state = {k: t.clone() for k, t in net.state_dict().items()}
                else:
                    bad += 1
                    if bad >= self.patience:
                        break
            if best_state is not None:
                net.load_state_dict(best_state)
            net.eval()
        return net

    def score(self, features: Features) -> np.ndarray:
        if not hasattr(self, "model_"):
            raise RuntimeError("WSA.score called before fit")
        x = _concat(features)
        if self.classifier == "logreg":
            return self.model_.predict_proba(x)[:, 1]
        import torch

        with torch.no_grad(), _torch_single_thread():
            logits = self.model_(torch.from_numpy(x))
            return torch.softmax(logits, dim=1)[:, 1].double().numpy()

    def pseudo_label_precision(self, pool_labels: np.ndarray) -> float:
        """Fraction of pseudo-members that are true members (pool_labels: 1 = member)."""
        if not hasattr(self, "pseudo_member_idx_"):
            raise RuntimeError("WSA.pseudo_label_precision called before fit")
        labels = np.asarray(pool_labels)
        return float(np.mean(labels[self.pseudo_member_idx_] == 1))
