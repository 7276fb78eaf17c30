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
import posixpath
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlparse

import braceexpand

from mmia.errors import MmiaError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
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
    """True where webdataset's gopen hands the URL's scheme to a non-file handler (pipe:, http…)."""
    from webdataset.gopen import gopen_schemes

    try:
        scheme = urlparse(url).scheme
    except ValueError:  # e.g. an unbalanced "[" in a netloc: gopen cannot open it either
        return False
    return scheme in gopen_schemes and scheme not in ("__default__", "file")


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
                hint = " (no webdataset handler for this scheme: use pipe:)" if "://" in url else ""
                raise MmiaError(
                    f"shard pattern {pattern!r} names a missing file {url!r}{hint}: "
                    "check the path and the brace range"
                )
        urls.extend(expanded)
    return list(dict.fromkeys(urls))


def shard_labels(urls: Sequence[str]) -> dict[str, str]:
    """Label each shard by the shortest path suffix (no .tar) that tells it apart from `urls`.

    At least two parts where the path has a folder (`/data/cc12m/00003.tar` → `cc12m/00003`);
    a remote URL's host is its top folder; shards whose whole paths coincide keep their URL.
    O(n · depth): all undecided urls are tried at one suffix length, clashing ones go longer.
    """
    parts = {u: _path_parts(u) for u in urls}
    labels: dict[str, str] = {}
    pending, depth = list(parts), 2
    while pending and depth <= max(len(parts[u]) for u in pending):
        suffix = {u: "/".join(parts[u][-depth:]) for u in pending}
        counts = Counter(suffix.values())
        labels.update((u, suffix[u]) for u in pending if counts[suffix[u]] == 1)
        pending, depth = [u for u in pending if counts[suffix[u]] > 1], depth + 1
    labels.update((u, u) for u in pending)
    return labels


def _path_parts(url: str) -> list[str]:
    """Folders and stem of a shard's path (host first for remote urls), without .tar."""
    if is_remote(url):
        parsed = urlparse(url)
        path = f"{parsed.netloc}/{parsed.path}"
    else:
        path = local_path(url)
    path = posixpath.normpath(_strip_tar(path))
    return [p for p in path.split("/") if p not in ("", ".", "..")] or [url]


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
    """A binary stream: local files directly, remote urls through webdataset's gopen."""
    if not is_remote(url):
        return open(local_path(url), "rb")
    import webdataset as wds
    from webdataset.gopen import Pipe

    stream = wds.gopen(url, "rb")
    return _StatusOnClose(stream) if isinstance(stream, Pipe) else stream


class _StatusOnClose:
    """A gopen `Pipe` whose exit status is checked on close only.

    `Pipe.read` raises once the command has exited non-zero, dropping output still in the pipe,
    so whether a failing command's intact prefix was kept depended on timing.
    """

    def __init__(self, pipe):
        self.pipe = pipe

    def read(self, size: int = -1) -> bytes:
        return self.pipe.stream.read(size)

    def close(self) -> None:
        self.pipe.close()


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
    """(key, lower-cased ext) split at the first dot of the base name, as webdataset does.

    `sub/000.caption.txt` → ("sub/000", "caption.txt"); a base name without a dot, or starting
    with one (which webdataset drops), is all key with ext "" (so it is skipped, and counted).
    """
    base = name.rsplit("/", 1)[-1]
    stem, dot, ext = base.partition(".")
    if not stem or not dot:
        return name, ""
    return name[: len(name) - len(base) + len(stem)], ext.lower()


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
        caption_ext = _caption_ext(parts)
        if caption_ext is None:
            yield Skip("missing_caption", key=key, url=url)
            continue
        if not parts[image_ext]:
            yield Skip("empty_image", key=key, url=url)
            continue
        try:
            caption = parts[caption_ext].decode("utf-8").strip()
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


def _caption_ext(parts: dict[str, bytes]) -> str | None:
    """The caption part: "txt", else the first `*.txt` one in sorted order ("caption.txt")."""
    if "txt" in parts:
        return "txt"
    return min((ext for ext in parts if ext.endswith(".txt")), default=None)


def read_samples(patterns: str | Sequence[str], split: bool = True) -> Iterator[Sample | Skip]:
    """Stream `Sample`s and `Skip`s from shard patterns (this rank's and worker's share).

    Keys are `shard label/sample key`, labels from `shard_labels` over these patterns' shards
    only, so a role's keys stay the same whatever other shards are read elsewhere.
    """
    urls = expand_patterns(patterns)
    labels = shard_labels(urls)
    mine = split_for_rank_and_worker(urls) if split else urls
    return to_samples(group_members(tar_members(mine)), labels)
