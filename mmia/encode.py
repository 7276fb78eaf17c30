"""The embedding engine: the shards the cache cannot answer from → model → cache.

`mmia.embed.embed_shards` answers what it can from the sample index and the cache, and hands the
remaining shards to `encode_shards` here (the only module of the data path that needs torch).
DataLoader workers read those shards, hash contents, decode only the images whose features the
cache lacks (or whose decode status and statistics are not indexed yet), and write each shard's
sample index when they finish it; the main process batches model inputs, runs the encoders and
commits cache segments.

Bounded resources, whatever the input or the settings:
- A worker hands over one `PreparedChunk` per few samples: its entries plus ONE tensor holding
  every missing view of its samples, so a chunk crosses the process boundary with a constant
  number of shared-memory file descriptors (one tensor per view ran out of descriptors, EMFILE,
  at `--views 40` under `ulimit -n 1024`). A chunk also closes at `CHUNK_ROWS` view rows.
  Workers count the chunks they hand over, so one that never arrives (a worker that could not
  send it only prints an error, and the DataLoader moves on) is an MmiaError, not lost samples.
- Images are refused before their pixels are decoded when they hold more than
  `MAX_IMAGE_PIXELS` pixels, or when one side is more than `MAX_ASPECT_RATIO` times the other
  (the model's shortest-side resize would blow a 1 × 1,000,000 strip up to gigabytes).
  Augmented views are made from the image shrunk to the model's input size.
- Every forward pass runs exactly `Encoder.batch_size` rows, padding a short batch with zeros,
  so a sample's features never depend on which other samples share its batch: an interrupted
  and resumed run writes the same bytes as an uninterrupted one. That padded size must not
  depend on the data (a resumed run sees less of it), so it is capped by a constant instead:
  `min(--batch-size, MAX_FORWARD_ROWS)`. A larger --batch-size gives the same features as
  `MAX_FORWARD_ROWS`, and a run never allocates more than that many padded rows, however few
  samples it has. Before anything is read, the padded image input of one forward pass (with
  room for the copies the batching makes) is compared with the memory available on the device
  (/proc/meminfo MemAvailable, or the GPU's free memory); a size that cannot fit is refused with
  the largest one that would, before any forward pass. Activations are not estimated: the check
  is a floor that catches the impossible sizes, not a guarantee.
- Image inputs of all views share one queue, so the inputs held in memory are at most one
  batch, not one batch per view. Features of augmented views are held only until their pair's
  cosines are committed (unless `keep_view_features`).

Concurrent runs on one cache: before a batch is encoded, the stores are refreshed and inputs
that another process committed meanwhile are not encoded again. A sample's features are
committed together, once all its inputs are encoded, under an exclusive lock on the cache
folder (re-checking the cache inside it), so each entry is committed by exactly one process.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmia.cache import (
    COMPACT_AFTER,
    BadSegment,
    EmbeddingCache,
    FeatureStore,
    SegmentGone,
    commit_lock,
    pair_digest,
)
from mmia.decode import ExtremeAspectRatioError, decode_image
from mmia.errors import MmiaError
from mmia.sample_index import SKIP, SampleIndex, SampleRecord, ShardRows, shard_identity
from mmia.shards import Sample, Skip, read_shard
from mmia.variants import seeded
from mmia.views import AugmentConfig, make_views

MAX_FORWARD_ROWS = 1024  # the most rows one forward pass is padded to
INPUT_COPIES = 4  # stacked, padded, moved and cast: copies of a batch's inputs held at once
CHUNK = 16  # samples per worker chunk
CHUNK_ROWS = 256  # a chunk closes once its samples have this many missing views
DECODE_SKIPS = ("decompression_bomb", "extreme_aspect_ratio", "undecodable_image")
log = logging.getLogger(__name__)


def decoded_stats(image: Image.Image, data: bytes) -> np.ndarray:
    """The blind baseline's statistics of a decoded image (computed once, while decoding)."""
    from mmia.attacks.blind import image_stats_of

    return image_stats_of(image, len(data), *image.size)


# ------------------------------------------------------------------------------ worker side


