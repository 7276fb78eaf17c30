"""Content-keyed embedding cache that verifies what it serves.

Layout: ROOT/<fingerprint>/image/view-000 (image features), ROOT/<fingerprint>/text (caption
features), ROOT/<fingerprint>/image/aug-<cfg>/pairs-KNNN (AEA's input: for each image–caption
pair, keyed by `pair_digest`, the K cosines of augmented views 1..K with the caption) and, only
when asked for (`keep_view_features`), ROOT/<fingerprint>/image/aug-<cfg>/view-NNN (the features
of augmented view NNN). By default the views' features are not kept: AEA needs only their K
cosines, and K = 10 views of 10^6 images at d = 512 would be 20 GB. ROOT/samples holds the
per-shard sample index (`mmia.sample_index`).

Each store is a folder of immutable segments, segment S being
`S.keys.npy` (content digests), `S.feat.npy` (float32 rows) and `S.seg.json`, its manifest
(row count, width, file size, SHA-256 of the digests and of the feature data). The data files
are written under temporary names, fsynced and renamed; the manifest, renamed last, is the
commit point, and segments are found by their manifests, so a kill at any moment leaves the
whole segment or none of it. Features of one fingerprint live under its own folder and can
never be served for another.

Every segment is checked before anything of it is served or counted as cached: when first seen
(manifest ↔ digests checksum ↔ feature file size: cheap) and before its first row is used (the
feature data's checksum, shape and finiteness: once per segment per process, so the cost follows
the segments a run touches, not the cache's size). A feature file that passed is marked in the
store's `verified/` folder with its inode, size, mtime and ctime: a later process that finds the
very same file (any write, rename or replacement changes its ctime) does not hash it again, so a
warm re-audit of 10^6 samples does not re-read 4 GB to check it. A segment that fails is moved
to the store's `quarantine/` folder, reported in one line, and its samples count as not cached,
so the next `embed` computes them again. `verify_cache` checks a whole cache, marks or not
(`mmia cache verify`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, NamedTuple

import numpy as np

from mmia.errors import MmiaError
from mmia.views import AugmentConfig

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: concurrent runs are not locked out there
    fcntl = None

COMMIT_LOCK = ".embed-commit.lock"
LOCK_PATIENCE = 5.0  # seconds of waiting for the commit lock before saying so
DIGEST_DTYPE = "S32"
FORMAT = 2  # segment format: 1 (mmia 0.1) had no manifest; its segments are ignored
MANIFEST, KEYS, FEATURES = ".seg.json", ".keys.npy", ".feat.npy"
QUARANTINE = "quarantine"
log = logging.getLogger("mmia")


def pair_digest(image_digest: str, caption_digest: str) -> str:
    """The cache identity of an image–caption pair (from its two content digests)."""
    return hashlib.sha256(f"{image_digest}:{caption_digest}".encode()).hexdigest()[:32]


def pair_digests(image_digests: Sequence, caption_digests: Sequence) -> np.ndarray:
    """`pair_digest` of each pair, as an "S32" array (str or bytes digests)."""
    def text(d) -> str:
        return d.decode() if isinstance(d, bytes) else d

    return np.array([pair_digest(text(i), text(c))
                     for i, c in zip(image_digests, caption_digests, strict=True)], dtype="S32")


@contextlib.contextmanager
def commit_lock(folder: str) -> Iterator[None]:
    """Exclusive (across processes and threads) while a run commits to the cache `folder`."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(os.path.join(folder, COMMIT_LOCK), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:  # a read-only cache: the write itself says so
        yield
        return
    try:
        _acquire(fd, folder)
        yield
    finally:
        os.close(fd)  # releases the lock


def _acquire(fd: int, folder: str) -> None:
    """Take the lock, saying so when another run holds it for long; where the file system has
    no locks, go on without (the lock only prevents duplicate work, never wrong features)."""
    if fcntl is None:
        return
    waited, said = 0.0, False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        except OSError as exc:  # ENOLCK, EOPNOTSUPP: e.g. some network file systems
            log.warning("cache %s: no file locks here (%s); concurrent runs may repeat work",
                        folder, exc.strerror)
            return
        if waited >= LOCK_PATIENCE and not said:
            log.info("waiting for the cache lock in %s, held by another mmia run", folder)
            said = True
        time.sleep(0.05)
        waited += 0.05


