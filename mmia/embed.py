"""The embedding engine: shards → model → cache.

DataLoader workers read shards, hash contents, and decode/augment only what the cache lacks;
the main process batches model inputs, runs the encoders and commits cache segments. Every
forward pass uses a batch padded to exactly `batch_size` rows, so a sample's features never
depend on which other samples share its batch: an interrupted and resumed run writes the
same bytes as an uninterrupted one.
"""

from __future__ import annotations

import os
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from mmia.cache import EmbeddingCache
from mmia.model import LoadedModel
from mmia.shards import Sample, Skip, expand_patterns, read_samples
from mmia.views import AugmentConfig, make_view

MAX_IMAGE_PIXELS = 64_000_000
CHUNK = 16


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
    records: list[SampleRecord]
    embedded: int = 0
    cached: int = 0
    forward_passes: int = 0
    skips: Counter = field(default_factory=Counter)
    warnings: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def summary(self) -> str:
        n = len(self.records)
        lines = [f"{n} samples: {self.embedded} embedded now, {self.cached} already cached"]
        if self.forward_passes == 0 and n:
            lines.append("everything was cached: no forward pass was made")
        if self.skips:
            parts = ", ".join(f"{r}={c}" for r, c in sorted(self.skips.items()))
            lines.append(f"skipped {sum(self.skips.values())}: {parts}")
        if self.warnings:
            parts = ", ".join(f"{r}={c}" for r, c in sorted(self.warnings.items()))
            lines.append(f"kept with warnings: {parts}")
        if self.seconds:
            lines.append(f"{n / self.seconds:.1f} samples/s over {self.seconds:.1f} s")
        return "\n".join(lines)


def decode_image(data: bytes) -> Image.Image:
    """Decode to RGB, refusing decompression bombs before the pixels are loaded."""
    import io

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise Image.DecompressionBombError(f"{image.width}x{image.height} pixels")
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


class PreparedStream(IterableDataset):
    """Worker-side stage: reader → digests → cache check → decode and views for what is missing."""

    def __init__(self, patterns: Sequence[str], cache: EmbeddingCache, views: int,
                 preprocess, augment: AugmentConfig, keep_images: bool = False):
        self.patterns = list(patterns)
        self.keep_images = keep_images
        self.cache_root, self.fingerprint = cache.root, cache.fingerprint
        self.views, self.preprocess, self.augment = views, preprocess, augment

    def __iter__(self) -> Iterator[list]:
        cache = EmbeddingCache(self.cache_root, self.fingerprint, self.augment)
        chunk: list = []
        for item in read_samples(self.patterns):
            chunk.append(self.prepare(item, cache))
            if len(chunk) >= CHUNK:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def prepare(self, item: Sample | Skip, cache: EmbeddingCache) -> tuple:
        if isinstance(item, Skip):
            return ("skip", item)
        image_digest, caption_digest = item.image_digest, item.caption_digest
        record = SampleRecord(item.key, image_digest, caption_digest, item.caption, item.url,
                              item.meta, item.image_bytes if self.keep_images else None)
        missing = [v for v in range(self.views + 1)
                   if not cache.image(v).contains([image_digest])[0]]
        need_text = not cache.text.contains([caption_digest])[0]
        tensors = {}
        try:  # decode always: a bad image is a bad sample even when its digest is cached
            image = decode_image(item.image_bytes)
            for v in missing:
                tensors[v] = make_view(image, image_digest, v, self.preprocess, self.augment)
        except Image.DecompressionBombError as exc:
            return ("skip", Skip("decompression_bomb", item.key, item.url, str(exc)))
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad bytes
            return ("skip", Skip("undecodable_image", item.key, item.url, str(exc)[:200]))
        return ("sample", record, tensors, need_text)


