"""Streaming reader for img2dataset / webdataset shards.

The reader is a chain of plain generators (webdataset style):
shard urls → tar members → grouped samples → validated `Sample`s, with `Skip` records for
bad input. Skips travel down the stream (also out of DataLoader workers) and are counted by
whoever consumes it, so one bad sample never ends a run and nothing is lost silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlparse

import braceexpand

from mmia.errors import MmiaError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
KNOWN_EXTS = IMAGE_EXTS + ("txt", "json")
MAX_CAPTION_CHARS = 100_000


@dataclass
class Sample:
    """One image–caption pair; `key` is unique across the whole input (shard-qualified)."""

    key: str
    image_bytes: bytes
    caption: str
    meta: dict = field(default_factory=dict)
    url: str = ""

    @property
    def image_digest(self) -> str:
        return digest(self.image_bytes)

    @property
    def caption_digest(self) -> str:
        return digest(self.caption.encode("utf-8"))


@dataclass
class Skip:
    """A bad sample, shard or sidecar: counted by `reason`, never fatal."""

    reason: str
    key: str = ""
    url: str = ""
    detail: str = ""
    fatal_to_sample: bool = True


def digest(data: bytes) -> str:
    """Content digest used as cache identity (128-bit hex)."""
    return hashlib.sha256(data).hexdigest()[:32]


def is_remote(url: str) -> bool:
    return url.startswith(("http://", "https://", "pipe:", "s3://", "gs://"))


def local_path(url: str) -> str:
    return url.removeprefix("file:")


def expand_patterns(patterns: str | Sequence[str]) -> list[str]:
    """Brace-expand every pattern; local shards must exist. Duplicate urls are dropped."""
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise MmiaError("no shard pattern given: pass e.g. --shards 'data/{00000..00009}.tar'")
    urls: list[str] = []
    for pattern in patterns:
        expanded = list(braceexpand.braceexpand(pattern))
        for url in expanded:
            if not is_remote(url) and not os.path.exists(local_path(url)):
                raise MmiaError(
                    f"shard pattern {pattern!r} names a missing file {url!r}: "
                    "check the path and the brace range"
                )
        urls.extend(expanded)
    return list(dict.fromkeys(urls))


def shard_labels(urls: Sequence[str]) -> dict[str, str]:
    """Shortest path suffix (without .tar) that tells each shard apart from all others."""
    parts = {u: _strip_tar(urlparse(local_path(u)).path or u).strip("/").split("/") for u in urls}
    labels: dict[str, str] = {}
    for url, segs in parts.items():
        for n in range(1, len(segs) + 1):
            label = "/".join(segs[-n:])
            clash = [o for o, s in parts.items() if o != url and "/".join(s[-n:]) == label]
            if not clash:
                break
        labels[url] = label
    return labels


def _strip_tar(path: str) -> str:
    for ext in (".tar.gz", ".tgz", ".tar"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


def split_for_rank_and_worker(urls: Sequence[str]) -> list[str]:
    """Shards this process should read: split across torch.distributed ranks, then workers."""
    import torch.distributed as dist
    from torch.utils.data import get_worker_info

    rank, world = 0, 1
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    info = get_worker_info()
    wid, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
    return list(urls)[rank * nworkers + wid :: world * nworkers]


def _open(url: str):
    import webdataset as wds

    return wds.gopen(url if is_remote(url) else local_path(url), "rb")


def tar_members(urls: Iterable[str]) -> Iterator[tuple[str, str, bytes] | Skip]:
    """(url, member name, bytes) for every regular file of every shard; broken shards → Skip.

    A shard that cannot be opened, or whose opener fails (an http 404, a `pipe:` command that
    exits non-zero), is one `unreadable_shard`; one that breaks off after some samples is a
    `truncated_shard` (its intact prefix is kept).
    """
    for url in urls:
        try:
            stream = _open(url)
        except Exception as exc:  # noqa: BLE001 - any opener failure is one unreadable shard
            yield Skip("unreadable_shard", url=url, detail=str(exc))
            continue
        count, error = 0, None
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    data = tar.extractfile(member).read()
                    count += 1
                    yield url, member.name, data
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            error = exc
        except BaseException:  # the consumer stopped early (GeneratorExit) or was interrupted
            _close(stream)
            raise
        close_error = _close(stream)
        if close_error is not None and count == 0:
            yield Skip("unreadable_shard", url=url, detail=close_error)
        elif error is not None or close_error is not None:
            empty = count == 0 and "empty" in str(error).lower()
            yield Skip("empty_shard" if empty else "truncated_shard", url=url,
                       detail=str(error or close_error))
        elif count == 0:
            yield Skip("empty_shard", url=url)


def _close(stream) -> str | None:
    """Close a shard stream; the error a pipe or download reports on closing, if any."""
    try:
        stream.close()
    except Exception as exc:  # noqa: BLE001 - webdataset pipes raise OSError with exit status
        return str(exc)[:300]
    return None


def split_name(name: str) -> tuple[str, str]:
    """Split a member name into (key, ext); keys may contain dots and folders."""
    base = name.rsplit("/", 1)[-1]
    lower = base.lower()
    for ext in KNOWN_EXTS:
        if lower.endswith("." + ext):
            return name[: -len(ext) - 1], ext
    if "." in base:
        return name[: name.rfind(".")], base.rsplit(".", 1)[1].lower()
    return name, ""


def group_members(
    members: Iterable[tuple[str, str, bytes] | Skip],
) -> Iterator[tuple[str, str, dict[str, bytes]] | Skip]:
    """Group consecutive members sharing a key into (url, key, {ext: bytes})."""
    current: tuple[str, str, dict[str, bytes]] | None = None
    seen: set[tuple[str, str]] = set()
    dropping: tuple[str, str] | None = None  # the rest of a duplicate sample's members
    for item in members:
        if isinstance(item, Skip):
            if current is not None:
                yield current
                current = None
            yield item
            continue
        url, name, data = item
        key, ext = split_name(name)
        if dropping == (url, key):
            continue
        dropping = None
        if current is not None and (current[0], current[1]) == (url, key) and ext not in current[2]:
            current[2][ext] = data
            continue
        if current is not None:
            yield current
            current = None
        if (url, key) in seen:
            dropping = (url, key)
            yield Skip("duplicate_key", key=key, url=url, detail=f"{name} repeats key {key!r}")
            continue
        seen.add((url, key))
        current = (url, key, {ext: data})
    if current is not None:
        yield current


def to_samples(
    groups: Iterable[tuple[str, str, dict[str, bytes]] | Skip], labels: dict[str, str]
) -> Iterator[Sample | Skip]:
    """Validate grouped members into `Sample`s; bad ones become `Skip`s."""
    for item in groups:
        if isinstance(item, Skip):
            yield item
            continue
        url, raw_key, parts = item
        key = f"{labels.get(url, url)}/{raw_key}"
        image_ext = next((e for e in IMAGE_EXTS if e in parts), None)
        if image_ext is None:
            yield Skip("missing_image", key=key, url=url)
            continue
        if "txt" not in parts:
            yield Skip("missing_caption", key=key, url=url)
            continue
        if not parts[image_ext]:
            yield Skip("empty_image", key=key, url=url)
            continue
        try:
            caption = parts["txt"].decode("utf-8").strip()
        except UnicodeDecodeError:
            yield Skip("caption_not_utf8", key=key, url=url)
            continue
        if not caption:
            yield Skip("missing_caption", key=key, url=url, detail="empty caption")
            continue
        if len(caption) > MAX_CAPTION_CHARS:
            yield Skip("caption_too_long", key=key, url=url, detail=f"{len(caption)} chars")
            continue
        meta: dict = {}
        if "json" in parts:
            try:
                meta = json.loads(parts["json"].decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                meta = None
            if not isinstance(meta, dict):
                meta = {}
                yield Skip("bad_json_sidecar", key=key, url=url, fatal_to_sample=False)
        yield Sample(key=key, image_bytes=parts[image_ext], caption=caption, meta=meta, url=url)


def read_samples(
    patterns: str | Sequence[str], split: bool = True, label_urls: Sequence[str] | None = None
) -> Iterator[Sample | Skip]:
    """Stream `Sample`s and `Skip`s from shard patterns (this rank's and worker's share).

    Keys are qualified by the shortest path suffix that tells the shard apart from every
    shard in `label_urls` (default: this input), so keys are unique across all of them.
    """
    urls = expand_patterns(patterns)
    labels = shard_labels(sorted(set(urls) | set(label_urls or ())))
    mine = split_for_rank_and_worker(urls) if split else urls
    return to_samples(group_members(tar_members(mine)), labels)