class CacheMiss(MmiaError, KeyError):
    """Features asked for are not in the cache (never embedded, or quarantined)."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


class CacheWriteError(MmiaError):
    """A segment could not be written (disk full, read-only folder): nothing half-written."""


class BadSegment(Exception):
    """A segment failed a check; its message is the reason recorded in quarantine."""


class SegmentGone(Exception):
    """A segment was removed since it was indexed (merged by a compaction): look again."""


CORRUPT = (ValueError, EOFError, KeyError, TypeError, OverflowError, RecursionError)
# feature files that passed their checks in this process, by `_file_identity`: True where this
# process hashed the data, False where it trusted an earlier process's mark
_VERIFIED: dict[tuple[str, int, int, int, int], bool] = {}


def _file_identity(path: str, st: os.stat_result) -> tuple[str, int, int, int, int]:
    """(path, inode, size, mtime, ctime): any change made to the file through the file system
    changes its ctime, which no program can set back."""
    return path, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


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


SEGMENT_BYTES = 256 << 20  # compaction merges small segments into ones of about this size
COMPACT_AFTER = 64  # small segments a store may have before an embed run compacts it
VERIFY_BLOCK_BYTES = 16 << 20  # feature data is checked in reads of this size (not mapped)
SPAN_BYTES = 16 << 20  # rows gathered from a segment are read through a window of this size
RESTAT_SECONDS = 1.0  # how long `contains` trusts a stat that found a checked file in place
VERIFIED = "verified"  # a store's folder of verification marks (see `FeatureStore._marked`)
MARK_AFTER_SECONDS = 2.0  # a file changed more recently than this is checked, not marked
MARK_LIFETIME_SECONDS = 24 * 3600.0  # a mark older than this is ignored: the data is hashed again


def _open_rows(f: BinaryIO) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) from the header of an open .npy feature file; ValueError
    unless it is a C-ordered matrix."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f"npy format version {version}")
    if fortran or len(shape) != 2:
        raise ValueError(f"not a C-ordered matrix: shape {shape}")
    return shape, dtype, f.tell()


def _check_data(f: BinaryIO, offset: int, shape: tuple[int, int], sha256: str) -> None:
    """The data of an open feature file hashes to `sha256` and holds only finite numbers; read
    in blocks, so checking a segment of any size holds 16 MB, not the segment, in memory."""
    h = hashlib.sha256()
    rows_per_block = max(1, VERIFY_BLOCK_BYTES // (4 * shape[1]))
    bad_rows = 0
    f.seek(offset)
    for start in range(0, shape[0], rows_per_block):
        rows = min(rows_per_block, shape[0] - start)
        data = f.read(rows * shape[1] * 4)
        if len(data) != rows * shape[1] * 4:
            raise BadSegment("feature file shorter than its header says")
        h.update(data)
        block = np.frombuffer(data, np.float32).reshape(rows, shape[1])
        bad_rows += int((~np.isfinite(block).all(axis=1)).sum())
    if h.hexdigest() != sha256:
        raise BadSegment("feature data checksum mismatch")
    if bad_rows:
        raise BadSegment(f"{bad_rows} rows hold NaN or inf")


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


_MIX = [np.uint64(m) for m in (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                               0x27D4EB2F165667C5)]


def key_hash(keys: np.ndarray) -> np.ndarray:
    """A 64-bit mix of each 32-byte digest (vectorised): what the index sorts and searches by;
    integer comparisons are ~10× faster than 32-byte string ones, and the top bits of a
    uniform hash pick a bucket of the directory. Equal hashes are checked against the
    digests, so a collision costs time, never a wrong row."""
    words = np.ascontiguousarray(keys, dtype=DIGEST_DTYPE).view(np.uint64).reshape(-1, 4)
    with np.errstate(over="ignore"):
        h = words[:, 0] * _MIX[0]  # column by column: a sum over a short axis is slow
        for column in range(1, 4):
            h += words[:, column] * _MIX[column]
        h ^= h >> np.uint64(31)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(29)
    return h


def _words(keys: np.ndarray) -> np.ndarray:
    """Each 32-byte digest as four uint64 words (a view where possible)."""
    return np.ascontiguousarray(keys, dtype=DIGEST_DTYPE).view(np.uint64).reshape(-1, 4)


HASH, WORDS, WHERE = 0, slice(1, 5), 5  # the columns of an index table
LOW32 = np.uint64(0xFFFFFFFF)


class _Run(NamedTuple):
    """Index entries sorted by hash and a directory of their buckets.

    One row of 48 bytes per entry: [hash, the digest's four words, segment << 32 | row], so
    a found entry's digest and place are read from the lines its hash was read from.
    """

    table: np.ndarray  # (n, 6) uint64, sorted by column HASH (stable: older entries first)
    directory: np.ndarray  # bucket b holds rows directory[b]:directory[b + 1]
    shift: np.uint64  # bucket of a hash h: h >> shift

    @property
    def hashes(self) -> np.ndarray:
        return self.table[:, HASH]

    @property
    def keys(self) -> np.ndarray:
        return np.ascontiguousarray(self.table[:, WORDS]).view(DIGEST_DTYPE).reshape(-1)


def _directory(hashes: np.ndarray) -> tuple[np.ndarray, np.uint64]:
    """Bucket boundaries on the top bits of the sorted (uniform) hashes: 0.5–1 entries per
    bucket on average (8 bytes per entry at most); O(n)."""
    bits = min(max(1, int(len(hashes)).bit_length()), 62)
    shift = np.uint64(64 - bits)
    counts = np.bincount((hashes >> shift).astype(np.intp), minlength=1 << bits)
    directory = np.zeros((1 << bits) + 1, np.int32 if len(hashes) < 2**31 else np.int64)
    np.cumsum(counts, out=directory[1:])
    return directory, shift


def _run(table: np.ndarray) -> _Run:
    return _Run(table, *_directory(table[:, HASH]))


def _sorted_table(tables: list[np.ndarray]) -> np.ndarray:
    """`tables` (oldest first) as one table sorted by hash; stable: the older entry of a digest
    stays first."""
    table = np.concatenate(tables) if len(tables) > 1 else tables[0]
    return table[np.argsort(table[:, HASH], kind="stable")]


class _SortedRuns:
    """digest → (segment, row) as runs sorted by `key_hash`, each at least twice the size of
    the next, each with a directory on the top bits of the hash.

    Adding m digests costs O(m log n) amortised (runs merge geometrically); a lookup reads
    one directory slot and then the (on average fewer than one) entries of its bucket,
    whatever n: nothing is re-sorted in proportion to what is already cached, and an absent
    digest costs at most a hash comparison or two. Where a digest is in several segments, the
    one added first is found. About 56 bytes per digest.
    """

    def __init__(self) -> None:
        self.runs: list[_Run] = []  # oldest first

    def add(self, keys: np.ndarray, segment: int) -> None:
        self.add_many([(keys, segment)])

    def add_many(self, parts: Sequence[tuple[np.ndarray, int]]) -> None:
        """Add the digests of several segments, (keys, segment) oldest first, as one run: a
        process opening a cache sorts what it read once, not once per merge level."""
        if not parts:
            return
        table = np.empty((sum(len(keys) for keys, _ in parts), 6), np.uint64)
        start = 0
        for keys, segment in parts:
            rows = table[start: start + len(keys)]
            rows[:, HASH] = key_hash(keys)
            rows[:, WORDS] = _words(keys)
            rows[:, WHERE] = (np.uint64(segment) << np.uint64(32)) | np.arange(len(keys),
                                                                             dtype=np.uint64)
            start += len(keys)
        tables = [table]
        while self.runs and len(self.runs[-1].table) < 2 * sum(map(len, tables)):
            tables.insert(0, self.runs.pop().table)
        self.runs.append(_run(_sorted_table(tables)))

    def locate(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(segment, row) of each digest; segment -1 where absent."""
        query = np.asarray(query, DIGEST_DTYPE)
        hashes, words = key_hash(query), _words(query)
        segment = np.full(len(query), -1, np.int64)
        row = np.zeros(len(query), np.int64)
        todo = np.arange(len(query))
        for run in self.runs:
            if not len(todo):
                break
            at, where = _find(run, words[todo], hashes[todo])
            segment[todo[at]] = (where >> np.uint64(32)).astype(np.int64)
            row[todo[at]] = (where & LOW32).astype(np.int64)
            todo = todo[segment[todo] < 0]
        return segment, row

    def unique_count(self) -> int:
        if not self.runs:
            return 0
        return len(np.unique(np.concatenate([run.keys for run in self.runs])))


def _find(run: _Run, words: np.ndarray, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(which queries are in the run, their entries' WHERE): each query walks its bucket to
    the first entry whose hash is not below its own (vectorised over the queries still
    walking); equal hashes are then settled by the digests."""
    bucket = (hashes >> run.shift).astype(np.intp)
    start, end = run.directory[bucket], run.directory[bucket + 1]
    walking = np.flatnonzero(start < end)  # an empty bucket: absent, nothing more to read
    pos, end, wanted = start[walking].astype(np.intp), end[walking], hashes[walking]
    run_hashes = run.hashes
    candidates, positions = [], []
    while len(walking):
        found = run_hashes[pos]
        same = found == wanted  # sorted: the first entry of this hash
        candidates.append(walking[same])
        positions.append(pos[same])
        pos += 1
        go_on = (found < wanted) & (pos < end)
        walking, pos, end, wanted = walking[go_on], pos[go_on], end[go_on], wanted[go_on]
    candidates = np.concatenate(candidates) if candidates else np.zeros(0, np.intp)
    pos = np.concatenate(positions) if positions else np.zeros(0, np.intp)
    hit = _same_digest(run.table, pos, words[candidates])
    for i in np.flatnonzero(~hit):  # a hash collision: look past it
        q, p = candidates[i], pos[i] + 1
        while p < len(run.table) and run_hashes[p] == hashes[q]:
            if (run.table[p, WORDS] == words[q]).all():
                pos[i], hit[i] = p, True
                break
            p += 1
    return candidates[hit], run.table[pos[hit], WHERE]


def _same_digest(table: np.ndarray, pos: np.ndarray, words: np.ndarray) -> np.ndarray:
    """Whether the entries at `pos` hold these digests (word by word: a gather per column is
    faster than one of whole rows)."""
    same = table[:, WORDS.start][pos] == words[:, 0]
    for column in range(1, 4):
        same &= table[:, WORDS.start + column][pos] == words[:, column]
    return same


@dataclass
class _Segment:
    name: str
    manifest: dict
    verified_as: tuple | None = None  # `_file_identity` of the checked feature file
    seen_unchanged: float = -np.inf  # when a stat last found the checked file in place


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
        self.trust_marks = True  # False: check every segment's data (`verify_all`)
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
        for segment in self._segments:  # a new look (a new run, a write): stat them again
            segment.seen_unchanged = -np.inf
        if not checked.keys() <= set(listed):  # a segment was quarantined: index anew
            self._segments, self._seen, self._index = [], set(), _SortedRuns()
        opened: list[tuple[np.ndarray, int]] = []
        for name in listed:
            if name not in self._seen:
                self._seen.add(name)
                self._open(name, checked.get(name), opened)
        self._index.add_many(opened)
        return self

    def _path(self, name: str, suffix: str) -> str:
        return os.path.join(self.folder, name + suffix)

    def _open(self, name: str, verified_as: tuple | None,
              opened: list[tuple[np.ndarray, int]]) -> None:
        """Check manifest, digests and feature-file size; list the segment (its digests and
        number, appended to `opened`, for the index) or quarantine it."""
        try:
            manifest, keys = self._read_head(name)
        except BadSegment as exc:
            self._quarantine(name, str(exc))
            return
        except FileNotFoundError:  # quarantined by another process meanwhile
            return
        self._segments.append(_Segment(name, manifest, verified_as))
        opened.append((keys, len(self._segments) - 1))

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

    def _features(self, seg: int, rehash_marked: bool = False) -> np.ndarray:
        """The segment's rows, memory-mapped from the very file whose identity (`fstat` of the
        mapped descriptor) was checked against its manifest: once per process, or not at all
        where a valid mark vouches for that file (`rehash_marked`: hash it anyway).

        Checked again if the file changed since. Raises BadSegment (SegmentGone if removed).
        """
        segment = self._segments[seg]
        path = self._path(segment.name, FEATURES)
        manifest = segment.manifest
        expected = (int(manifest["rows"]), int(manifest["width"]))
        with self._open_data(segment) as f:
            try:
                identity = _file_identity(path, os.fstat(f.fileno()))
                shape, dtype, offset = _open_rows(f)
            except CORRUPT as exc:
                raise BadSegment(f"unreadable feature file ({str(exc)[:60]})") from None
            if dtype != np.float32 or shape != expected:
                raise BadSegment(f"feature file holds {shape} {dtype}, "
                                 f"manifest {expected} float32")
            known = _VERIFIED.get(identity)
            if known is None or (rehash_marked and not known):
                if not rehash_marked and self.trust_marks and self._marked(segment, identity):
                    _VERIFIED[identity] = False
                else:
                    started = self._mark_started()
                    try:
                        _check_data(f, offset, expected, manifest["feat_sha256"])
                        self._mark(segment, identity, started, f)
                    finally:
                        if started is not None:
                            with contextlib.suppress(OSError):
                                os.remove(started[0])  # unused (not renamed into a mark)
                    _VERIFIED[identity] = True
            try:
                feat = np.memmap(f, dtype=np.float32, mode="r", offset=offset, shape=expected)
            except CORRUPT as exc:
                raise BadSegment(f"unreadable feature file ({str(exc)[:60]})") from None
        segment.verified_as, segment.seen_unchanged = identity, time.monotonic()
        return feat

    def _open_data(self, segment: _Segment) -> BinaryIO:
        """The segment's feature file, open for reading; SegmentGone where the whole segment
        was removed (merged), BadSegment where only the file is missing."""
        try:
            return open(self._path(segment.name, FEATURES), "rb")  # noqa: SIM115 - returned
        except FileNotFoundError:
            if not os.path.exists(self._path(segment.name, MANIFEST)):
                raise SegmentGone(segment.name) from None
            raise BadSegment("feature file missing") from None

    def _mark_path(self, name: str) -> str:
        return os.path.join(self.folder, VERIFIED, name + ".json")

    def _marked(self, segment: _Segment, identity: tuple) -> bool:
        """Whether an earlier process checked this very feature file (same inode, size, mtime
        and ctime: changes through the file system change its ctime) against this manifest,
        less than MARK_LIFETIME_SECONDS ago: its data is then not hashed again. What a mark
        cannot see — writes through a shared writable memory map into an already dirty page,
        damage below the file system, file systems that fake ctime — the next hash finds, a
        lifetime later at most, or `verify_all` (which ignores marks) at once."""
        try:
            with open(self._mark_path(segment.name)) as f:
                mark = json.load(f)
            checked = float(mark["checked"])
            return (mark["file"] == list(identity[1:])
                    and mark["feat_sha256"] == segment.manifest["feat_sha256"]
                    and 0 <= time.time() - checked < MARK_LIFETIME_SECONDS)
        except (OSError, *CORRUPT):
            return False

    def _mark_started(self) -> tuple[str, int] | None:
        """Before a hash: a new (empty) temporary mark file and its ctime, the file system's
        own clock at this moment (a client's clock may differ from a file server's); None
        where marks cannot be written."""
        path = os.path.join(self.folder, VERIFIED, f".tmp-{uuid.uuid4().hex}")
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "x") as f:
                return path, os.fstat(f.fileno()).st_ctime_ns
        except OSError:
            return None

    def _mark(self, segment: _Segment, identity: tuple, started: tuple[str, int] | None,
              f: BinaryIO) -> None:
        """Record that the file passed its checks (best effort, atomic), unless it changed
        during the hash or within MARK_AFTER_SECONDS before it (a change in the same tick of a
        coarse file-system clock would leave its ctime as it was)."""
        if started is None:
            return
        tmp, fs_now = started
        try:
            if _file_identity(identity[0], os.fstat(f.fileno())) == identity \
                    and fs_now - identity[4] >= MARK_AFTER_SECONDS * 1e9:
                with open(tmp, "w") as out:
                    json.dump({"file": list(identity[1:]),
                               "feat_sha256": segment.manifest["feat_sha256"],
                               "checked": time.time()}, out)
                os.replace(tmp, self._mark_path(segment.name))
        except OSError:
            pass

    def _unmark(self, name: str) -> None:
        with contextlib.suppress(OSError):
            os.remove(self._mark_path(name))

    def _unchanged(self, seg: int, now: float) -> bool:
        """Whether the segment's feature file is the one checked before: one stat, at most
        once per `RESTAT_SECONDS` between full refreshes (so repeated lookups cost no stat per
        segment; what `read` serves is stat-checked on every read anyway)."""
        segment = self._segments[seg]
        if segment.verified_as is None:
            return False
        if now - segment.seen_unchanged < RESTAT_SECONDS:
            return True
        try:
            st = os.stat(segment.verified_as[0])
        except OSError:
            return False
        if segment.verified_as != _file_identity(segment.verified_as[0], st):
            return False
        segment.seen_unchanged = now
        return True

    def _usable(self, segments: np.ndarray, rehash_marked: bool = False) -> bool:
        """Verify these segments (`rehash_marked`: hash those only a mark vouched for);
        quarantine failures. False if any failed (index rebuilt)."""
        ok, now = True, time.monotonic()
        touched = np.zeros(len(self._segments), bool)  # O(lookups + segments), no sort
        touched[segments[segments >= 0]] = True
        for seg in np.flatnonzero(touched):
            if self._unchanged(int(seg), now) and (
                    not rehash_marked or _VERIFIED.get(self._segments[seg].verified_as)):
                continue
            try:
                self._features(int(seg), rehash_marked)
            except BadSegment as exc:
                self._quarantine(self._segments[seg].name, str(exc))
                ok = False
            except SegmentGone:
                self._segments, self._seen, self._index = [], set(), _SortedRuns()
                ok = False
                break
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
        self._unmark(name)
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
        return {k.decode() for run in self._index.runs for k in np.unique(run.keys)}

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

    def read(self, digests: Sequence[str], into: np.ndarray | None = None) -> np.ndarray:
        """Verified features for the digests; CacheMiss if any is absent (or was quarantined).

        A miss re-reads the segment list first, so segments committed since this store was
        opened (by another process or another `EmbeddingCache`) are found. `into`: a C-contiguous
        float32 array to fill and return the first rows of, where it has rows enough and the
        features' width (reading block after block into one array allocates no new memory).
        """
        for _ in range(3):  # a segment found bad while reading: look the digests up again
            segment, row = self._locate_verified(digests)
            if (segment < 0).any():
                segment, row = self.refresh()._locate_verified(digests)
            if (segment < 0).any():
                missing = [d for d, s in zip(digests, segment, strict=True) if s < 0]
                raise CacheMiss(f"{len(missing)} features are not in the cache {self.folder} "
                                f"(e.g. {missing[0]}): run the embedding again to compute them")
            out = self._gather(segment, row, into)
            if out is not None:
                return out
        raise CacheMiss(f"cache segments in {self.folder} keep changing while being read: "
                        "is another program writing into the cache?")

    def _gather(self, segment: np.ndarray, row: np.ndarray,
                into: np.ndarray | None = None) -> np.ndarray | None:
        """The located rows (in `into` where it fits); None if a segment turned out bad (it is
        quarantined).

        O(n log n) in the rows asked for, whatever the number of segments."""
        out = np.empty((len(segment), 0), np.float32)
        order = np.argsort(segment, kind="stable")
        bounds = np.flatnonzero(np.diff(segment[order])) + 1
        for rows in np.split(order, bounds) if len(order) else []:
            seg = int(segment[rows[0]])
            if out.shape[1] == 0:
                width = int(self._segments[seg].manifest["width"])
                fits = (into is not None and into.dtype == np.float32 and into.ndim == 2
                        and into.shape[0] >= len(segment) and into.shape[1] == width
                        and into.flags.c_contiguous and into.flags.writeable)
                out = into[: len(segment)] if fits else np.empty((len(segment), width),
                                                                 np.float32)
            try:
                self._rows_into(seg, row[rows], out, rows)
            except BadSegment as exc:  # changed since it was checked: never serve it
                self._quarantine(self._segments[seg].name, str(exc))
                self.refresh()
                return None
            except SegmentGone:  # merged into another segment meanwhile: index anew
                self._segments, self._seen, self._index = [], set(), _SortedRuns()
                self.refresh()
                return None
        return out

    def _rows_into(self, seg: int, wanted: np.ndarray, out: np.ndarray,
                   at: np.ndarray) -> None:
        """out[at] = rows `wanted` of a segment (checked first). Rows that lie close together
        are read with plain reads — straight into `out` where both are runs, else through a
        window of at most SPAN_BYTES — so no page of them is mapped (which costs more than the
        copy); scattered rows are gathered from a memory map."""
        feat = self._features(seg)
        header, width = int(feat.offset), out.shape[1]
        if feat.shape[1] != width:
            raise MmiaError(f"the cache store {self.folder} holds features of widths {width} and "
                            f"{feat.shape[1]}: it mixes models; move it aside and embed again")
        lo, hi = int(wanted.min()), int(wanted.max()) + 1
        if hi - lo > 2 * len(wanted):
            out[at] = feat[wanted]
            return
        del feat  # unmap now: resident pages stay bounded by what one call reads
        if hi - lo == len(wanted) and (np.diff(wanted) == 1).all() \
                and at[-1] - at[0] + 1 == len(at) and (np.diff(at) == 1).all():
            self._read_span(seg, header + lo * 4 * width, out[at[0]: at[-1] + 1])
            return
        order = np.argsort(wanted, kind="stable")
        wanted, at = wanted[order], at[order]
        step = max(1, SPAN_BYTES // (4 * width))
        window = np.empty((min(step, hi - lo), width), np.float32)
        for first in range(lo, hi, step):
            i, j = np.searchsorted(wanted, [first, first + step])
            if i == j:
                continue
            rows = window[: min(step, hi - first)]
            self._read_span(seg, header + first * 4 * width, rows)
            out[at[i:j]] = rows[wanted[i:j] - first]

    def _read_span(self, seg: int, offset: int, into: np.ndarray) -> None:
        """Fill `into` from the segment's feature file at byte `offset`, from a file that passed
        its checks: where the file found is not the one checked before (touched, replaced),
        it is checked now, else BadSegment / SegmentGone."""
        segment = self._segments[seg]
        path = self._path(segment.name, FEATURES)
        with self._open_data(segment) as f:
            if _file_identity(path, os.fstat(f.fileno())) != segment.verified_as:
                self._features(seg)  # checks the file at the path now, or raises
                if _file_identity(path, os.fstat(f.fileno())) != segment.verified_as:
                    raise BadSegment("feature file changed while being read")
            buffer = memoryview(into).cast("B")  # a view: `into` must be C-contiguous
            f.seek(offset)
            done = 0
            while done < len(buffer):
                got = f.readinto(buffer[done:])
                if not got:
                    raise BadSegment("feature file shorter than its header says")
                done += got

    def small_segments(self, target_bytes: int = SEGMENT_BYTES) -> list[int]:
        """Segments below half `target_bytes` of feature data (what compaction merges)."""
        return [i for i, s in enumerate(self._segments)
                if int(s.manifest["feat_bytes"]) < target_bytes // 2]

    def compact(self, target_bytes: int = SEGMENT_BYTES) -> tuple[int, int]:
        """Merge the small segments into segments of about `target_bytes` each; (segments
        merged, segments written). Call under the cache's commit lock.

        As crash-safe as a commit: each merged segment is committed (manifest last) before the
        segments it replaces are removed (manifest first). A kill in between leaves a digest in
        two segments with the same features, which the index serves once; the next compaction
        removes the copy. A reader that indexed a removed segment looks the digests up again.
        """
        self.refresh()
        # hashed here, whatever marks say: a merged segment gets a new checksum of what it read
        if not self._usable(np.array(self.small_segments(target_bytes), np.int64),
                            rehash_marked=True):
            self.refresh()  # bad ones were quarantined: never merged into a good segment
        small = self.small_segments(target_bytes)
        if len(small) < 2:
            return 0, 0
        batches, current, size = [], [], 0
        for seg in small:
            current.append(seg)
            size += int(self._segments[seg].manifest["feat_bytes"])
            if size >= target_bytes:
                batches.append(current)
                current, size = [], 0
        if len(current) > 1 or (current and batches):
            batches.append(current)
        merged = written = 0
        for batch in batches:
            if len(batch) < 2:
                continue
            names = [self._segments[s].name for s in batch]
            keys = np.concatenate([self._read_head(n)[1] for n in names])
            feats = np.concatenate([np.asarray(self._features(s, rehash_marked=True))
                                    for s in batch])
            _, first = np.unique(keys, return_index=True)
            first.sort()
            self._commit(f"{len(self._segments):08d}-{uuid.uuid4().hex[:8]}", keys[first],
                         feats[first])
            for name in names:
                self._remove(name)
            merged += len(batch)
            written += 1
        self._segments, self._seen, self._index = [], set(), _SortedRuns()
        self.refresh()
        self._prune_marks()
        return merged, written

    def _prune_marks(self) -> None:
        """Remove the marks of segments no longer in the store and temporary mark files left
        by killed runs (an hour old)."""
        folder = os.path.join(self.folder, VERIFIED)
        names = {s.name for s in self._segments}
        with contextlib.suppress(OSError):
            for entry in os.scandir(folder):
                stale = entry.name.endswith(".json") and entry.name[:-5] not in names
                if stale or (entry.name.startswith(".tmp-")
                             and time.time() - entry.stat().st_mtime > 3600):
                    with contextlib.suppress(OSError):
                        os.remove(entry.path)

    def _remove(self, name: str) -> None:
        """Delete a segment that a merged one replaces (manifest first: it stops being served)."""
        for suffix in (MANIFEST, KEYS, FEATURES):
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._path(name, suffix))
        self._unmark(name)

    def verify_all(self) -> tuple[int, int]:
        """Check every segment's data now, whatever was checked before; (segments, rows) that
        passed."""
        self.refresh()
        for segment in self._segments:
            segment.verified_as = None
        for identity in [v for v in _VERIFIED if v[0].startswith(self.folder)]:
            del _VERIFIED[identity]
        self.trust_marks = False
        try:
            self._usable(np.arange(len(self._segments)))
        finally:
            self.trust_marks = True
        return len(self._segments), sum(int(s.manifest["rows"]) for s in self._segments)


_OPEN = threading.local()  # per thread (store objects are not thread-safe): by real folder


def _open_stores() -> dict[str, FeatureStore]:
    if not hasattr(_OPEN, "stores"):
        _OPEN.stores = {}
    return _OPEN.stores


def open_store(folder: str) -> FeatureStore:
    """This thread's store object for `folder`, refreshed: segments already indexed by an
    earlier `EmbeddingCache` (another role, another step) are not read again."""
    stores, key = _open_stores(), os.path.realpath(folder)
    store = stores.get(key)
    if store is None or store.folder != folder:
        store = stores[key] = FeatureStore(folder)
    return store.refresh()


class EmbeddingCache:
    """All cached features of one model fingerprint: image views and captions."""

    def __init__(self, root: str, fingerprint: str, augment: AugmentConfig | None = None):
        self.root = root
        self.fingerprint = fingerprint
        self.augment = augment or AugmentConfig()
        self.folder = os.path.join(root, fingerprint)
        self.text = open_store(os.path.join(self.folder, "text"))
        self._views: dict[int, FeatureStore] = {}
        self._pairs: dict[int, FeatureStore] = {}

    def view_folder(self, view: int) -> str:
        if view == 0:
            return os.path.join(self.folder, "image", "view-000")
        aug = f"aug-{self.augment.digest()}"
        return os.path.join(self.folder, "image", aug, f"view-{view:03d}")

    def pairs_folder(self, views: int) -> str:
        return os.path.join(os.path.dirname(self.view_folder(1)), f"pairs-K{views:03d}")

    def image(self, view: int) -> FeatureStore:
        if view not in self._views:
            self._views[view] = open_store(self.view_folder(view))
        return self._views[view]

    def pairs(self, views: int) -> FeatureStore:
        """The store of the K = `views` augmented-view cosines of each pair (by `pair_digest`)."""
        if views not in self._pairs:
            self._pairs[views] = open_store(self.pairs_folder(views))
        return self._pairs[views]

    def _stores(self) -> list[FeatureStore]:
        return [self.text, *self._views.values(), *self._pairs.values()]

    def refresh(self) -> None:
        for store in self._stores():
            store.refresh()

    def refresh_if_changed(self) -> None:
        """Refresh the stores whose folders changed (a stat each): for per-chunk use."""
        for store in self._stores():
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
        dirs[:] = sorted(d for d in dirs if d not in (QUARANTINE, VERIFIED, "samples", "models"))
        if quarantine or any(f.endswith((MANIFEST, KEYS, FEATURES)) or ".tmp-" in f for f in files):
            yield folder


@dataclass
class StoreInfo:
    folder: str
    segments: int
    rows: int
    feature_bytes: int
    small_segments: int


def _manifests(folder: str) -> list[dict]:
    """The manifests of a store's committed segments (small JSON files: no data is read)."""
    out = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(MANIFEST):
            try:
                with open(os.path.join(folder, name)) as f:
                    out.append(_checked_manifest(json.load(f)))
            except (OSError, BadSegment, *CORRUPT):
                continue  # `mmia cache verify` says what is wrong with it
    return out


def cache_info(root: str) -> list[StoreInfo]:
    """Every store under `root`: segments, rows, bytes, small segments (manifests only)."""
    if not os.path.isdir(root):
        raise MmiaError(f"cache folder {root!r} does not exist: pass the --cache of an embed run")
    out = []
    for folder in _store_folders(root):
        manifests = _manifests(folder)
        sizes = [int(m["feat_bytes"]) for m in manifests]
        out.append(StoreInfo(os.path.relpath(folder, root), len(manifests),
                             sum(int(m["rows"]) for m in manifests), sum(sizes),
                             sum(1 for s in sizes if s < SEGMENT_BYTES // 2)))
    return out


def compact_cache(root: str, target_bytes: int = SEGMENT_BYTES) -> tuple[int, int]:
    """Compact every store under `root` that has small segments, under its cache's commit lock;
    (segments merged, segments written)."""
    merged = written = 0
    for info in cache_info(root):
        if info.small_segments < 2:
            continue
        folder = os.path.join(root, info.folder)
        with commit_lock(os.path.join(root, info.folder.split(os.sep)[0])):
            m, w = FeatureStore(folder).compact(target_bytes)
        merged, written = merged + m, written + w
    return merged, written


def quarantined_since(folder: str, since: float) -> list[str]:
    """"store/segment: reason" of every segment under `folder` quarantined at or after the time
    `since` (by any process: the quarantine folders are the record)."""
    found = []
    for store in _store_folders(folder):
        target = os.path.join(store, QUARANTINE)
        if not os.path.isdir(target):
            continue
        for name in sorted(os.listdir(target)):
            path = os.path.join(target, name)
            if name.endswith(".reason.txt") and os.stat(path).st_mtime >= since:
                with contextlib.suppress(OSError), open(path) as f:
                    reason = f.read().strip()
                    found.append(f"{os.path.relpath(store, folder)}/"
                                 f"{name[: -len('.reason.txt')]}: {reason}")
    return found


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