@dataclass
class SampleEntry:
    """A sample of a chunk: its record, the views to encode, whether its caption and its pair's
    cosines are missing."""

    record: SampleRecord
    views: list[int]
    need_text: bool
    need_pair: bool = False


@dataclass
class PreparedChunk:
    """A few samples and skips, with every missing view of them in ONE tensor.

    `rows[i] = (entry index, view)` names row i of `inputs` (None when no view is missing).
    """

    entries: list[SampleEntry | Skip]
    inputs: torch.Tensor | None
    rows: list[tuple[int, int]]


class ChunkBuilder:
    """Collects prepared entries and their view tensors; `build` stacks them once."""

    def __init__(self) -> None:
        self.entries: list[SampleEntry | Skip] = []
        self.tensors: list[torch.Tensor] = []
        self.rows: list[tuple[int, int]] = []

    def add(self, entry: SampleEntry | Skip, inputs: torch.Tensor | None) -> None:
        if inputs is not None:
            self.tensors.append(inputs)
            self.rows += [(len(self.entries), v) for v in entry.views]
        self.entries.append(entry)

    def full(self) -> bool:
        return len(self.entries) >= CHUNK or len(self.rows) >= CHUNK_ROWS

    def build(self) -> PreparedChunk:
        inputs = torch.cat(self.tensors) if self.tensors else None
        return PreparedChunk(self.entries, inputs, self.rows)


@dataclass
class StreamPlan:
    """What the workers read: shards (this rank's, in order), their labels and identities, and
    which of them have an index already (their decode status need not be found again)."""

    urls: list[str]
    labels: dict[str, str]
    identities: dict[str, dict | None]
    indexed: set[str]


def known_samples(table) -> dict[str, np.ndarray | Skip]:
    """From a shard's index: key → image statistics (a sample) or its decode Skip."""
    known: dict[str, np.ndarray | Skip] = {}
    if table is None:
        return known
    columns = table.to_pydict()
    for kind, key, reason, detail, stats in zip(
            *(columns[n] for n in ("kind", "key", "reason", "detail", "stats")), strict=True):
        if kind == SKIP and reason in DECODE_SKIPS:
            known[key] = Skip(reason, key, "", detail or "")
        elif reason is None and stats is not None:
            known[key] = np.asarray(stats, np.float32)
    return known


