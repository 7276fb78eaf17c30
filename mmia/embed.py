"""The embedding engine: shards → model → cache.

DataLoader workers read shards, hash contents, and decode/augment only what the cache lacks;
the main process batches model inputs, runs the encoders and commits cache segments.

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
  batch, not one batch per view.

Concurrent runs on one cache: before a batch is encoded, the stores are refreshed and inputs
that another process committed meanwhile are dropped (no duplicate forward pass where the other
run is ahead). A sample's features are committed together, once all its inputs are encoded,
under an exclusive lock on the cache folder (re-checking the cache inside it), so each sample's
features are committed by exactly one process. `EmbedResult.embedded` counts the samples this
process committed features of; `cached` the ones it found cached or that another run committed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import multiprocessing
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmia.cache import EmbeddingCache
from mmia.checks import check_embed_settings
from mmia.errors import MmiaError
from mmia.model import LoadedModel
from mmia.shards import Sample, Skip, expand_patterns, read_samples
from mmia.views import AugmentConfig, make_views

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: concurrent runs are not locked out there
    fcntl = None

MAX_IMAGE_PIXELS = 64_000_000
MAX_ASPECT_RATIO = 100  # the shortest-side resize then makes at most 100 × size² pixels
MAX_FORWARD_ROWS = 1024  # the most rows one forward pass is padded to
INPUT_COPIES = 4  # stacked, padded, moved and cast: copies of a batch's inputs held at once
CHUNK = 16  # samples per worker chunk
CHUNK_ROWS = 256  # a chunk closes once its samples have this many missing views
MAX_EXAMPLES = 3  # examples kept per skip reason
MAX_EXAMPLE_CHARS = 300
COMMIT_LOCK = ".embed-commit.lock"
LOCK_PATIENCE = 5.0  # seconds of waiting for the commit lock before saying so
log = logging.getLogger(__name__)


@dataclass
class SampleRecord:
    """What the attacks need to find a sample's features in the cache."""

    key: str
    image_digest: str
    caption_digest: str
    caption: str
    url: str
    meta: dict = field(default_factory=dict)
    image_bytes: bytes | None = None  # kept only when asked (blind baseline, thumbnails)


