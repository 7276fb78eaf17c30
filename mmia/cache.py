"""Content-keyed embedding cache that verifies what it serves.

Layout: ROOT/<fingerprint>/image/view-000, ROOT/<fingerprint>/image/aug-<cfg>/view-NNN,
ROOT/<fingerprint>/text. Each store is a folder of immutable segments, segment S being
`S.keys.npy` (content digests), `S.feat.npy` (float32 rows) and `S.seg.json`, its manifest
(row count, width, file size, SHA-256 of the digests and of the feature data). The data files
are written under temporary names, fsynced and renamed; the manifest, renamed last, is the
commit point, and segments are found by their manifests, so a kill at any moment leaves the
whole segment or none of it. Features of one fingerprint live under its own folder and can
never be served for another.

Every segment is checked before anything of it is served or counted as cached: when first seen
(manifest ↔ digests checksum ↔ feature file size: cheap) and before its first row is used (the
feature data's checksum, shape and finiteness: once per segment per process, so the cost follows
the segments a run touches, not the cache's size). A segment that fails is moved to the store's
`quarantine/` folder, reported in one line, and its samples count as not cached, so the next
`embed` computes them again. `verify_cache` checks a whole cache (`mmia cache verify`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from mmia.errors import MmiaError
from mmia.views import AugmentConfig

DIGEST_DTYPE = "S32"
FORMAT = 2  # segment format: 1 (mmia 0.1) had no manifest; its segments are ignored
MANIFEST, KEYS, FEATURES = ".seg.json", ".keys.npy", ".feat.npy"
QUARANTINE = "quarantine"
log = logging.getLogger("mmia")


class CacheMiss(MmiaError, KeyError):
    """Features asked for are not in the cache (never embedded, or quarantined)."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


class CacheWriteError(MmiaError):
    """A segment could not be written (disk full, read-only folder): nothing half-written."""


class BadSegment(Exception):
    """A segment failed a check; its message is the reason recorded in quarantine."""


CORRUPT = (ValueError, EOFError, KeyError, TypeError, OverflowError, RecursionError)
# feature files whose data passed its checks in this process: (path, inode, size, mtime)
_VERIFIED: set[tuple[str, int, int, int]] = set()


def _checked_manifest(manifest: object) -> dict:
    """The manifest if every field has the right type and a sensible value; else BadSegment."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BadSegment(f"manifest of another format: {str(manifest)[:80]}")
    for field_name in ("rows", "width", "feat_bytes"):
        value = manifest.get(field_name)
        if type(value) is not int or value < 1:
            raise BadSegment(f"manifest field {field_name!r} is {value!r}")
    for field_name in ("keys_sha256", "feat_sha256"):
        value = manifest.get(field_name)
        if not (isinstance(value, str) and len(value) == 64
                and all(c in "0123456789abcdef" for c in value)):
            raise BadSegment(f"manifest field {field_name!r} is not a SHA-256")
    return manifest


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(array)).cast("B")).hexdigest()


def _fsync_save(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())


def _fsync_folder(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _SortedRuns:
    """digest → (segment, row) as sorted runs, each at least twice the size of the next.

    Adding m digests costs O(m log n) amortised (runs merge geometrically), a lookup
    O(log² n): nothing is re-sorted in proportion to what is already cached. Where a digest
    is in several segments, the one added first is found. 40 bytes per digest.
    """

    def __init__(self) -> None:
        self.runs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, keys: np.ndarray, segment: int) -> None:
        order = np.argsort(keys, kind="stable")
        run = (keys[order], np.full(len(keys), segment, np.int32), order.astype(np.int32))
        while self.runs and len(self.runs[-1][0]) < 2 * len(run[0]):
            older = self.runs.pop()
            merged = [np.concatenate([a, b]) for a, b in zip(older, run, strict=True)]
            order = np.argsort(merged[0], kind="stable")  # stable: the older entry stays first
            run = (merged[0][order], merged[1][order], merged[2][order])
        self.runs.append(run)

    def locate(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(segment, row) of each digest; segment -1 where absent."""
        segment = np.full(len(query), -1, np.int64)
        row = np.zeros(len(query), np.int64)
        for keys, segs, rows in self.runs:
            todo = np.nonzero(segment < 0)[0]
            if not len(todo):
                break
            pos = np.minimum(np.searchsorted(keys, query[todo]), len(keys) - 1)
            hit = keys[pos] == query[todo]
            segment[todo[hit]], row[todo[hit]] = segs[pos[hit]], rows[pos[hit]]
        return segment, row

    def unique_count(self) -> int:
        if not self.runs:
            return 0
        return len(np.unique(np.concatenate([keys for keys, _, _ in self.runs])))


