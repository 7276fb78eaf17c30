"""What each shard holds, kept with the cache, so that a warm run reads no tar and decodes no image.

For every shard read through, the cache keeps `ROOT/samples/<name>.parquet`: one row per item
the reader gave, in shard order — a sample (key, content digests, caption, source URL, the blind
baseline's image statistics) or a skip / warning (reason, detail) — and, in the file's metadata,
the shard's identity: a local file by real path, size and modification time; an http(s) URL by
the ETag and Last-Modified (and Content-Length) its server reports to a HEAD request (a server
reporting neither ETag nor Last-Modified: never indexed, since a tar keeps its length when a
caption changes); other schemes (`pipe:`, gs …) are never indexed and are re-read on every run.
An index whose identity no longer matches is ignored and rewritten by the next read. Shards whose
read failed in a way that may be transient (one that could not be opened, stalled or broke off,
local or remote) are not indexed, nor is any shard whose read ran out of memory.

`SampleTable` is the columnar form of a run's samples (numpy columns, no object per sample).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import urllib.request
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mmia.cache import pair_digest, pair_digests
from mmia.decode import decoder_version
from mmia.shards import Skip, is_remote, local_path

FOLDER = "samples"
FORMAT = 2
N_STATS = 10  # the blind baseline's image statistics (mmia.attacks.blind.N_IMAGE_STATS)
SAMPLE, SKIP, WARNING = 0, 1, 2  # the `kind` of a row
HEAD_TIMEOUT = 10.0
log = logging.getLogger(__name__)

SCHEMA = pa.schema([
    ("kind", pa.int8()),
    ("key", pa.string()),
    ("reason", pa.string()),
    ("detail", pa.string()),
    ("image_digest", pa.string()),
    ("caption_digest", pa.string()),
    ("pair_digest", pa.string()),  # mmia.cache.pair_digest: AEA's cosines are kept under it
    ("caption", pa.string()),
    ("source_url", pa.string()),
    ("stats", pa.list_(pa.float32(), N_STATS)),
])
# never indexed: a retry may read them whole (a stall, a 404, an I/O error part-way)
TRANSIENT = ("unreadable_shard", "truncated_shard")


@dataclass
class SampleRecord:
    """One sample as the attacks find it: key, content digests, caption and where it came from."""

    key: str
    image_digest: str
    caption_digest: str
    caption: str
    url: str
    source_url: str | None = None  # the image's web address (the json sidecar's "url")
    stats: np.ndarray | None = None  # (N_STATS,) image statistics for the blind baseline


# ---------------------------------------------------------------------- shard identity


def shard_identity(url: str) -> dict | None:
    """What tells this version of a shard apart; None where it cannot be told cheaply."""
    if not is_remote(url):
        try:
            path = os.path.realpath(local_path(url))
            st = os.stat(path)
        except (OSError, ValueError):
            return None
        return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if url.startswith(("http://", "https://")):
        return _http_identity(url)
    return None


def _http_identity(url: str) -> dict | None:
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=HEAD_TIMEOUT) as response:
            etag = response.headers.get("ETag")
            modified = response.headers.get("Last-Modified")
            length = response.headers.get("Content-Length")
    except Exception:  # noqa: BLE001 - no identity: the shard is simply re-read
        return None
    if not etag and not modified:  # a length alone: tars keep theirs when a caption changes
        return None
    return {"url": url, "etag": etag, "last_modified": modified, "length": length}


def shard_identities(urls: Sequence[str]) -> list[dict | None]:
    """`shard_identity` of each url; remote ones asked concurrently."""
    if not any(is_remote(u) for u in urls):
        return [shard_identity(u) for u in urls]
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(shard_identity, urls))


# ---------------------------------------------------------------------- one shard's rows


@dataclass
class ShardRows:
    """The rows of one shard's index, collected item by item (cold path only)."""

    url: str
    columns: dict[str, list] = field(default_factory=lambda: {n: [] for n in SCHEMA.names})

    def add_skip(self, skip: Skip) -> None:
        self._add(WARNING if not skip.fatal_to_sample else SKIP, skip.key, skip.reason,
                  skip.detail, None, None, None, None, None, None)

    def add_sample(self, record: SampleRecord) -> None:
        stats = None if record.stats is None else [float(x) for x in record.stats]
        self._add(SAMPLE, record.key, None, None, record.image_digest, record.caption_digest,
                  pair_digest(record.image_digest, record.caption_digest), record.caption,
                  record.source_url, stats)

    def _add(self, *values) -> None:
        for name, value in zip(SCHEMA.names, values, strict=True):
            self.columns[name].append(value)

    def table(self) -> pa.Table:
        return pa.table(self.columns, schema=SCHEMA)

    def indexable(self) -> bool:
        """Whether what was read is what the shard holds (see the module docstring)."""
        return not set(self.columns["reason"]).intersection(TRANSIENT)