@dataclass
class EmbedResult:
    """What one run did. `embedded`: samples this process committed features of; `cached`:
    samples whose features it found cached (or another process committed meanwhile)."""

    records: list[SampleRecord]
    embedded: int = 0
    cached: int = 0
    forward_passes: int = 0
    skips: Counter = field(default_factory=Counter)
    warnings: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    # reason → the first MAX_EXAMPLES "shard url or key: detail" (skips and warnings alike)
    skip_examples: dict[str, list[str]] = field(default_factory=dict)

    def count(self, skip: Skip) -> None:
        """Count a skip (or a warning) and keep it as an example of its reason."""
        (self.skips if skip.fatal_to_sample else self.warnings)[skip.reason] += 1
        examples = self.skip_examples.setdefault(skip.reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(describe_skip(skip))

    def summary(self) -> str:
        n = len(self.records)
        lines = [f"{n} samples: {self.embedded} embedded now, {self.cached} already cached"]
        if self.forward_passes == 0 and n:
            lines.append("everything was cached: no forward pass was made")
        for title, counts in (("skipped", self.skips), ("kept with warnings", self.warnings)):
            if counts:
                parts = ", ".join(f"{r}={c}" for r, c in sorted(counts.items()))
                total = f" {sum(counts.values())}" if counts is self.skips else ""
                lines.append(f"{title}{total}: {parts}")
                lines += [f"  {reason}: {example}" for reason in sorted(counts)
                          for example in self.skip_examples.get(reason, [])]
        if self.seconds:
            lines.append(f"{n / self.seconds:.1f} samples/s over {self.seconds:.1f} s")
        return "\n".join(lines)


def describe_skip(skip: Skip) -> str:
    """One bounded line: where (sample key, else shard url) and why."""
    where = skip.key or skip.url or "?"
    text = f"{where}: {skip.detail}" if skip.detail else where
    text = " ".join(text.split())
    return text if len(text) <= MAX_EXAMPLE_CHARS else text[: MAX_EXAMPLE_CHARS - 1] + "…"


class ExtremeAspectRatioError(ValueError):
    """An image so elongated that the model's shortest-side resize would explode it."""


def decode_image(data: bytes) -> Image.Image:
    """Decode to RGB, refusing decompression bombs and extreme strips before pixels are loaded."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise Image.DecompressionBombError(f"{width}x{height} pixels")
        if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            raise ExtremeAspectRatioError(
                f"{width}x{height} pixels: one side is over {MAX_ASPECT_RATIO} times the other")
        image.load()
    if image.mode.startswith("I"):  # 16/32-bit integer grey: scale to 8 bits, do not clip
        image = _integer_grey_to_8bit(image)
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def _integer_grey_to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit (or 32-bit integer) greyscale image as 8-bit "L": PIL's convert clips it."""
    values = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I;16") or values.max() <= 65535 else values.max()
    return Image.fromarray(np.clip(np.rint(values / top * 255.0), 0, 255).astype(np.uint8), "L")


# ------------------------------------------------------------------------------ worker side


@dataclass
class SampleEntry:
    """A sample of a chunk: its record, the views it lacks, whether its caption is missing."""

    record: SampleRecord
    views: list[int]
    need_text: bool


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


class PreparedStream(IterableDataset):
    """Worker-side stage: reader → digests → cache check → decode and views for what is missing.

    `produced[w]` counts the chunks worker w handed to the DataLoader (shared memory), so the
    main process can tell when one never arrived: a worker that fails to send a chunk (out of
    file descriptors, say) only prints an error, and the DataLoader then skips that chunk.
    """

    def __init__(self, patterns: Sequence[str], cache: EmbeddingCache, views: int,
                 preprocess, augment: AugmentConfig, keep_images: bool = False,
                 produced=None):
        self.patterns = list(patterns)
        self.keep_images, self.produced = keep_images, produced
        self.cache_root, self.fingerprint = cache.root, cache.fingerprint
        self.views, self.preprocess, self.augment = views, preprocess, augment

    def __iter__(self) -> Iterator[PreparedChunk]:
        cache = EmbeddingCache(self.cache_root, self.fingerprint, self.augment)
        chunk = ChunkBuilder()
        for item in read_samples(self.patterns):
            chunk.add(*self.prepare(item, cache))
            if chunk.full():
                yield self._counted(chunk.build())
                chunk = ChunkBuilder()
                cache.refresh_if_changed()  # see what was committed meanwhile (by anyone)
        if chunk.entries:
            yield self._counted(chunk.build())

    def _counted(self, chunk: PreparedChunk) -> PreparedChunk:
        if self.produced is not None:
            info = get_worker_info()
            self.produced[info.id if info is not None else 0] += 1
        return chunk

    def prepare(self, item: Sample | Skip,
                cache: EmbeddingCache) -> tuple[SampleEntry | Skip, torch.Tensor | None]:
        """The entry of one reader item and its missing views' inputs (one tensor, or None)."""
        if isinstance(item, Skip):
            return item, None
        image_digest, caption_digest = item.image_digest, item.caption_digest
        record = SampleRecord(item.key, image_digest, caption_digest, item.caption, item.url,
                              item.meta, item.image_bytes if self.keep_images else None)
        missing = [v for v in range(self.views + 1)
                   if not cache.image(v).contains([image_digest])[0]]
        need_text = not cache.text.contains([caption_digest])[0]
        try:  # decode always: a bad image is a bad sample even when its digest is cached
            image = decode_image(item.image_bytes)
            inputs = make_views(image, image_digest, missing, self.preprocess, self.augment)
        except Image.DecompressionBombError as exc:
            return Skip("decompression_bomb", item.key, item.url, str(exc)), None
        except ExtremeAspectRatioError as exc:
            return Skip("extreme_aspect_ratio", item.key, item.url, str(exc)), None
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad bytes
            return Skip("undecodable_image", item.key, item.url, str(exc)[:200]), None
        return SampleEntry(record, missing, need_text), inputs


# ------------------------------------------------------------------------------ main side


class Encoder:
    """Runs fixed-size padded batches through the model (batch-composition invariant).

    Every forward pass has exactly `batch_size` = min(asked, MAX_FORWARD_ROWS) rows.
    """

    def __init__(self, loaded: LoadedModel, batch_size: int):
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
        batch = batch.to(self.loaded.device)
        if batch.is_floating_point():  # images; token ids stay integer
            batch = batch.to(self.loaded.input_dtype)
        self.forward_passes += 1
        with self.loaded.autocast():  # `amp`: fp32 weights, mixed-precision compute
            out = encode(batch, normalize=True)
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


def check_batch_fits(loaded: LoadedModel, batch_size: int) -> None:
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


@dataclass
class QueuedInput:
    """One model input waiting for its batch: the sample that queued it, its store, digest."""

    sample: int
    store: int | str  # a view number, or "text"
    digest: str
    value: torch.Tensor | str


@dataclass
class PendingSample:
    """A sample with inputs in flight: how many are not encoded yet, and the encoded ones."""

    outstanding: int
    features: list[tuple[int | str, str, np.ndarray]] = field(default_factory=list)


class PendingWrites:
    """Model inputs queued by modality, encoded in full padded batches, committed per sample.

    A sample's features are committed together, once all its inputs are encoded, so one
    process commits them all or none (see the module docstring). `claimed` / `unclaimed`
    count the samples resolved so far: committed by this process / found cached meanwhile.
    """

    def __init__(self, encoder: Encoder, cache: EmbeddingCache, flush_every: int):
        self.encoder, self.cache, self.flush_every = encoder, cache, flush_every
        self.queues: dict[str, list[QueuedInput]] = {"image": [], "text": []}
        self.queued: set[tuple[int | str, str]] = set()  # in flight only
        self.samples: dict[int, PendingSample] = {}
        self.complete: list[int] = []
        self.ready_rows: Counter = Counter()  # per store, rows of complete samples
        self.claimed = self.unclaimed = 0

    @property
    def in_flight(self) -> int:
        return len(self.samples)

    def add_sample(self, sample: int, inputs: Sequence[tuple[int | str, str, object]]) -> bool:
        """Queue a sample's inputs (store, digest, value); False if none was new to this run."""
        fresh = [QueuedInput(sample, store, digest, value) for store, digest, value in inputs
                 if (store, digest) not in self.queued]
        if not fresh:
            return False
        self.samples[sample] = PendingSample(len(fresh))
        for item in fresh:
            self.queued.add((item.store, item.digest))
            modality = "text" if item.store == "text" else "image"
            self.queues[modality].append(item)
            if len(self.queues[modality]) >= self.encoder.batch_size:
                self._encode(modality)
        return True

    def _store(self, store: int | str):
        return self.cache.text if store == "text" else self.cache.image(store)

    def _committed_meanwhile(self, items: list[QueuedInput]) -> np.ndarray:
        """Which items' digests are in the cache now (another process committed them)."""
        found = np.zeros(len(items), bool)
        for store in {item.store for item in items}:
            idx = [i for i, item in enumerate(items) if item.store == store]
            digests = [items[i].digest for i in idx]
            found[idx] = self._store(store).refresh_if_changed().contains(digests)
        return found

    def _encode(self, modality: str) -> None:
        items, self.queues[modality] = self.queues[modality], []
        if not items:
            return
        dropped = self._committed_meanwhile(items)
        todo = [item for item, gone in zip(items, dropped, strict=True) if not gone]
        values = [item.value for item in todo]
        if todo:
            feats = (self.encoder.texts(values) if modality == "text"
                     else self.encoder.images(values))
        for i, item in enumerate(todo):
            self.samples[item.sample].features.append((item.store, item.digest, feats[i]))
        for item in items:
            self._input_done(item.sample)
        if self.ready_rows and max(self.ready_rows.values()) >= self.flush_every:
            self._commit()

    def _input_done(self, sample: int) -> None:
        pending = self.samples[sample]
        pending.outstanding -= 1
        if pending.outstanding == 0:
            self.complete.append(sample)
            self.ready_rows.update(store for store, _, _ in pending.features)

    def _commit(self) -> None:
        """Commit the features of every complete sample, each store's as one segment."""
        done = [self.samples.pop(s) for s in self.complete]
        self.complete, self.ready_rows = [], Counter()
        by_store: dict[int | str, list[tuple[str, np.ndarray]]] = {}
        for pending in done:
            for store, digest, row in pending.features:
                by_store.setdefault(store, []).append((digest, row))
                self.queued.discard((store, digest))
        written: set[tuple[int | str, str]] = set()
        if by_store:
            with commit_lock(self.cache.folder):
                for store, rows in by_store.items():
                    new = self._store(store).write_new([d for d, _ in rows],
                                                       np.stack([r for _, r in rows]))
                    written |= {(store, d) for d in new}
        for pending in done:
            mine = any((store, digest) in written for store, digest, _ in pending.features)
            self.claimed += mine
            self.unclaimed += not mine

    def finish(self) -> None:
        for modality in self.queues:
            self._encode(modality)
        self._commit()


def embed_shards(
    loaded: LoadedModel,
    patterns: Sequence[str],
    cache_dir: str,
    views: int = 0,
    batch_size: int = 32,
    workers: int | None = None,
    augment: AugmentConfig | None = None,
    flush_every: int | None = None,
    progress: bool | Callable[[int, dict], None] = True,
    keep_images: bool = False,
    mp_context: str | None = None,
) -> EmbedResult:
    """Fill the cache with view-0..`views` image features and caption features of the shards.

    progress: True for a tqdm bar, False for none, or a callable(samples done, counts) per
    chunk (and once more, with 0 done, when everything is committed). mp_context: DataLoader
    worker start method ("fork", "spawn", "forkserver"; default: the platform's).
    batch_size: rows per forward pass, at most MAX_FORWARD_ROWS (see the module docstring).
    """
    check_embed_settings(views, batch_size, workers)
    augment = augment or AugmentConfig()
    urls = expand_patterns(patterns)
    check_batch_fits(loaded, batch_size)
    if batch_size > MAX_FORWARD_ROWS:
        log.info("--batch-size %d: forward passes of %d rows (the most mmia pads to)",
                 batch_size, MAX_FORWARD_ROWS)
    cache = EmbeddingCache(cache_dir, loaded.fingerprint, augment)
    writable = cache.writable()  # a read-only cache serves what it holds; see below
    if writable:
        cache.write_description(loaded.description)
    if workers is None:
        workers = 1 if (os.cpu_count() or 1) > 1 else 0
    workers = max(0, min(workers, len(urls)))
    produced = multiprocessing.get_context(mp_context).RawArray("q", max(workers, 1))
    stream = PreparedStream(urls, cache, views, loaded.preprocess, augment, keep_images,
                            produced)
    loader = DataLoader(stream, batch_size=None, num_workers=workers,
                        persistent_workers=False, collate_fn=_as_is,
                        multiprocessing_context=mp_context if workers else None)
    encoder = Encoder(loaded, batch_size)
    pending = PendingWrites(encoder, cache, flush_every or 8 * encoder.batch_size)
    result = EmbedResult(records=[])
    seen_keys: set[str] = set()
    found_cached = 0
    start = time.perf_counter()
    report = progress if callable(progress) else TqdmProgress(progress)

    def counts() -> dict:
        return {"new": pending.claimed + pending.in_flight,
                "cached": found_cached + pending.unclaimed,
                "skipped": sum(result.skips.values())}

    received = 0
    for chunk in loader:
        received += 1
        for entry, inputs in chunk_samples(chunk):
            if isinstance(entry, Skip):
                result.count(entry)
                continue
            record = entry.record
            if record.key in seen_keys:
                result.count(Skip("duplicate_key", record.key, record.url,
                                  "the same key was read from another shard"))
                continue
            seen_keys.add(record.key)
            result.records.append(record)
            if inputs and not writable:  # before any forward pass, not after the work
                raise MmiaError(
                    f"the cache {cache_dir!r} is read-only and {record.key!r} (at least) is not "
                    "in it: pass a writable --cache, or embed these shards into it first")
            if not pending.add_sample(len(result.records) - 1, inputs):
                found_cached += 1
        report(len(chunk.entries), counts())
    pending.finish()
    report(0, counts())
    getattr(report, "close", lambda: None)()
    check_nothing_lost(received, sum(produced))
    result.embedded, result.cached = pending.claimed, found_cached + pending.unclaimed
    result.forward_passes = encoder.forward_passes
    result.seconds = time.perf_counter() - start
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


class TqdmProgress:
    """The default progress callback: a tqdm bar on stderr (hidden when not enabled)."""

    def __init__(self, enabled: bool = True):
        from tqdm import tqdm

        self.bar = tqdm(unit=" samples", disable=not enabled, dynamic_ncols=True,
                        mininterval=1.0)

    def __call__(self, done: int, counts: dict) -> None:
        self.bar.update(done)
        self.bar.set_postfix(refresh=False, **counts)

    def close(self) -> None:
        self.bar.close()