class PreparedStream(IterableDataset):
    """Worker-side stage: reader → digests → cache check → decode and views for what is missing,
    and each shard's sample index once the shard is read through.

    `produced[w]` counts the chunks worker w handed to the DataLoader (shared memory), so the
    main process can tell when one never arrived: a worker that fails to send a chunk (out of
    file descriptors, say) only prints an error, and the DataLoader then skips that chunk.
    """

    def __init__(self, plan: StreamPlan, cache: EmbeddingCache, views: int, preprocess,
                 keep_view_features: bool = False, produced=None):
        self.plan, self.produced = plan, produced
        self.cache_root, self.fingerprint, self.augment = cache.root, cache.fingerprint, \
            cache.augment
        self.views, self.preprocess, self.keep = views, preprocess, keep_view_features

    def __iter__(self) -> Iterator[PreparedChunk]:
        cache = EmbeddingCache(self.cache_root, self.fingerprint, self.augment)
        index = SampleIndex(self.cache_root)
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        chunk = ChunkBuilder()
        for url in self.plan.urls[wid::nworkers]:
            identity, label = self.plan.identities.get(url), self.plan.labels.get(url, url)
            indexed = url in self.plan.indexed
            known = known_samples(index.load(url, identity, label)) if indexed else {}
            rows = ShardRows(url)
            for items in _batched(read_shard(url, self.plan.labels), CHUNK):
                status = self.cache_status(cache, [i for i in items if isinstance(i, Sample)])
                for item in items:
                    entry, inputs = self.prepare(item, known, status)
                    if isinstance(entry, Skip):
                        rows.add_skip(entry)
                    else:
                        rows.add_sample(entry.record)
                    chunk.add(entry, inputs)
                    if chunk.full():
                        yield self._counted(chunk.build())
                        chunk = ChunkBuilder()
                        cache.refresh_if_changed()  # what was committed meanwhile (by anyone)
            if not indexed and identity is not None and shard_identity(url) == identity:
                index.write(url, identity, label, rows)  # unchanged while it was read
        if chunk.entries:
            yield self._counted(chunk.build())

    def _counted(self, chunk: PreparedChunk) -> PreparedChunk:
        if self.produced is not None:
            info = get_worker_info()
            self.produced[info.id if info is not None else 0] += 1
        return chunk

    def cache_status(self, cache: EmbeddingCache,
                     samples: list[Sample]) -> dict[int, tuple[list[int], bool, bool]]:
        """For each sample (by id): the views whose features must be encoded, whether its
        pair's cosines and its caption's features are missing. One vectorised lookup per store
        for the whole batch."""
        if not samples:
            return {}
        images = [s.image_digest for s in samples]
        captions = [s.caption_digest for s in samples]
        view0 = cache.image(0).contains(images)
        text = cache.text.contains(captions)
        pairs = np.ones(len(samples), bool)
        kept = np.ones((len(samples), self.views), bool)
        if self.views:
            pairs = cache.pairs(self.views).contains(
                [pair_digest(i, c) for i, c in zip(images, captions, strict=True)])
            if self.keep:
                for view in range(1, self.views + 1):
                    kept[:, view - 1] = cache.image(view).contains(images)
            else:
                kept[:] = False
        status = {}
        for i, sample in enumerate(samples):
            need_pair = not pairs[i]
            missing = [] if view0[i] else [0]
            missing += [v for v in range(1, self.views + 1)
                        if (need_pair or self.keep) and not kept[i, v - 1]]
            status[id(sample)] = (missing, need_pair, not text[i])
        return status

    def prepare(self, item: Sample | Skip, known: dict,
                status: dict) -> tuple[SampleEntry | Skip, torch.Tensor | None]:
        """The entry of one reader item and its missing views' inputs (one tensor, or None);
        `status`: `cache_status` of its batch."""
        if isinstance(item, Skip):
            return item, None
        image_digest, caption_digest = item.image_digest, item.caption_digest
        source = item.meta.get("url") if isinstance(item.meta.get("url"), str) else None
        record = SampleRecord(item.key, image_digest, caption_digest, item.caption, item.url,
                              source)
        missing, need_pair, need_text = status[id(item)]
        prior = known.get(item.key)
        if isinstance(prior, Skip):
            return Skip(prior.reason, item.key, item.url, prior.detail), None
        if prior is not None and not missing:  # decoded before, nothing to encode: no decode
            record.stats = prior
            return SampleEntry(record, [], need_text, need_pair), None
        try:  # a bad image is a bad sample even when its digest is cached
            image = decode_image(item.image_bytes)
            record.stats = decoded_stats(image, item.image_bytes)
            inputs = make_views(image, image_digest, missing, self.preprocess, self.augment)
        except Image.DecompressionBombError as exc:
            return Skip("decompression_bomb", item.key, item.url, str(exc)), None
        except ExtremeAspectRatioError as exc:
            return Skip("extreme_aspect_ratio", item.key, item.url, str(exc)), None
        except MemoryError:  # not the image's fault: never recorded as undecodable
            raise
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad bytes
            return Skip("undecodable_image", item.key, item.url, str(exc)[:200]), None
        return SampleEntry(record, missing, need_text, need_pair), inputs


# ------------------------------------------------------------------------------ main side