# ---------------------------------------------------------------------- the index on disk


class SampleIndex:
    """The per-shard index files of one cache root."""

    def __init__(self, cache_root: str):
        self.folder = os.path.join(cache_root, FOLDER)

    def path(self, url: str) -> str:
        where = url if is_remote(url) else os.path.realpath(local_path(url))
        return os.path.join(self.folder, hashlib.sha256(where.encode()).hexdigest()[:32]
                            + ".parquet")

    def load(self, url: str, identity: dict | None, label: str) -> pa.Table | None:
        """The shard's rows, keys under `label`, if indexed for this identity; else None."""
        if identity is None:
            return None
        try:
            file = pq.ParquetFile(self.path(url), page_checksum_verification=True)
            meta = json.loads(file.schema_arrow.metadata[b"mmia"])
            if (meta.get("format") != FORMAT or meta.get("identity") != identity
                    or meta.get("decoder") != decoder_version()):
                return None
            table = file.read()
        except FileNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001 - a damaged index is only a cold read
            log.debug("sample index of %s unreadable (%s): reading the shard", url, exc)
            return None
        if not table.schema.equals(SCHEMA):
            return None
        old = meta.get("label")
        return table if old == label else relabel(table, old, label)

    def write(self, url: str, identity: dict | None, label: str,
              rows: ShardRows | pa.Table) -> None:
        """Store a shard's rows (atomically; a failure only costs a cold read next time)."""
        if identity is None or (isinstance(rows, ShardRows) and not rows.indexable()):
            return
        table = rows.table() if isinstance(rows, ShardRows) else rows.cast(SCHEMA)
        meta = {"format": FORMAT, "identity": identity, "label": label, "url": url,
                "decoder": decoder_version()}
        table = table.replace_schema_metadata({"mmia": json.dumps(meta)})
        path = self.path(url)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            os.makedirs(self.folder, exist_ok=True)
            pq.write_table(table, tmp, write_page_checksum=True)
            os.replace(tmp, path)
        except OSError as exc:
            log.debug("cannot write the sample index of %s (%s)", url, exc)
            try:
                os.remove(tmp)
            except OSError:
                pass


def relabel(table: pa.Table, old: str | None, new: str) -> pa.Table:
    """Keys written under shard label `old` ("old/key") as keys under `new`."""
    keys = table.column("key")
    prefix = f"{old}/" if old else ""
    rest = pc.utf8_slice_codeunits(keys, len(prefix)) if prefix else keys
    relabelled = pc.binary_join_element_wise(f"{new}/", rest, "")
    fixed = pc.if_else(pc.and_(pc.starts_with(keys, prefix), pc.not_equal(keys, "")),
                       relabelled, keys)
    return table.set_column(table.schema.get_field_index("key"), "key", fixed)


# ---------------------------------------------------------------------- columnar samples