class Encoder:
    """Runs fixed-size padded batches through the model (batch-composition invariant)."""

    def __init__(self, loaded: LoadedModel, batch_size: int):
        self.loaded, self.batch_size = loaded, batch_size
        self.forward_passes = 0

    @torch.no_grad()
    def images(self, tensors: list[torch.Tensor]) -> np.ndarray:
        batch = torch.stack(tensors)
        return self._run(batch, self.loaded.model.encode_image)

    @torch.no_grad()
    def texts(self, captions: list[str]) -> np.ndarray:
        return self._run(self.loaded.tokenizer(captions), self.loaded.model.encode_text)

    def _run(self, batch: torch.Tensor, encode) -> np.ndarray:
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


class PendingWrites:
    """Queues of model inputs per store, encoded in full batches and committed in segments."""

    def __init__(self, encoder: Encoder, cache: EmbeddingCache, flush_every: int):
        self.encoder, self.cache, self.flush_every = encoder, cache, flush_every
        self.inputs: dict[object, list] = {}
        self.done: dict[object, tuple[list[str], list[np.ndarray]]] = {}
        self.queued: set[tuple[object, str]] = set()

    def add(self, store: object, digest: str, value) -> bool:
        """Queue one input; False when this digest is already queued for this store."""
        if (store, digest) in self.queued:
            return False
        self.queued.add((store, digest))
        self.inputs.setdefault(store, []).append((digest, value))
        if len(self.inputs[store]) >= self.encoder.batch_size:
            self._encode(store)
        return True

    def _encode(self, store: object) -> None:
        items = self.inputs.pop(store, [])
        if not items:
            return
        digests = [d for d, _ in items]
        values = [v for _, v in items]
        feats = self.encoder.texts(values) if store == "text" else self.encoder.images(values)
        keys, arrays = self.done.setdefault(store, ([], []))
        keys.extend(digests)
        arrays.append(feats)
        if len(keys) >= self.flush_every:
            self._commit(store)

    def _commit(self, store: object) -> None:
        keys, arrays = self.done.pop(store, ([], []))
        if keys:
            target = self.cache.text if store == "text" else self.cache.image(store)
            target.write(keys, np.concatenate(arrays))

    def finish(self) -> None:
        for store in list(self.inputs):
            self._encode(store)
        for store in list(self.done):
            self._commit(store)


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
    chunk. mp_context: DataLoader worker start method ("fork", "spawn", "forkserver"; default: the
    platform's).
    """
    augment = augment or AugmentConfig()
    urls = expand_patterns(patterns)
    cache = EmbeddingCache(cache_dir, loaded.fingerprint, augment)
    cache.write_description(loaded.description)
    if workers is None:
        workers = 1 if (os.cpu_count() or 1) > 1 else 0
    workers = max(0, min(workers, len(urls)))
    stream = PreparedStream(urls, cache, views, loaded.preprocess, augment, keep_images)
    loader = DataLoader(stream, batch_size=None, num_workers=workers,
                        persistent_workers=False, collate_fn=_as_is,
                        multiprocessing_context=mp_context if workers else None)
    encoder = Encoder(loaded, batch_size)
    pending = PendingWrites(encoder, cache, flush_every or 8 * batch_size)
    result = EmbedResult(records=[])
    seen_keys: set[str] = set()
    start = time.perf_counter()
    report = progress if callable(progress) else TqdmProgress(progress)
    for chunk in loader:
        for item in chunk:
            if item[0] == "skip":
                skip: Skip = item[1]
                (result.skips if skip.fatal_to_sample else result.warnings)[skip.reason] += 1
                continue
            _, record, tensors, need_text = item
            if record.key in seen_keys:
                result.skips["duplicate_key"] += 1
                continue
            seen_keys.add(record.key)
            result.records.append(record)
            fresh = [pending.add(v, record.image_digest, t) for v, t in tensors.items()]
            if need_text:
                fresh.append(pending.add("text", record.caption_digest, record.caption))
            if any(fresh):
                result.embedded += 1
            else:
                result.cached += 1
        report(len(chunk), {"new": result.embedded, "cached": result.cached,
                            "skipped": sum(result.skips.values())})
    pending.finish()
    getattr(report, "close", lambda: None)()
    result.forward_passes = encoder.forward_passes
    result.seconds = time.perf_counter() - start
    return result


def _as_is(chunk: list) -> list:
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
