"""Fill the embedding cache from shards: `embed_shards`, answering what it can without reading.

For each shard the cache keeps a sample index (`mmia.sample_index`): its samples' keys,
content digests, captions and decode status, keyed by the shard's identity. A shard whose index
is current and whose every sample's features are cached is answered from the index alone: no
tar is read, no image decoded, no model built (the model comes from `loaded` only when
something must be encoded: pass a `mmia.modelref.LazyModel` to defer building it). The other
shards go through the embedding engine, `mmia.encode` (DataLoader workers, padded forward passes,
per-sample commits; see its docstring). This module does not import torch.

Samples come back as a `SampleTable`, shard by shard in the order of the patterns, each shard's
in its tar order; a key read from two shards is kept once (the first), the other counted as a
`duplicate_key` skip.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmia.cache import EmbeddingCache
from mmia.checks import check_embed_settings
from mmia.errors import MmiaError
from mmia.modelref import built_model
from mmia.sample_index import SampleIndex, SampleRecord, SampleTable, shard_identities, skip_rows
from mmia.shards import Skip, expand_patterns, shard_labels
from mmia.views import AugmentConfig

MAX_EXAMPLES = 3  # examples kept per skip reason
MAX_EXAMPLE_CHARS = 300
log = logging.getLogger(__name__)

__all__ = ["EmbedResult", "SampleRecord", "SampleTable", "describe_skip", "embed_shards"]


@dataclass
class EmbedResult:
    """What one run did. `embedded`: samples this process committed features of; `cached`:
    samples whose features it found cached (or another process committed meanwhile);
    `shards_read`: shards it had to read (the rest were answered from their sample index)."""

    records: SampleTable
    embedded: int = 0
    cached: int = 0
    forward_passes: int = 0
    skips: Counter = field(default_factory=Counter)
    warnings: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    # reason → the first MAX_EXAMPLES "shard url or key: detail" (skips and warnings alike)
    skip_examples: dict[str, list[str]] = field(default_factory=dict)
    shards: int = 0
    shards_read: int = 0

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
        if self.shards and self.shards_read < self.shards:
            lines.append(f"{self.shards - self.shards_read} of {self.shards} shards answered "
                         "from the sample index (not read)")
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


def features_cached(cache: EmbeddingCache, table: SampleTable, views: int,
                    keep_view_features: bool = False) -> np.ndarray:
    """Whether every feature each sample needs is cached (vectorised lookups, one per store)."""
    ok = cache.image(0).contains(table.image_digest) & cache.text.contains(table.caption_digest)
    if views:
        ok &= cache.pairs(views).contains(table.pair_digest)
        if keep_view_features:
            for view in range(1, views + 1):
                ok &= cache.image(view).contains(table.image_digest)
    return ok


def answered_shards(cache: EmbeddingCache, tables: dict[str, object], views: int,
                    keep_view_features: bool) -> tuple[set[str], SampleTable]:
    """The indexed shards whose samples all have their features cached, and the samples of
    every indexed shard (in the order of `tables`)."""
    samples = SampleTable.from_shards(list(tables.items()))
    if not tables:
        return set(), samples
    ok = features_cached(cache, samples, views, keep_view_features)
    missing = {samples.urls[s] for s in np.unique(samples.shard[~ok])}
    return set(tables) - missing, samples


def embed_shards(
    loaded,
    patterns: Sequence[str],
    cache_dir: str,
    views: int = 0,
    batch_size: int = 32,
    workers: int | None = None,
    augment: AugmentConfig | None = None,
    flush_every: int | None = None,
    progress: bool | Callable[[int, dict], None] = True,
    mp_context: str | None = None,
    shard_share: tuple[int, int] = (0, 1),
    keep_view_features: bool = False,
    threads: int | None = None,
) -> EmbedResult:
    """Fill the cache with view-0 image features, caption features and (views ≥ 1) the pairs'
    augmented-view cosines of the shards' samples; return the samples.

    loaded: a `LoadedModel`, or anything with `.fingerprint` and `.get()` giving one (built
    only if a shard must be read). progress: True for a tqdm bar, False for none, or a
    callable(samples done, counts) per chunk (and once more, with 0 done, at the end).
    mp_context: DataLoader worker start method ("fork", "spawn", "forkserver").
    batch_size: rows per forward pass, at most `mmia.encode.MAX_FORWARD_ROWS`.
    shard_share: (rank, world size): embed only every world-size-th shard from `rank` on (the
    share of one torchrun process; the samples of the other shards are not in the result).
    keep_view_features: also keep each augmented view's features (20 GB per 10^6 images at
    K = 10, d = 512), not only the cosines AEA needs. threads: torch's CPU threads (default:
    OMP_NUM_THREADS, else this process's share of the cores).
    """
    check_embed_settings(views, batch_size, workers, threads)
    start = time.perf_counter()
    augment = augment or AugmentConfig()
    rank, world_size = shard_share
    all_urls = expand_patterns(patterns)
    labels = shard_labels(all_urls)  # over the whole list: a key does not depend on the rank
    urls = all_urls[rank::world_size]
    cache = EmbeddingCache(cache_dir, loaded.fingerprint, augment)
    index = SampleIndex(cache.root)
    identities = dict(zip(urls, shard_identities(urls), strict=True))
    tables = {u: index.load(u, identities[u], labels[u]) for u in urls}
    indexed = {u: t for u, t in tables.items() if t is not None}
    answered, indexed_samples = answered_shards(cache, indexed, views, keep_view_features)
    cold = [u for u in urls if u not in answered]
    report = progress if callable(progress) else TqdmProgress(progress)
    result = EmbedResult(SampleTable.empty(), shards=len(urls), shards_read=len(cold))
    warm_samples = sum(int((indexed[u].column("kind").to_numpy() == 0).sum()) for u in answered)
    report(warm_samples, {"new": 0, "cached": warm_samples, "skipped": 0})
    cold_rows: dict = {}
    if cold:
        engine = _encode_cold(loaded, cold, labels, identities, set(indexed), cache, views,
                              batch_size, workers, flush_every, keep_view_features, threads,
                              mp_context, report, warm_samples)
        cold_rows = engine.rows
        result.embedded, result.cached = engine.embedded, engine.cached
        result.forward_passes = engine.forward_passes
    result.cached += warm_samples
    tables = [(url, indexed[url] if url in answered else cold_rows[url].table())
              for url in urls if url in answered or url in cold_rows]
    for skip in skip_rows(tables):
        result.count(skip)
    everything_answered = len(answered) == len(urls) == len(indexed)  # the warm case
    samples = indexed_samples if everything_answered else SampleTable.from_shards(tables)
    result.records = drop_duplicate_keys(samples, result)
    report(0, {"new": result.embedded, "cached": result.cached,
               "skipped": sum(result.skips.values())})
    getattr(report, "close", lambda: None)()
    result.seconds = time.perf_counter() - start
    return result


def _encode_cold(loaded, cold: list[str], labels: dict, identities: dict, indexed: set,
                 cache: EmbeddingCache, views: int, batch_size: int, workers: int | None,
                 flush_every: int | None, keep_view_features: bool, threads: int | None,
                 mp_context: str | None, report, warm_samples: int):
    """Run the embedding engine on the shards the index and cache could not answer."""
    from mmia.encode import MAX_FORWARD_ROWS, StreamPlan, check_batch_fits, encode_shards

    model = built_model(loaded)
    if model.fingerprint != cache.fingerprint:  # a stale fingerprint memo: never mix features
        raise MmiaError(f"the model's fingerprint changed from {cache.fingerprint} (remembered) "
                        f"to {model.fingerprint} (built): run the command again")
    check_batch_fits(model, batch_size)
    if batch_size > MAX_FORWARD_ROWS:
        log.info("--batch-size %d: forward passes of %d rows (the most mmia pads to)",
                 batch_size, MAX_FORWARD_ROWS)
    if cache.writable():  # a read-only cache serves what it holds; the engine says what not
        cache.write_description(model.description)
    if workers is None:
        workers = default_workers(model.device.type)
    plan = StreamPlan(cold, labels, identities, indexed & set(cold))

    def counts(done: dict) -> dict:
        return {"new": done["new"], "cached": done["cached"] + warm_samples}

    return encode_shards(model, plan, cache, views, batch_size, workers, flush_every,
                         keep_view_features, report, counts, mp_context, threads)


def default_workers(device_type: str, cores: int | None = None) -> int:
    """DataLoader workers when --workers is not given: on a GPU, decoding is the bottleneck
    (one worker fed an H200 a tenth of what it encodes), so up to 8, leaving a core; on a CPU the
    encoder is, and one worker beside it suffices (none on a single core)."""
    cores = cores or os.cpu_count() or 1
    if device_type == "cuda":
        return max(1, min(8, cores - 1))
    return 1 if cores > 1 else 0


def drop_duplicate_keys(table: SampleTable, result: EmbedResult) -> SampleTable:
    """Keep the first sample of each key; count the others as `duplicate_key` skips."""
    if not len(table):
        return table
    codes = pc.dictionary_encode(pa.array(table.key, type=pa.large_string()))
    _, first = np.unique(codes.indices.to_numpy(), return_index=True)
    if len(first) == len(table):
        return table
    keep = np.zeros(len(table), bool)
    keep[first] = True
    for row in np.flatnonzero(~keep):
        result.count(Skip("duplicate_key", table.key[row], table.urls[table.shard[row]],
                          "the same key was read from another shard"))
    return table.take(np.flatnonzero(keep))


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


_ENGINE = ("Encoder", "PendingWrites", "PreparedStream", "commit_lock", "decode_image",
           "COMMIT_LOCK", "MAX_FORWARD_ROWS", "MAX_IMAGE_PIXELS", "MAX_ASPECT_RATIO",
           "check_batch_fits", "available_memory", "check_nothing_lost", "CHUNK", "CHUNK_ROWS")


def __getattr__(name: str):
    """The engine's names (`mmia.encode`), imported (with torch) only when asked for."""
    if name in _ENGINE:
        from mmia import encode

        return getattr(encode, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