class SampleTable:
    """A run's samples as columns: row i of every column is sample i.

    key, caption: object arrays of str; image_digest, caption_digest: "S32" arrays; shard: int32
    index into `urls`; source_url: object array (None where unknown); stats: (n, N_STATS)
    float32. Iterating gives `SampleRecord`s (for small sets and tests).
    """

    def __init__(self, key, image_digest, caption_digest, caption, shard, urls, source_url,
                 stats, pair_digest=None):
        self.key = np.asarray(key, dtype=object)
        self.image_digest = np.asarray(image_digest, dtype="S32")
        self.caption_digest = np.asarray(caption_digest, dtype="S32")
        self.pair_digest = (pair_digests(self.image_digest, self.caption_digest)
                            if pair_digest is None else np.asarray(pair_digest, dtype="S32"))
        self.caption = np.asarray(caption, dtype=object)
        self.shard = np.asarray(shard, dtype=np.int32)
        self.urls = list(urls)
        self.source_url = np.asarray(source_url, dtype=object)
        self.stats = np.asarray(stats, dtype=np.float32).reshape(len(self.key), N_STATS)

    @classmethod
    def empty(cls) -> SampleTable:
        return cls([], [], [], [], [], [], [], np.zeros((0, N_STATS), np.float32))

    @classmethod
    def from_records(cls, records: Iterable[SampleRecord]) -> SampleTable:
        records = list(records)
        urls = list(dict.fromkeys(r.url for r in records))
        where = {u: i for i, u in enumerate(urls)}
        stats = [np.full(N_STATS, np.nan, np.float32) if r.stats is None else r.stats
                 for r in records]
        return cls([r.key for r in records], [r.image_digest for r in records],
                   [r.caption_digest for r in records], [r.caption for r in records],
                   [where[r.url] for r in records], urls, [r.source_url for r in records],
                   np.array(stats, np.float32).reshape(len(records), N_STATS))

    @classmethod
    def from_shards(cls, tables: Sequence[tuple[str, pa.Table]]) -> SampleTable:
        """The sample rows of each (url, index table), in the order given (one concatenation,
        however many shards)."""
        tables = [(url, t) for url, t in tables if t.num_rows]
        if not tables:
            return cls.empty()
        urls = [url for url, _ in tables]
        shard = pa.array(np.repeat(np.arange(len(tables), dtype=np.int32),
                                   [t.num_rows for _, t in tables]))
        table = pa.concat_tables([t.replace_schema_metadata(None) for _, t in tables])
        is_sample = pc.equal(table.column("kind"), SAMPLE)
        table = table.append_column("shard", shard).filter(is_sample)
        stats = table.column("stats").combine_chunks()
        values = np.full((table.num_rows, N_STATS), np.nan, np.float32)
        present = ~stats.is_null().to_numpy(zero_copy_only=False)
        values[present] = stats.flatten().to_numpy(zero_copy_only=False).reshape(-1, N_STATS)
        return cls(table.column("key").to_numpy(), _digests(table.column("image_digest")),
                   _digests(table.column("caption_digest")),
                   table.column("caption").to_numpy(), table.column("shard").to_numpy(), urls,
                   table.column("source_url").to_numpy(), values,
                   _digests(table.column("pair_digest")))

    def __len__(self) -> int:
        return len(self.key)

    def __getitem__(self, i: int) -> SampleRecord:
        stats = self.stats[i]
        return SampleRecord(self.key[i], self.image_digest[i].decode(),
                            self.caption_digest[i].decode(), self.caption[i],
                            self.urls[self.shard[i]], self.source_url[i],
                            None if np.isnan(stats).all() else stats)

    def __iter__(self) -> Iterator[SampleRecord]:
        return (self[i] for i in range(len(self)))

    def url(self) -> np.ndarray:
        """The shard url of each sample (object array)."""
        return np.asarray(self.urls, dtype=object)[self.shard] if self.urls else \
            np.empty(0, object)

    def take(self, rows: np.ndarray) -> SampleTable:
        """The samples at `rows` (indices or a boolean mask), in that order."""
        rows = np.asarray(rows)
        return SampleTable(self.key[rows], self.image_digest[rows], self.caption_digest[rows],
                           self.caption[rows], self.shard[rows], self.urls,
                           self.source_url[rows], self.stats[rows], self.pair_digest[rows])

    @classmethod
    def concat(cls, tables: Sequence[SampleTable]) -> SampleTable:
        if not tables:
            return cls.empty()
        urls = [u for t in tables for u in t.urls]
        offsets = np.cumsum([0] + [len(t.urls) for t in tables[:-1]])
        return cls(np.concatenate([t.key for t in tables] or [np.empty(0, object)]),
                   np.concatenate([t.image_digest for t in tables] or [np.empty(0, "S32")]),
                   np.concatenate([t.caption_digest for t in tables] or [np.empty(0, "S32")]),
                   np.concatenate([t.caption for t in tables] or [np.empty(0, object)]),
                   np.concatenate([t.shard + o for t, o in zip(tables, offsets, strict=True)]
                                  or [np.empty(0, np.int32)]),
                   urls,
                   np.concatenate([t.source_url for t in tables] or [np.empty(0, object)]),
                   np.concatenate([t.stats for t in tables] or
                                  [np.zeros((0, N_STATS), np.float32)]),
                   np.concatenate([t.pair_digest for t in tables] or [np.empty(0, "S32")]))