@dataclass
class _Segment:
    name: str
    manifest: dict
    verified_as: tuple | None = None  # (path, inode, size, mtime) of the checked feature file


@dataclass
class Quarantined:
    folder: str
    segment: str
    reason: str
    moved: bool = True  # False: a read-only cache, the segment is only ignored


class FeatureStore:
    """An append-only map content digest → feature vector, stored as verified segments."""

    def __init__(self, folder: str):
        self.folder = folder
        self._segments: list[_Segment] = []
        self._seen: set[str] = set()
        self._index = _SortedRuns()
        self._bad: set[str] = set()  # failed here: never opened again by this object
        self._mtime: int | None = None  # of the folder at the last refresh
        self.quarantined: list[Quarantined] = []  # by this store object, this process

    # ------------------------------------------------------------------ finding segments

    def _listed(self) -> list[str]:
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        return sorted(n[: -len(MANIFEST)] for n in names if n.endswith(MANIFEST))

    def refresh_if_changed(self) -> FeatureStore:
        """`refresh` only if the folder changed since the last look (one stat): for hot paths.

        A change inside the file system's timestamp granularity can be missed until the next
        change; a miss costs duplicate work at most (`read` and `write` refresh fully).
        """
        try:
            mtime = os.stat(self.folder).st_mtime_ns
        except FileNotFoundError:
            return self
        if mtime != self._mtime:
            self.refresh()
        return self

    def refresh(self) -> FeatureStore:
        """Pick up segments committed since the last look (by any process).

        Reads the digests of new segments only; listing the folder is O(segments).
        """
        try:
            self._mtime = os.stat(self.folder).st_mtime_ns
        except FileNotFoundError:
            return self
        listed = [n for n in self._listed() if n not in self._bad]
        checked = {s.name: s.verified_as for s in self._segments}
        if not checked.keys() <= set(listed):  # a segment was quarantined: index anew
            self._segments, self._seen, self._index = [], set(), _SortedRuns()
        for name in listed:
            if name not in self._seen:
                self._seen.add(name)
                self._open(name, checked.get(name))
        return self

    def _path(self, name: str, suffix: str) -> str:
        return os.path.join(self.folder, name + suffix)

    def _open(self, name: str, verified_as: tuple | None = None) -> None:
        """Check manifest, digests and feature-file size; index the segment or quarantine it."""
        try:
            manifest, keys = self._read_head(name)
        except BadSegment as exc:
            self._quarantine(name, str(exc))
            return
        except FileNotFoundError:  # quarantined by another process meanwhile
            return
        self._segments.append(_Segment(name, manifest, verified_as))
        self._index.add(keys, len(self._segments) - 1)

    def _read_head(self, name: str) -> tuple[dict, np.ndarray]:
        try:  # OSErrors other than a missing file (EMFILE, EIO …) are no proof of corruption:
            with open(self._path(name, MANIFEST)) as f:  # they propagate
                manifest = _checked_manifest(json.load(f))
        except CORRUPT as exc:
            raise BadSegment(f"unreadable manifest ({type(exc).__name__})") from None
        rows, size, keys_sha = manifest["rows"], manifest["feat_bytes"], manifest["keys_sha256"]
        try:
            keys = np.load(self._path(name, KEYS), allow_pickle=False)
        except FileNotFoundError:
            raise BadSegment("digest file missing") from None
        except CORRUPT as exc:
            raise BadSegment(f"unreadable digest file ({str(exc)[:60]})") from None
        if keys.dtype != np.dtype(DIGEST_DTYPE) or keys.shape != (rows,):
            raise BadSegment(f"digest file holds {keys.shape} {keys.dtype}, manifest {rows} rows")
        if _sha256(keys) != keys_sha:
            raise BadSegment("digest file checksum mismatch")
        try:
            actual = os.stat(self._path(name, FEATURES)).st_size
        except FileNotFoundError:
            raise BadSegment("feature file missing") from None
        if actual != size:
            raise BadSegment(f"feature file is {actual} bytes, manifest says {size}")
        return manifest, keys

    # ------------------------------------------------------------------ verifying data

    def _features(self, seg: int) -> np.ndarray:
        """The segment's rows (memory-mapped), checked against its manifest once per process.

        Checked again if the file was replaced since. Raises BadSegment.
        """
        segment = self._segments[seg]
        path = self._path(segment.name, FEATURES)
        try:
            st = os.stat(path)
            feat = np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise BadSegment("feature file missing") from None
        except CORRUPT as exc:
            raise BadSegment(f"unreadable feature file ({str(exc)[:60]})") from None
        identity = (path, st.st_ino, st.st_size, st.st_mtime_ns)
        if segment.verified_as != identity and identity not in _VERIFIED:
            manifest = segment.manifest
            expected = (int(manifest["rows"]), int(manifest["width"]))
            if feat.dtype != np.float32 or feat.shape != expected:
                raise BadSegment(f"feature file holds {feat.shape} {feat.dtype}, "
                                 f"manifest {expected} float32")
            if _sha256(feat) != manifest["feat_sha256"]:
                raise BadSegment("feature data checksum mismatch")
            bad_rows = int((~np.isfinite(feat).all(axis=1)).sum())
            if bad_rows:
                raise BadSegment(f"{bad_rows} rows hold NaN or inf")
            _VERIFIED.add(identity)
        segment.verified_as = identity
        return feat

    def _usable(self, segments: np.ndarray) -> bool:
        """Verify these segments; quarantine failures. False if any failed (index rebuilt)."""
        ok = True
        for seg in np.unique(segments[segments >= 0]):
            if self._segments[seg].verified_as is not None:  # `read` checks the file's identity
                continue
            try:
                self._features(int(seg))
            except BadSegment as exc:
                self._quarantine(self._segments[seg].name, str(exc))
                ok = False
        if not ok:
            self.refresh()
        return ok

    def _locate_verified(self, digests: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        query = np.asarray(digests, dtype=DIGEST_DTYPE)
        while True:
            segment, row = self._index.locate(query)
            if self._usable(segment):
                return segment, row

    def _quarantine(self, name: str, reason: str) -> None:
        """Move a bad segment aside (manifest first: it stops being served at once); log it."""
        self._bad.add(name)
        target = os.path.join(self.folder, QUARANTINE)
        try:
            os.makedirs(target, exist_ok=True)
            os.replace(self._path(name, MANIFEST), os.path.join(target, name + MANIFEST))
        except FileNotFoundError:
            return  # another process got there first
        except OSError as exc:  # a read-only cache: cannot move it, but never serve it
            log.warning("cache: segment %s in %s is bad (%s) and cannot be quarantined (%s): "
                        "it is ignored", name, self.folder, reason, exc.strerror)
            self.quarantined.append(Quarantined(self.folder, name, reason, moved=False))
            return
        for suffix in (KEYS, FEATURES):
            try:
                os.replace(self._path(name, suffix), os.path.join(target, name + suffix))
            except OSError:
                pass
        with contextlib.suppress(OSError):
            with open(os.path.join(target, name + ".reason.txt"), "w") as f:
                f.write(reason + "\n")
        self.quarantined.append(Quarantined(self.folder, name, reason))
        log.warning("cache: quarantined segment %s of %s (%s); its samples will be embedded "
                    "again", name, self.folder, reason)

    # ------------------------------------------------------------------ public API

    def __len__(self) -> int:
        return self._index.unique_count()

    def digests(self) -> set[str]:
        return {k.decode() for run in self._index.runs for k in np.unique(run[0])}

    def contains(self, digests: Sequence[str]) -> np.ndarray:
        """Whether each digest is cached in a segment that passes its checks."""
        return self._locate_verified(digests)[0] >= 0

    def write(self, digests: Sequence[str], features: np.ndarray) -> int:
        """Commit the rows whose digests are not cached yet as one segment; how many were new."""
        return len(self.write_new(digests, features))

    def write_new(self, digests: Sequence[str], features: np.ndarray) -> list[str]:
        """Commit the rows whose digests are not cached yet (by anyone) as one segment; their
        digests. The check reads the folder afresh, so under a lock it is exact.

        Raises MmiaError for non-finite features (nothing is written) and CacheWriteError when
        the disk is full or the folder read-only (nothing half-written is left behind).
        """
        features = np.ascontiguousarray(features, np.float32)
        if len(digests) and not np.isfinite(features).all():
            bad = int((~np.isfinite(features).all(axis=1)).sum())
            raise MmiaError(f"the model produced NaN or inf features for {bad} of {len(digests)} "
                            "inputs; none were cached: check the weights, or use --precision fp32")
        new = ~self.refresh().contains(digests) if len(digests) else np.zeros(0, bool)
        _, first = np.unique(np.asarray(digests, DIGEST_DTYPE), return_index=True)
        keep = np.zeros(len(digests), bool)
        keep[first] = True
        keep &= new
        if not keep.any():
            return []
        keys = np.asarray(digests, DIGEST_DTYPE)[keep]
        feats = features[keep]
        name = f"{len(self._segments):08d}-{uuid.uuid4().hex[:8]}"
        try:
            self._commit(name, keys, feats)
        except OSError as exc:
            raise CacheWriteError(
                f"cannot write a cache segment in {self.folder} "
                f"({exc.strerror or errno.errorcode.get(exc.errno, exc)}): every segment committed "
                "so far is kept; free space or pass a writable --cache, then rerun to resume"
            ) from None
        return [k.decode() for k in keys]

    def _commit(self, name: str, keys: np.ndarray, feats: np.ndarray) -> None:
        os.makedirs(self.folder, exist_ok=True)
        tmp = f".tmp-{uuid.uuid4().hex}"
        paths = [self._path(name, suffix) for suffix in (FEATURES, KEYS, MANIFEST)]
        try:
            _fsync_save(paths[0] + tmp, feats)
            _fsync_save(paths[1] + tmp, keys)
            manifest = {"format": FORMAT, "rows": len(keys), "width": int(feats.shape[1]),
                        "feat_bytes": os.path.getsize(paths[0] + tmp),
                        "keys_sha256": _sha256(keys), "feat_sha256": _sha256(feats)}
            with open(paths[2] + tmp, "w") as f:
                json.dump(manifest, f)
                f.flush()
                os.fsync(f.fileno())
            for path in paths:  # the manifest last: the commit point
                os.replace(path + tmp, path)
            _fsync_folder(self.folder)
        except BaseException:
            for path in paths:
                if os.path.exists(path + tmp):
                    os.remove(path + tmp)
            raise
        self._seen.add(name)
        self._segments.append(_Segment(name, manifest, None))
        self._index.add(keys, len(self._segments) - 1)

    def read(self, digests: Sequence[str]) -> np.ndarray:
        """Verified features for the digests; CacheMiss if any is absent (or was quarantined).

        A miss re-reads the segment list first, so segments committed since this store was
        opened (by another process or another `EmbeddingCache`) are found.
        """
        for _ in range(3):  # a segment found bad while reading: look the digests up again
            segment, row = self._locate_verified(digests)
            if (segment < 0).any():
                segment, row = self.refresh()._locate_verified(digests)
            if (segment < 0).any():
                missing = [d for d, s in zip(digests, segment, strict=True) if s < 0]
                raise CacheMiss(f"{len(missing)} features are not in the cache {self.folder} "
                                f"(e.g. {missing[0]}): run the embedding again to compute them")
            out = self._gather(segment, row)
            if out is not None:
                return out
        raise CacheMiss(f"cache segments in {self.folder} keep changing while being read: "
                        "is another program writing into the cache?")

    def _gather(self, segment: np.ndarray, row: np.ndarray) -> np.ndarray | None:
        """The located rows; None if a segment turned out bad (it is quarantined)."""
        out = np.empty((len(segment), 0), np.float32)
        for seg in np.unique(segment):
            rows = np.nonzero(segment == seg)[0]
            try:
                feat = self._features(int(seg))
            except BadSegment as exc:  # changed since it was checked: never serve it
                self._quarantine(self._segments[seg].name, str(exc))
                self.refresh()
                return None
            if out.shape[1] == 0:
                out = np.empty((len(segment), feat.shape[1]), np.float32)
            out[rows] = feat[row[rows]]
        return out

    def verify_all(self) -> tuple[int, int]:
        """Check every segment's data now, whatever was checked before; (segments, rows) that
        passed."""
        self.refresh()
        for segment in self._segments:
            segment.verified_as = None
        _VERIFIED.difference_update({v for v in _VERIFIED if v[0].startswith(self.folder)})
        self._usable(np.arange(len(self._segments)))
        return len(self._segments), sum(int(s.manifest["rows"]) for s in self._segments)


class EmbeddingCache:
    """All cached features of one model fingerprint: image views and captions."""

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

    def refresh_if_changed(self) -> None:
        """Refresh the stores whose folders changed (a stat each): for per-chunk use."""
        self.text.refresh_if_changed()
        for store in self._views.values():
            store.refresh_if_changed()

    def writable(self) -> bool:
        """Whether segments can be written here (a real probe: permissions, read-only mounts)."""
        try:
            os.makedirs(self.folder, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".probe-", dir=self.folder)
        except OSError:
            return False
        os.close(fd)
        os.remove(probe)
        return True

    def write_description(self, description: dict) -> None:
        path = os.path.join(self.folder, "model.json")
        if os.path.exists(path):
            return
        os.makedirs(self.folder, exist_ok=True)
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


# ---------------------------------------------------------------------- whole-cache check


@dataclass
class CacheReport:
    """What `verify_cache` found."""

    root: str
    stores: int = 0
    segments: int = 0
    rows: int = 0
    quarantined: list[Quarantined] = field(default_factory=list)
    earlier_quarantined: int = 0  # segments already in quarantine folders before this check
    uncommitted: int = 0  # data files without a manifest: interrupted writes or mmia 0.1
    temporary: int = 0  # leftovers of interrupted writes

    @property
    def clean(self) -> bool:
        return not self.quarantined

    def summary(self) -> str:
        lines = [f"cache {self.root}: {self.stores} stores, {self.segments} segments, "
                 f"{self.rows} feature rows verified"]
        for q in self.quarantined[:20]:
            what = "quarantined" if q.moved else "bad (read-only cache: left in place, ignored)"
            lines.append(f"{what} {os.path.join(q.folder, q.segment)}: {q.reason}")
        if len(self.quarantined) > 20:
            lines.append(f"... and {len(self.quarantined) - 20} more quarantined segments")
        if self.quarantined:
            lines.append(f"{len(self.quarantined)} bad segments quarantined: the next embed or "
                         "audit embeds their samples again")
        if self.earlier_quarantined:
            lines.append(f"{self.earlier_quarantined} segments were already in quarantine")
        if self.uncommitted or self.temporary:
            lines.append(f"ignored: {self.uncommitted} uncommitted segments (an interrupted write "
                         f"or mmia 0.1's format), {self.temporary} temporary files")
        if self.clean:
            lines.append("every committed segment passed its checks")
        return "\n".join(lines)


def _store_folders(root: str) -> Iterator[str]:
    for folder, dirs, files in os.walk(root):
        quarantine = QUARANTINE in dirs
        dirs[:] = sorted(d for d in dirs if d != QUARANTINE)
        if quarantine or any(f.endswith((MANIFEST, KEYS, FEATURES)) or ".tmp-" in f for f in files):
            yield folder


def verify_cache(root: str) -> CacheReport:
    """Check every segment of every store under `root`; quarantine the bad ones."""
    if not os.path.isdir(root):
        raise MmiaError(f"cache folder {root!r} does not exist: pass the --cache of an embed run")
    report = CacheReport(root)
    for folder in _store_folders(root):
        earlier = os.path.join(folder, QUARANTINE)
        if os.path.isdir(earlier):
            report.earlier_quarantined += sum(1 for n in os.listdir(earlier)
                                              if n.endswith(".reason.txt"))
        store = FeatureStore(folder)
        segments, rows = store.verify_all()
        report.stores += 1
        report.segments += segments
        report.rows += rows
        report.quarantined += store.quarantined
        files = os.listdir(folder)
        committed = {n[: -len(MANIFEST)] for n in files if n.endswith(MANIFEST)}
        report.uncommitted += sum(1 for n in files if n.endswith(KEYS)
                                  and n[: -len(KEYS)] not in committed)
        report.temporary += sum(1 for n in files if ".tmp-" in n)
    return report
