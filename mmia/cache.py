"""Content-keyed embedding cache.

Layout: ROOT/<fingerprint>/image/view-000, ROOT/<fingerprint>/image/aug-<cfg>/view-NNN,
ROOT/<fingerprint>/text, ROOT/<fingerprint>/samples. Each store is a folder of immutable
segments: `S.keys.npy` (content digests) + `S.feat.npy` (float32 rows). A segment is written
to temporary names, fsynced, and committed by renaming its keys file last, so a kill at any
moment leaves either the whole segment or none of it. Reads memory-map the feature files.
Features of one fingerprint live under its own folder and can never be served for another.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence

import numpy as np

from mmia.views import AugmentConfig

DIGEST_DTYPE = "S32"


def _fsync_write(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())


class FeatureStore:
    """An append-only map content digest → feature vector, stored as committed segments."""

    def __init__(self, folder: str):
        self.folder = folder
        self._segments: list[str] = []
        self._keys = np.empty(0, DIGEST_DTYPE)
        self._order = np.empty(0, np.int64)
        self._where = np.empty((0, 2), np.int64)

    def refresh(self) -> FeatureStore:
        """Re-read the list of committed segments (cheap: digests only)."""
        if not os.path.isdir(self.folder):
            return self
        names = sorted(n[: -len(".keys.npy")] for n in os.listdir(self.folder)
                       if n.endswith(".keys.npy"))
        if names == self._segments:
            return self
        keys, where = [], []
        for i, name in enumerate(names):
            k = np.load(os.path.join(self.folder, name + ".keys.npy"))
            keys.append(k)
            where.append(np.stack([np.full(len(k), i), np.arange(len(k))], 1))
        self._segments = names
        self._keys = np.concatenate(keys) if keys else np.empty(0, DIGEST_DTYPE)
        self._where = np.concatenate(where) if where else np.empty((0, 2), np.int64)
        self._order = np.argsort(self._keys, kind="stable")
        return self

    def __len__(self) -> int:
        return len(np.unique(self._keys))

    def digests(self) -> set[str]:
        return {k.decode() for k in np.unique(self._keys)}

    def _locate(self, digests: Sequence[str]) -> np.ndarray:
        """Index into self._keys of each digest, -1 where absent."""
        query = np.asarray(digests, dtype=DIGEST_DTYPE)
        sorted_keys = self._keys[self._order]
        pos = np.searchsorted(sorted_keys, query)
        pos_clipped = np.minimum(pos, max(len(sorted_keys) - 1, 0))
        found = (pos < len(sorted_keys)) & (sorted_keys[pos_clipped] == query) if len(
            sorted_keys) else np.zeros(len(query), bool)
        return np.where(found, self._order[pos_clipped] if len(sorted_keys) else -1, -1)

    def contains(self, digests: Sequence[str]) -> np.ndarray:
        return self._locate(digests) >= 0

    def write(self, digests: Sequence[str], features: np.ndarray) -> None:
        """Commit one segment atomically."""
        if len(digests) == 0:
            return
        os.makedirs(self.folder, exist_ok=True)
        name = f"{len(self._segments):08d}-{uuid.uuid4().hex[:8]}"
        base = os.path.join(self.folder, name)
        tmp = f".tmp-{uuid.uuid4().hex}"
        _fsync_write(base + ".feat.npy" + tmp, np.ascontiguousarray(features, np.float32))
        _fsync_write(base + ".keys.npy" + tmp, np.asarray(digests, DIGEST_DTYPE))
        os.replace(base + ".feat.npy" + tmp, base + ".feat.npy")
        os.replace(base + ".keys.npy" + tmp, base + ".keys.npy")  # the commit point
        dir_fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self.refresh()

    def read(self, digests: Sequence[str]) -> np.ndarray:
        """Features for the digests (memory-mapped segment reads); KeyError if any is absent.

        A miss re-reads the segment list first, so segments committed since this store was
        opened (by another process or another `EmbeddingCache`) are found.
        """
        idx = self._locate(digests)
        if (idx < 0).any():
            idx = self.refresh()._locate(digests)
        if (idx < 0).any():
            missing = [d for d, i in zip(digests, idx, strict=True) if i < 0]
            raise KeyError(f"{len(missing)} digests not cached, e.g. {missing[0]}")
        out = None
        where = self._where[idx] if len(idx) else np.empty((0, 2), np.int64)
        for seg in np.unique(where[:, 0]):
            rows = np.nonzero(where[:, 0] == seg)[0]
            feat = np.load(os.path.join(self.folder, self._segments[seg] + ".feat.npy"),
                           mmap_mode="r")
            if out is None:
                out = np.empty((len(digests), feat.shape[1]), np.float32)
            out[rows] = feat[where[rows, 1]]
        return out if out is not None else np.empty((0, 0), np.float32)


class EmbeddingCache:
    """All cached features of one model fingerprint: image views, captions, sample index."""

    def __init__(self, root: str, fingerprint: str, augment: AugmentConfig | None = None):
        self.root = root
        self.fingerprint = fingerprint
        self.augment = augment or AugmentConfig()
        self.folder = os.path.join(root, fingerprint)
        self.text = FeatureStore(os.path.join(self.folder, "text")).refresh()
        self._views: dict[int, FeatureStore] = {}

    def view_folder(self, view: int) -> str:
        if view == 0:
            return os.path.join(self.folder, "image", "view-000")
        aug = f"aug-{self.augment.digest()}"
        return os.path.join(self.folder, "image", aug, f"view-{view:03d}")

    def image(self, view: int) -> FeatureStore:
        if view not in self._views:
            self._views[view] = FeatureStore(self.view_folder(view)).refresh()
        return self._views[view]

    def refresh(self) -> None:
        self.text.refresh()
        for store in self._views.values():
            store.refresh()

    def write_description(self, description: dict) -> None:
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, "model.json")
        if not os.path.exists(path):
            tmp = path + f".tmp-{uuid.uuid4().hex}"
            with open(tmp, "w") as f:
                json.dump({"fingerprint": self.fingerprint, **description,
                           "augment": self.augment.__dict__}, f, indent=1, default=list)
            os.replace(tmp, path)

    def cached_views(self) -> list[int]:
        views = [0] if os.path.isdir(self.view_folder(0)) else []
        aug = os.path.dirname(self.view_folder(1))
        if os.path.isdir(aug):
            views += sorted(int(n.split("-")[1]) for n in os.listdir(aug) if n.startswith("view-"))
        return views

    def read_image(self, image_digests: Sequence[str], views: Sequence[int]) -> np.ndarray:
        """(n, len(views), d) image features."""
        return np.stack([self.image(v).read(image_digests) for v in views], axis=1)

    def read_text(self, caption_digests: Sequence[str]) -> np.ndarray:
        return self.text.read(caption_digests)