def _digests(column: pa.ChunkedArray) -> np.ndarray:
    return column.cast(pa.binary()).to_numpy(zero_copy_only=False).astype("S32")


def skip_rows(tables: Sequence[tuple[str, pa.Table]]) -> Iterator[Skip]:
    """The skips and warnings of shards' index tables, as `Skip`s, in order (few: a loop over
    them is fine; the tables are filtered once)."""
    tables = [(url, t) for url, t in tables if t.num_rows]
    if not tables:
        return
    urls = [url for url, _ in tables]
    shard = pa.array(np.repeat(np.arange(len(tables), dtype=np.int32),
                               [t.num_rows for _, t in tables]))
    table = pa.concat_tables([t.replace_schema_metadata(None).select(
        ["kind", "key", "reason", "detail"]) for _, t in tables]).append_column("shard", shard)
    rows = table.filter(pc.not_equal(table.column("kind"), SAMPLE))
    for kind, key, reason, detail, s in zip(*(rows.column(n).to_pylist() for n in
                                              ("kind", "key", "reason", "detail", "shard")),
                                            strict=True):
        yield Skip(reason, key=key or "", url=urls[s], detail=detail or "",
                   fatal_to_sample=kind == SKIP)


class ImageLoader:
    """Re-reads the image bytes of a few samples of a table from their shards (for the report's
    thumbnails of the top-scoring samples): local shards only, each read up to its last wanted
    sample; remote shards give None (re-downloading a shard for a thumbnail is not worth it)."""

    def __init__(self, table: SampleTable):
        self.table = table

    def __call__(self, rows: Sequence[int]) -> list[bytes | None]:
        from mmia.shards import IMAGE_EXTS, group_members, tar_members

        out: dict[int, bytes | None] = {int(r): None for r in rows}
        by_shard: dict[int, list[int]] = {}
        for row in out:
            by_shard.setdefault(int(self.table.shard[row]), []).append(row)
        for shard, wanted in by_shard.items():
            url = self.table.urls[shard]
            if is_remote(url):
                continue
            keys = {self.table.key[row]: row for row in wanted}
            try:
                for group in group_members(tar_members([url])):
                    if isinstance(group, Skip):
                        continue
                    row = next((keys.pop(k) for k in list(keys) if k.endswith("/" + group.key)),
                               None)
                    if row is not None:
                        out[row] = next((group.parts[e] for e in IMAGE_EXTS if e in group.parts),
                                        None)
                    if not keys:
                        break
            except Exception as exc:  # noqa: BLE001 - a thumbnail is never worth an error
                log.debug("cannot re-read %s for thumbnails (%s)", url, exc)
        return [out[int(r)] for r in rows]