class Encoder:
    """Runs fixed-size padded batches through the model (batch-composition invariant, but for
    a stochastic MC-dropout pass, which is seeded by its batch: see mmia.variants).

    Every forward pass has exactly `batch_size` = min(asked, MAX_FORWARD_ROWS) rows.
    """

    def __init__(self, loaded, batch_size: int):
        self.loaded, self.batch_size = loaded, min(batch_size, MAX_FORWARD_ROWS)
        self.forward_passes = 0

    @torch.no_grad()
    def images(self, tensors: Sequence[torch.Tensor]) -> np.ndarray:
        return self._run(torch.stack(list(tensors)), self.loaded.model.encode_image)

    @torch.no_grad()
    def texts(self, captions: list[str]) -> np.ndarray:
        return self._run(self.loaded.tokenizer(captions), self.loaded.model.encode_text)

    def _run(self, inputs: torch.Tensor, encode) -> np.ndarray:
        parts = [self._padded(inputs[i: i + self.batch_size], encode)
                 for i in range(0, len(inputs), self.batch_size)]
        return np.concatenate(parts) if parts else np.empty((0, 0), np.float32)

    def _padded(self, batch: torch.Tensor, encode) -> np.ndarray:
        n = len(batch)
        if n < self.batch_size:
            pad = torch.zeros((self.batch_size - n, *batch.shape[1:]), dtype=batch.dtype)
            batch = torch.cat([batch, pad])
        seed = self.loaded.forward_seed  # a stochastic (MC-dropout) pass: seeded by its batch
        batch = batch.to(self.loaded.device)
        if batch.is_floating_point():  # images; token ids stay integer
            batch = batch.to(self.loaded.input_dtype)
        self.forward_passes += 1
        with seeded(batch, seed, self.loaded.device), self.loaded.autocast():
            out = encode(batch, normalize=True)  # `amp`: fp32 weights, mixed-precision compute
        return out[:n].float().cpu().numpy()


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device` (None where it cannot be told)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_batch_fits(loaded, batch_size: int) -> None:
    """Refuse a batch size whose padded image inputs alone cannot fit in the memory available
    (one line, naming the largest size that fits), before any shard is read."""
    rows = min(batch_size, MAX_FORWARD_ROWS)
    probe = loaded.preprocess(Image.new("RGB", (8, 8)))
    itemsize = torch.empty((), dtype=loaded.input_dtype).element_size()
    row_bytes = INPUT_COPIES * probe.numel() * max(itemsize, probe.element_size())
    free = available_memory(loaded.device)
    if free is None or rows * row_bytes <= free:
        return
    largest = free // row_bytes
    fix = (f"use --batch-size {largest} or less" if largest >= 1
           else "free some memory or use a smaller model")
    raise MmiaError(
        f"--batch-size {batch_size} needs about {_size(rows * row_bytes)} for the image inputs "
        f"of one forward pass, but only {_size(free)} is available on {loaded.device}: {fix}")


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


Input = tuple[int | str, str]  # (store: a view number or "text", content digest)


@dataclass
class PendingSample:
    """A sample with inputs in flight: how many are not encoded yet, and what it uses."""

    record: SampleRecord
    need_pair: bool
    uses: list[Input]
    outstanding: int = 0


def compact_if_many(store: FeatureStore) -> None:
    """Merge a store's small segments once it has `COMPACT_AFTER` of them (under the commit
    lock, which the caller holds): the file count follows bytes, not commits, and listing a
    store stays cheap. Best effort: a failure (a full disk, say) costs files, not the run."""
    if len(store.small_segments()) < COMPACT_AFTER:
        return
    try:
        store.compact()
    except (OSError, BadSegment, SegmentGone) as exc:
        log.warning("cache: could not merge the small segments of %s (%s); they stay as they "
                    "are", store.folder, exc)


class PendingWrites:
    """Model inputs queued by modality, encoded in full padded batches, committed per sample.

    An input several in-flight samples need is encoded once. A sample's features (and its
    pair's view cosines) are committed together once all its inputs are encoded, so one process
    commits them all or none. `claimed` / `unclaimed` count the samples resolved so far:
    committed by this process / found cached meanwhile.
    """

    def __init__(self, encoder: Encoder, cache: EmbeddingCache, flush_every: int, views: int,
                 keep_view_features: bool = False):
        self.encoder, self.cache, self.flush_every = encoder, cache, flush_every
        self.views, self.keep = views, keep_view_features
        self.queues: dict[str, list[tuple[Input, object]]] = {"image": [], "text": []}
        self.waiting: dict[Input, list[int]] = {}  # queued, not encoded yet: who waits
        self.values: dict[Input, np.ndarray | None] = {}  # encoded (None: committed meanwhile)
        self.refs: Counter = Counter()  # pending samples using each input
        self.samples: dict[int, PendingSample] = {}
        self.complete: list[int] = []
        self.ready_rows = 0
        self.claimed = self.unclaimed = 0

    @property
    def in_flight(self) -> int:
        return len(self.samples)

    def _stored(self, store: int | str) -> bool:
        """Whether features of this input are kept in the cache (else only their cosines)."""
        return store in (0, "text") or self.keep

    def add_sample(self, sample: int, record: SampleRecord, need_pair: bool,
                   inputs: Sequence[tuple[int | str, str, object]]) -> bool:
        """Queue a sample's inputs (store, digest, value); False if it needs nothing."""
        if not inputs and not need_pair:
            return False
        uses = [(store, digest) for store, digest, _ in inputs]
        if need_pair:  # its cosines need every view and the caption, encoded now or cached
            uses += [(v, record.image_digest) for v in range(1, self.views + 1)
                     if (v, record.image_digest) not in uses]
            if ("text", record.caption_digest) not in uses:
                uses.append(("text", record.caption_digest))
        pending = self.samples[sample] = PendingSample(record, need_pair, uses)
        self.refs.update(uses)
        for store, digest, value in inputs:
            key = (store, digest)
            if key in self.values:
                continue
            pending.outstanding += 1
            if key in self.waiting:
                self.waiting[key].append(sample)
            else:
                self.waiting[key] = [sample]
                self.queues["text" if store == "text" else "image"].append((key, value))
        if pending.outstanding == 0:
            self._sample_done(sample)
        for modality, queue in self.queues.items():
            if len(queue) >= self.encoder.batch_size:
                self._encode(modality)
        if self.ready_rows >= self.flush_every:  # also samples with nothing left to encode
            self._commit()
        return True

    def _store(self, store: int | str):
        return self.cache.text if store == "text" else self.cache.image(store)

    def _committed_meanwhile(self, keys: list[Input]) -> np.ndarray:
        """Which stored inputs' digests are in the cache now (another process committed them)."""
        found = np.zeros(len(keys), bool)
        for store in {s for s, _ in keys if self._stored(s)}:
            idx = [i for i, (s, _) in enumerate(keys) if s == store]
            found[idx] = self._store(store).refresh_if_changed().contains(
                [keys[i][1] for i in idx])
        return found

    def _encode(self, modality: str) -> None:
        items, self.queues[modality] = self.queues[modality], []
        if not items:
            return
        keys = [key for key, _ in items]
        cached = self._committed_meanwhile(keys)
        todo = [i for i in range(len(items)) if not cached[i]]
        values = [items[i][1] for i in todo]
        feats = (self.encoder.texts(values) if modality == "text"
                 else self.encoder.images(values)) if todo else None
        for key in keys:
            self.values[key] = None  # read from the cache when needed
        for row, i in enumerate(todo):
            self.values[keys[i]] = feats[row]
        for key in keys:
            for sample in self.waiting.pop(key):
                pending = self.samples[sample]
                pending.outstanding -= 1
                if pending.outstanding == 0:
                    self._sample_done(sample)
        if self.ready_rows >= self.flush_every:
            self._commit()

    def _sample_done(self, sample: int) -> None:
        """A sample is complete: count the rows its commit will write (stored features and
        its pair's cosines), which decide when to commit."""
        pending = self.samples[sample]
        self.complete.append(sample)
        self.ready_rows += pending.need_pair + sum(
            1 for store, _ in pending.uses if self._stored(store))

    def _value(self, key: Input, cached: dict[Input, np.ndarray]) -> np.ndarray:
        value = self.values.get(key)
        return cached[key] if value is None else value

    def _cached_values(self, done: list[PendingSample]) -> dict[Input, np.ndarray]:
        """Inputs the pairs of `done` need that were not encoded here: read from the cache."""
        wanted: dict[int | str, list[str]] = {}
        for pending in done:
            if pending.need_pair:
                for key in pending.uses:
                    if self.values.get(key) is None:
                        wanted.setdefault(key[0], []).append(key[1])
        out = {}
        for store, digests in wanted.items():
            digests = list(dict.fromkeys(digests))
            for digest, row in zip(digests, self._store(store).read(digests), strict=True):
                out[(store, digest)] = row
        return out

    def _commit(self) -> None:
        """Commit what every complete sample adds: its features and its pair's view cosines."""
        done = [self.samples.pop(s) for s in self.complete]
        self.complete, self.ready_rows = [], 0
        rows: dict[int | str, dict[str, np.ndarray]] = {}
        for pending in done:
            for store, digest in pending.uses:
                value = self.values.get((store, digest))
                if value is not None and self._stored(store):
                    rows.setdefault(store, {})[digest] = value
        cached = self._cached_values(done)
        pairs: dict[str, np.ndarray] = {}
        for pending in done:
            if pending.need_pair:
                r = pending.record
                views = np.stack([self._value((v, r.image_digest), cached)
                                  for v in range(1, self.views + 1)])
                text = self._value(("text", r.caption_digest), cached)
                norms = np.linalg.norm(views, axis=1) * np.linalg.norm(text)  # fp16/bf16: ≠ 1
                pairs[pair_digest(r.image_digest, r.caption_digest)] = \
                    (views @ text) / np.maximum(norms, 1e-12)
        written: set[Input] = set()
        if rows or pairs:
            with commit_lock(self.cache.folder):
                for store, by_digest in rows.items():
                    new = self._store(store).write_new(list(by_digest),
                                                       np.stack(list(by_digest.values())))
                    written |= {(store, d) for d in new}
                    compact_if_many(self._store(store))
                if pairs:
                    new = self.cache.pairs(self.views).write_new(list(pairs),
                                                                 np.stack(list(pairs.values())))
                    written |= {("pair", d) for d in new}
                    compact_if_many(self.cache.pairs(self.views))
        for pending in done:
            r = pending.record
            mine = any(key in written for key in pending.uses) or (
                ("pair", pair_digest(r.image_digest, r.caption_digest)) in written)
            self.claimed += mine
            self.unclaimed += not mine
            for key in pending.uses:
                self.refs[key] -= 1
                if self.refs[key] <= 0:
                    del self.refs[key]
                    self.values.pop(key, None)

    def finish(self) -> None:
        for modality in self.queues:
            self._encode(modality)
        self._commit()


@dataclass
class ColdResult:
    """What the engine read and did: each shard's rows (samples and skips, in shard order, as
    its sample index holds them) and counters."""

    rows: dict[str, ShardRows] = field(default_factory=dict)
    embedded: int = 0
    cached: int = 0
    forward_passes: int = 0


def _batched(items: Iterator, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items (the last one shorter)."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def torch_threads(workers: int, threads: int | None) -> int:
    """Torch's intra-op threads: --threads if given, else OMP_NUM_THREADS if set, else this
    process's share of the cores (the machine's over its torchrun ranks, LOCAL_WORLD_SIZE).
    The decoding workers are not subtracted: the encoder dominates (one thread beside a worker
    halved ViT-B-32's end-to-end rate on 2 cores, experiments/bench_embed.py); on a machine busy
    with other work, fewer threads can help (experiments/bench_threads.py --busy 1)."""
    if threads is not None:
        return threads
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    ranks = os.environ.get("LOCAL_WORLD_SIZE", "1")
    return max(1, (os.cpu_count() or 1) // max(1, int(ranks) if ranks.isdigit() else 1))


def encode_shards(loaded, plan: StreamPlan, cache: EmbeddingCache, views: int, batch_size: int,
                  workers: int, flush_every: int | None, keep_view_features: bool,
                  report: Callable[[int, dict], None], counts: Callable[[dict], dict],
                  mp_context: str | None = None, threads: int | None = None) -> ColdResult:
    """Read, decode, encode and commit the shards of `plan`; the entries they gave per shard.

    A sample read twice in this run (the same key in two shards) is encoded at most once;
    duplicate keys are resolved by the caller. `counts(progress)` turns this run's progress
    ({"new", "cached"}) into what `report` shows.
    """
    writable = cache.writable()
    workers = max(0, min(workers, len(plan.urls)))
    before = torch.get_num_threads()
    if loaded.device.type == "cpu":
        torch.set_num_threads(torch_threads(workers, threads))
    try:
        return _encode(loaded, plan, cache, views, batch_size, workers, flush_every,
                       keep_view_features, report, counts, mp_context, writable)
    finally:
        torch.set_num_threads(before)


def _encode(loaded, plan: StreamPlan, cache: EmbeddingCache, views: int, batch_size: int,
            workers: int, flush_every: int | None, keep_view_features: bool, report, counts,
            mp_context: str | None, writable: bool) -> ColdResult:
    produced = multiprocessing.get_context(mp_context).RawArray("q", max(workers, 1))
    stream = PreparedStream(plan, cache, views, loaded.preprocess, keep_view_features, produced)
    loader = DataLoader(stream, batch_size=None, num_workers=workers,
                        persistent_workers=False, collate_fn=_as_is,
                        multiprocessing_context=mp_context if workers else None)
    encoder = Encoder(loaded, batch_size)
    pending = PendingWrites(encoder, cache, flush_every or 8 * encoder.batch_size, views,
                            keep_view_features)
    result = ColdResult({url: ShardRows(url) for url in plan.urls})
    found_cached = sample = received = 0

    def progress() -> dict:
        return counts({"new": pending.claimed + pending.in_flight,
                       "cached": found_cached + pending.unclaimed})

    for chunk in loader:
        received += 1
        for entry, inputs in chunk_samples(chunk):
            url = entry.url if isinstance(entry, Skip) else entry.record.url
            rows = result.rows.setdefault(url, ShardRows(url))
            if isinstance(entry, Skip):
                rows.add_skip(entry)
                continue
            rows.add_sample(entry.record)
            if inputs and not writable:  # before any forward pass, not after the work
                raise MmiaError(
                    f"the cache {cache.root!r} is read-only and {entry.record.key!r} (at least) "
                    "is not in it: pass a writable --cache, or embed these shards into it first")
            sample += 1
            if not pending.add_sample(sample, entry.record, entry.need_pair, inputs):
                found_cached += 1
        report(len(chunk.entries), progress())
    pending.finish()
    report(0, progress())
    check_nothing_lost(received, sum(produced))
    result.embedded, result.cached = pending.claimed, found_cached + pending.unclaimed
    result.forward_passes = encoder.forward_passes
    return result


def check_nothing_lost(received: int, produced: int) -> None:
    """Raise MmiaError when chunks the workers produced never arrived (e.g. a worker ran out
    of file descriptors while sending one): their samples would be missing without a word."""
    lost = produced - received
    if lost:
        raise MmiaError(
            f"{lost} batch(es) of prepared samples never arrived from the DataLoader workers "
            "(see the worker error printed above, e.g. 'Too many open files': raise `ulimit -n` "
            "or use --workers 0); what arrived is cached, rerun to complete")


def chunk_samples(chunk: PreparedChunk) -> Iterator[tuple[SampleEntry | Skip, list]]:
    """Each entry of a chunk with its (store, digest, model input) for every missing feature."""
    views: dict[int, list[tuple[int, torch.Tensor]]] = {}
    for row, (index, view) in enumerate(chunk.rows):
        views.setdefault(index, []).append((view, chunk.inputs[row]))
    for index, entry in enumerate(chunk.entries):
        if isinstance(entry, Skip):
            yield entry, []
            continue
        record = entry.record
        inputs: list = [(view, record.image_digest, x) for view, x in views.get(index, [])]
        if entry.need_text:
            inputs.append(("text", record.caption_digest, record.caption))
        yield entry, inputs


def _as_is(chunk: PreparedChunk) -> PreparedChunk:
    """DataLoader collate for pre-chunked items (module level: picklable under spawn)."""
    return chunk


__all__ = ["AugmentConfig", "Encoder", "PendingWrites", "PreparedStream", "commit_lock",
           "decode_image", "encode_shards"]
