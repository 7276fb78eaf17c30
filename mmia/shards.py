"""Streaming reader for img2dataset / webdataset shards.

The reader is a chain of plain generators (webdataset style):
shard urls → tar members → grouped samples → validated `Sample`s, with `Skip` records for
bad input. Skips travel down the stream (also out of DataLoader workers) and are counted by
whoever consumes it, so one bad sample never ends a run and nothing is lost silently.

Bounds on hostile input (module constants; tests may shorten them):

- Remote shards (http(s), sftp, ftps, scp through `curl`; `pipe:` commands) end as a counted
  `unreadable_shard` (nothing read) or `truncated_shard` (a prefix read) when no byte arrives for
  `STALL_SECONDS` (60 s; set it with the environment variable ``MMIA_STALL_SECONDS``). curl also
  gives up on connecting after min(30 s, the stall limit) and on a transfer slower than
  `MIN_BYTES_PER_SECOND` over twice the stall limit. curl never retries: a retry after part of a
  body would append a second copy to the stream.
- Every child process (curl, a `pipe:` command and its own children) is killed when the stream is
  closed early and when the process (on Linux: the thread) that opened it dies. Other schemes
  (gs, ais, hf) run webdataset's own commands: killed on closing and on stalls only.
- A tar member larger than its cap is skipped from its header, never read
  (`member_too_large`): images `MAX_IMAGE_MEMBER_BYTES`, captions and json sidecars
  `MAX_TEXT_MEMBER_BYTES`; parts mmia does not use are not read at all. Compressed shards are
  decompressed in bounded steps, so a small `.tar.gz` of a huge member costs time, not memory.
- A member's header members (pax headers, GNU long names, a GNU sparse map), which tarfile reads
  whole, over `MAX_HEADER_MEMBER_BYTES` in all or more than `MAX_HEADER_CHAIN` in a row end
  their shard as a `truncated_shard`, unread; so does a corrupt or cut-off header after the
  first, where tarfile would end the archive silently.
- Captions longer than `MAX_CAPTION_BYTES` in UTF-8 (`caption_too_long`) or holding a word
  longer than `MAX_CAPTION_WORD_CHARS` (`caption_word_too_long`) are refused, never truncated:
  open_clip's byte-level BPE is super-linear in word length (experiments/bench_tokenizer.py).
"""

from __future__ import annotations

import bz2
import ctypes
import functools
import gzip
import hashlib
import html
import json
import lzma
import os
import posixpath
import re
import select
import signal
import subprocess
import sys
import tarfile
import tempfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from urllib.parse import urlparse

import braceexpand

from mmia.errors import MmiaError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# Worst accepted caption ~20 ms in open_clip's tokenizer (experiments/bench_tokenizer.py); CLIP
# reads only 77 tokens (some 300 English characters, fewer in other scripts) of any caption.
MAX_CAPTION_BYTES = 1_024
MAX_CAPTION_WORD_CHARS = 64  # the longest letter or symbol run open_clip's BPE takes in one piece
MAX_IMAGE_MEMBER_BYTES = 64 << 20
MAX_TEXT_MEMBER_BYTES = 1 << 20  # a caption or json sidecar
MAX_HEADER_MEMBER_BYTES = 1 << 20  # pax headers, GNU long names: tarfile reads them whole
MAX_HEADER_CHAIN = 8  # header members in front of one member (pax global, pax, GNU long names)
MIN_BYTES_PER_SECOND = 1024  # curl's floor, averaged over twice the stall limit
TAR_BUFFER_BYTES = 1 << 20


def _env_seconds(name: str, default: float) -> float:
    """A number of seconds from the environment; NaN where it is not a number (refused on use)."""
    raw = os.environ.get(name, "").strip()
    try:
        return float(raw) if raw else default
    except ValueError:
        return float("nan")


STALL_SECONDS = _env_seconds("MMIA_STALL_SECONDS", 60.0)


def stall_seconds() -> float:
    """The stall limit in force; MmiaError when MMIA_STALL_SECONDS is not a positive number."""
    if not 0 < STALL_SECONDS < float("inf"):
        raise MmiaError(f"MMIA_STALL_SECONDS must be a positive number of seconds, got "
                        f"{os.environ.get('MMIA_STALL_SECONDS', STALL_SECONDS)!r}")
    return STALL_SECONDS


def printable(text: str) -> str:
    """`text`, always encodable as UTF-8: undecodable bytes (surrogate escapes) become `\\xNN`."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that no byte decoded to
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


@dataclass
class Sample:
    """One image–caption pair; `key` is unique across the whole input (shard-qualified)."""

    key: str
    image_bytes: bytes
    caption: str
    meta: dict = field(default_factory=dict)
    url: str = ""

    @functools.cached_property
    def image_digest(self) -> str:
        return digest(self.image_bytes)

    @functools.cached_property
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

    def __post_init__(self) -> None:  # keys, urls and details end up in UTF-8 outputs
        self.key, self.url, self.detail = map(printable, (self.key, self.url, self.detail))


def digest(data: bytes) -> str:
    """Content digest used as cache identity (128-bit hex)."""
    return hashlib.sha256(data).hexdigest()[:32]


# the schemes webdataset's gopen opens with a handler other than a plain file (its
# `gopen_schemes`, spelled out: importing webdataset imports torch; tests/test_shards checks it)
REMOTE_SCHEMES = frozenset({"ais", "ftps", "gs", "hf", "htgs", "http", "https", "pipe", "scp",
                            "sftp"})


def is_remote(url: str) -> bool:
    """True where webdataset's gopen hands the URL's scheme to a non-file handler (pipe:, http…)."""
    try:
        scheme = urlparse(url).scheme
    except ValueError:  # e.g. an unbalanced "[" in a netloc: gopen cannot open it either
        return False
    return scheme in REMOTE_SCHEMES


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
    if any(is_remote(url) for url in urls):
        stall_seconds()  # a bad MMIA_STALL_SECONDS is named before any work
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


def split_for_worker(urls: Sequence[str]) -> list[str]:
    """Shards this DataLoader worker should read (all of them outside a worker). Ranks of a
    torchrun take their share before (`mmia.embed.embed_shards(shard_share=…)`)."""
    from torch.utils.data import get_worker_info

    info = get_worker_info()
    wid, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
    return list(urls)[wid::nworkers]


class ShardStalled(OSError):
    """No byte of a remote shard arrived within the stall limit."""


def _open(url: str):
    """A binary stream: local files directly, remote urls through a child process.

    http(s), sftp, ftps and scp run our own `curl` (timeouts, no retries), `pipe:` runs the
    command under a shell that takes its children down with it; other schemes go through
    webdataset's gopen. Every child is read under the stall limit.
    """
    if not is_remote(url):
        return open(local_path(url), "rb")
    from webdataset import utils
    from webdataset.gopen import Pipe, gopen, gopen_curl, gopen_pipe, gopen_schemes, rewrite_url

    target = rewrite_url(url)
    handler = gopen_schemes.get(urlparse(target).scheme)
    if handler is gopen_curl:
        return _ChildStream.spawn(_curl_command(target), "curl", ignore_status=(23, 141),
                                  capture_stderr=True, death_signal=signal.SIGKILL)
    if handler is gopen_pipe:
        if utils.enforce_security:
            raise ValueError("pipe: urls are refused while WDS_SECURE is set")
        return _ChildStream.spawn(_pipe_command(target.removeprefix("pipe:")), "pipe command",
                                  ignore_status=(141,), death_signal=signal.SIGTERM)
    stream = gopen(url, "rb")
    if isinstance(stream, Pipe):  # kept alive with us: its __del__ would wait for the child
        return _ChildStream(stream.proc, "gopen command", tuple(stream.ignore_status),
                            owner=stream)
    return stream


def _curl_command(url: str) -> list[str]:
    """curl writing `url` to stdout, unbuffered, with a connect timeout and a speed floor."""
    limit = stall_seconds()
    return ["curl", "--fail", "--silent", "--show-error", "--location", "--no-buffer",
            "--connect-timeout", f"{min(30.0, limit):g}",
            "--speed-limit", str(MIN_BYTES_PER_SECOND), "--speed-time", str(int(2 * limit) + 1),
            url]


# The command runs in the background so that the shell can take the TERM its parent's death
# sends (a trap waits for a foreground command) and kill its whole process group.
_PIPE_WRAPPER = 'trap "kill -9 0" TERM; eval "$1" & wait $!'


def _pipe_command(command: str) -> list[str]:
    return ["/bin/sh", "-c", _PIPE_WRAPPER, "sh", command]


@functools.lru_cache(maxsize=1)
def _prctl() -> Callable | None:
    """libc's prctl on Linux (resolved before any fork), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _dies_with_parent(death_signal: int) -> Callable[[], None] | None:
    """A `preexec_fn` that makes the child receive `death_signal` when its parent dies."""
    prctl, parent = _prctl(), os.getpid()
    if prctl is None:
        return None

    def preexec() -> None:
        prctl(1, int(death_signal))  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


class _ChildStream:
    """A child process's stdout as a shard stream: bounded waits, the child killed on abandon."""

    def __init__(self, proc: subprocess.Popen, name: str, ignore_status: tuple[int, ...],
                 stderr=None, own_group: bool = False, owner=None):
        self.proc, self.name, self.ignore_status = proc, name, (0, *ignore_status)
        self.stderr, self.own_group, self.owner = stderr, own_group, owner
        self.fd = proc.stdout.fileno()
        self.poller = select.poll()
        self.poller.register(self.fd, select.POLLIN)
        self.eof = self.killed = False

    @classmethod
    def spawn(cls, args: list[str], name: str, ignore_status: tuple[int, ...],
              death_signal: int, capture_stderr: bool = False) -> _ChildStream:
        """Start `args` in a session of its own that dies with this process."""
        stderr = tempfile.TemporaryFile() if capture_stderr else None
        try:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=stderr, bufsize=0, start_new_session=True,
                                    preexec_fn=_dies_with_parent(death_signal))
        except BaseException:
            if stderr is not None:
                stderr.close()
            raise
        return cls(proc, name, ignore_status, stderr, own_group=True)

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes as soon as some arrive; ShardStalled after the stall limit."""
        if size is None or size < 0:
            return b"".join(iter(lambda: self.read(1 << 16), b""))
        if size == 0:
            return b""
        limit = stall_seconds()
        if not self.poller.poll(limit * 1000):
            self.kill()
            raise ShardStalled(f"stalled: no data for {limit:g} s (limit MMIA_STALL_SECONDS)")
        data = os.read(self.fd, size)
        self.eof = self.eof or not data
        return data

    def drain(self, limit: int) -> None:
        """Read and drop what the child still writes after the archive (tar padding, up to
        `limit` bytes), so that it can exit normally rather than of a broken pipe."""
        try:
            while limit > 0 and (data := self.read(min(limit, 1 << 16))):
                limit -= len(data)
        except ShardStalled:  # the archive was whole; the child is killed, nothing is lost
            pass

    def kill(self) -> None:
        """SIGKILL the child (and its process group) unless it has exited already."""
        if self.proc.poll() is not None:
            return
        self.killed = True
        try:
            if self.own_group:
                os.killpg(self.proc.pid, signal.SIGKILL)
            else:
                self.proc.kill()
        except ProcessLookupError:
            pass

    def close(self, abandon: bool = False) -> str | None:
        """Close the pipe and reap the child; why it failed, if it did and was not killed by us.

        `abandon` (the reader stopped early or failed): a child still writing is killed.
        """
        if self.proc.stdout.closed:
            return None
        self.proc.stdout.close()
        if abandon and not self.eof:
            self.kill()
        limit = stall_seconds()
        try:
            status = self.proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.wait()
            return f"{self.name} did not exit within {limit:g} s of its output being closed"
        finally:
            message = self._stderr_tail()
        if self.killed or status in self.ignore_status:
            return None
        how = f"exit {status}" if status >= 0 else f"killed by signal {-status}"
        return f"{self.name}: {how}" + (f" ({message})" if message else "")

    def _stderr_tail(self) -> str:
        """The last line the child wrote to its captured stderr, if any."""
        if self.stderr is None:
            return ""
        self.stderr.seek(0, os.SEEK_END)
        self.stderr.seek(max(0, self.stderr.tell() - 300))
        text = self.stderr.read().decode("utf-8", "replace").strip()
        self.stderr.close()
        self.stderr = None
        return text.splitlines()[-1] if text else ""


class _Prefixed:
    """A stream with `head` (bytes already read from it) put back in front."""

    def __init__(self, head: bytes, stream):
        self.head, self.stream = head, stream

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:  # everything left: the head and the whole stream
            data, self.head = self.head + self.stream.read(), b""
            return data
        if self.head:
            data, self.head = self.head[:size], self.head[size:]
            return data
        return self.stream.read(size)


_BZIP2_MAGIC = re.compile(rb"BZh[1-9]1AY&SY")  # stream header, block size, first block's magic


def _decompressed(stream):
    """`stream` as a plain tar stream: gzip, bzip2 and xz are decompressed in bounded steps.

    tarfile's own `r|*` decompresses without a bound and re-copies its buffer on every read,
    so skipping a huge, highly compressed member took minutes (and a bzip2 bomb, memory).
    A first block that is a valid tar header means a plain tar, whatever its first bytes (a
    member may be named "BZh…"); otherwise a compressor's full magic picks the decompressor.
    """
    head = _read_up_to(stream, tarfile.BLOCKSIZE)
    whole = _Prefixed(head, stream)
    if _is_tar_header(head):
        return whole
    if head.startswith(b"\x1f\x8b\x08"):
        return gzip.GzipFile(fileobj=whole, mode="rb")
    if _BZIP2_MAGIC.match(head):
        return bz2.BZ2File(whole, "rb")
    if head.startswith((b"\xfd7zXZ\x00", b"\x5d\x00\x00\x80")):  # xz, legacy lzma
        return lzma.LZMAFile(whole, "rb")
    return whole


def _read_up_to(stream, size: int) -> bytes:
    """The first `size` bytes of `stream` (fewer at its end)."""
    head = b""
    while len(head) < size and (chunk := stream.read(size - len(head))):
        head += chunk
    return head


def _is_tar_header(block: bytes) -> bool:
    """True when `block` is a whole tar header block with a correct checksum."""
    if len(block) != tarfile.BLOCKSIZE:
        return False
    try:
        return tarfile.nti(block[148:156]) in tarfile.calc_chksums(block)
    except (tarfile.HeaderError, ValueError):  # the checksum field is not a number
        return False


# tarfile reads these header members (pax extended headers, GNU long names and links) whole
# into memory, before any member cap could apply.
_HEADER_MEMBER_KINDS = {
    tarfile.XHDTYPE: "pax", tarfile.SOLARIS_XHDTYPE: "pax", tarfile.XGLTYPE: "pax global",
    tarfile.GNUTYPE_LONGNAME: "GNU long-name", tarfile.GNUTYPE_LONGLINK: "GNU long-link",
}
_HEADER_ENDS = {  # a header read that fails after the first member: what happened to the shard
    tarfile.EmptyHeaderError: "the archive ends without its end-of-archive blocks",
    tarfile.TruncatedHeaderError: "the archive ends inside a member header",
    tarfile.InvalidHeaderError: "a corrupt member header",
}


class _HeaderBudget:
    """The tar stream while one member's header members (pax headers, GNU long names, a GNU
    sparse map) are read: reads beyond `left` bytes in all are refused."""

    def __init__(self, stream, left: int):
        self.stream, self.left, self.headers = stream, left, 1

    def read(self, size: int) -> bytes:
        if size > self.left:
            raise tarfile.SubsequentHeaderError(
                f"the header members of one member take over {MAX_HEADER_MEMBER_BYTES:,} bytes")
        self.left -= size
        return self.stream.read(size)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


class _CappedTarInfo(tarfile.TarInfo):
    """A TarInfo whose header members are read in bounded memory and bounded recursion, and
    whose broken headers are errors: tarfile ends the archive silently at a header that is
    corrupt or cut off (the rest of the shard lost, uncounted). Any refusal is a tar read error:
    the shard ends there as a `truncated_shard`, its prefix kept.
    """

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile):
        """The next member; a header after the first that is cut off or corrupt is an error."""
        try:
            return super().fromtarfile(tar)
        except tuple(_HEADER_ENDS) as exc:
            if tar.offset == 0:  # tarfile's own errors: an empty file, not a tar
                raise
            what = next(text for kind, text in _HEADER_ENDS.items() if isinstance(exc, kind))
            raise tarfile.SubsequentHeaderError(f"{what} at byte {tar.offset:,}") from None

    def _proc_member(self, tar: tarfile.TarFile):
        """The member this header starts, its header members read under a budget."""
        kind = _HEADER_MEMBER_KINDS.get(self.type)
        if kind is not None and self.size > MAX_HEADER_MEMBER_BYTES:
            raise tarfile.SubsequentHeaderError(
                f"{kind} header member of {self.size:,} bytes > {MAX_HEADER_MEMBER_BYTES:,} "
                f"(at byte {self.offset:,})")
        stream = tar.fileobj
        if isinstance(stream, _HeaderBudget):  # after a header member: tarfile recurses
            stream.headers += kind is not None
            if stream.headers > MAX_HEADER_CHAIN:
                raise tarfile.SubsequentHeaderError(
                    f"over {MAX_HEADER_CHAIN} header members in a row (at byte {self.offset:,})")
            return super()._proc_member(tar)
        if kind is None and self.type != tarfile.GNUTYPE_SPARSE:
            return super()._proc_member(tar)
        tar.fileobj = _HeaderBudget(stream, MAX_HEADER_MEMBER_BYTES
                                    + MAX_HEADER_CHAIN * tarfile.BLOCKSIZE)
        try:
            return super()._proc_member(tar)
        finally:
            tar.fileobj = stream


READ_ERRORS = (tarfile.TarError, EOFError, OSError, ValueError, zlib.error, lzma.LZMAError)


def tar_members(urls: Iterable[str]) -> Iterator[tuple[str, str, bytes] | Skip]:
    """(url, member name, bytes) for every regular file of every shard; broken shards → Skip.

    A shard that cannot be opened, whose opener fails (an http 404, a `pipe:` command that
    exits non-zero) or that stalls before its first member is one `unreadable_shard`; one that
    breaks off (or stalls) after some members is a `truncated_shard` (its intact prefix is
    kept). A member over its size cap is one `member_too_large` (raw key) and is never read;
    a part mmia does not use is passed on empty, unread.
    """
    for url in urls:
        try:
            stream = _open(url)
        except Exception as exc:  # noqa: BLE001 - any opener failure is one unreadable shard
            yield Skip("unreadable_shard", url=url, detail=str(exc))
            continue
        count, error = 0, None
        try:
            with tarfile.open(fileobj=_decompressed(stream), mode="r|",
                              bufsize=TAR_BUFFER_BYTES, tarinfo=_CappedTarInfo) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    count += 1
                    yield _member(url, tar, member)
            if isinstance(stream, _ChildStream):
                stream.drain(TAR_BUFFER_BYTES)
        except READ_ERRORS as exc:
            error = exc
        except BaseException:  # the consumer stopped early (GeneratorExit) or was interrupted
            _close(stream, abandon=True)
            raise
        close_error = _close(stream, abandon=error is not None)
        yield from _shard_skips(url, count, error, close_error)


def _member(url: str, tar: tarfile.TarFile, member: tarfile.TarInfo):
    """One member's (url, name, bytes), b"" for an unused part, or a `member_too_large` Skip."""
    key, ext = split_name(member.name)
    cap = _member_cap(ext)
    if cap is None:
        return url, member.name, b""
    if member.size > cap:
        return Skip("member_too_large", key=key, url=url,
                    detail=f"{member.name}: {member.size:,} bytes > {cap:,}")
    return url, member.name, tar.extractfile(member).read()


def _member_cap(ext: str) -> int | None:
    """Bytes a part may have: images, captions and sidecars are capped; None for unused parts."""
    if ext in IMAGE_EXTS:
        return MAX_IMAGE_MEMBER_BYTES
    if ext in ("txt", "json") or ext.endswith(".txt"):
        return MAX_TEXT_MEMBER_BYTES
    return None


def _shard_skips(url: str, count: int, error: BaseException | None,
                 close_error: str | None) -> Iterator[Skip]:
    """The Skip, if any, that a shard's read error and its opener's exit status amount to."""
    stalled = isinstance(error, ShardStalled)
    if count == 0 and (stalled or close_error is not None):
        yield Skip("unreadable_shard", url=url, detail=str(error) if stalled else close_error)
    elif error is not None or close_error is not None:
        empty = count == 0 and "empty" in str(error).lower()
        yield Skip("empty_shard" if empty else "truncated_shard", url=url,
                   detail=str(error or close_error))
    elif count == 0:
        yield Skip("empty_shard", url=url)


def _close(stream, abandon: bool = False) -> str | None:
    """Close a shard stream; the error a child process or download reports on closing, if any."""
    try:
        if isinstance(stream, _ChildStream):
            return stream.close(abandon)
        stream.close()
    except Exception as exc:  # noqa: BLE001 - a close that fails is reported, never raised
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


@dataclass
class Group:
    """The consecutive members of one sample: {ext: bytes} under their raw (tar) key."""

    url: str
    raw_key: str
    parts: dict[str, bytes]

    def __post_init__(self) -> None:
        self.key = printable(self.raw_key)  # what the sample is known by

    @property
    def renamed(self) -> bool:
        """The member name had bytes that are not UTF-8 (escaped in `key`)."""
        return self.key != self.raw_key


def group_members(members: Iterable[tuple[str, str, bytes] | Skip]) -> Iterator[Group | Skip]:
    """Group consecutive members sharing a key into `Group`s.

    Keys are compared as printed, so a name that is not UTF-8 and one that reads the same once
    escaped are one key (a `duplicate_key`). A sample with a `member_too_large` part is dropped
    whole: that Skip is its only record.
    """
    current: Group | None = None
    seen: set[tuple[str, str]] = set()
    dropping: tuple[str, str] | None = None  # the rest of a duplicate or oversized sample
    for item in members:
        if isinstance(item, Skip):
            if item.reason == "member_too_large":
                sample = (item.url, item.key)
                if dropping == sample:  # already counted (a duplicate, or another large part)
                    continue
                if current is not None and (current.url, current.key) == sample:
                    current = None
                seen.add(sample)
                dropping = sample
            if current is not None:
                yield current
                current = None
            yield item
            continue
        url, name, data = item
        raw_key, ext = split_name(name)
        if current is not None and (current.url, current.raw_key) == (url, raw_key):
            if ext not in current.parts:
                current.parts[ext] = data
                continue
        key = printable(raw_key)
        if dropping == (url, key):
            continue
        dropping = None
        if current is not None:
            yield current
            current = None
        if (url, key) in seen:
            dropping = (url, key)
            yield Skip("duplicate_key", key=key, url=url, detail=f"{name} repeats key {key!r}")
            continue
        seen.add((url, key))
        current = Group(url, raw_key, {ext: data})
    if current is not None:
        yield current


def to_samples(groups: Iterable[Group | Skip], labels: dict[str, str]) -> Iterator[Sample | Skip]:
    """Validate grouped members into `Sample`s; bad ones become `Skip`s.

    Keys are always UTF-8: a member name's undecodable bytes are written `\\xNN` (a
    `member_name_not_utf8` warning).
    """
    for item in groups:
        if isinstance(item, Skip):
            yield _qualified(item, labels)
            continue
        url, parts = item.url, item.parts
        key = printable(f"{labels.get(url, url)}/{item.key}")
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
        refusal = caption_refusal(caption)
        if refusal is not None:
            yield Skip(refusal[0], key=key, url=url, detail=refusal[1])
            continue
        meta = _sidecar(parts.get("json"))
        if meta is None:
            meta = {}
            yield Skip("bad_json_sidecar", key=key, url=url, fatal_to_sample=False)
        if item.renamed:
            yield Skip("member_name_not_utf8", key=key, url=url, fatal_to_sample=False,
                       detail="bytes that are not UTF-8 are written \\xNN in the key")
        yield Sample(key=key, image_bytes=parts[image_ext], caption=caption, meta=meta, url=url)


def _qualified(skip: Skip, labels: dict[str, str]) -> Skip:
    """A reader Skip whose raw sample key is prefixed with its shard's label, like sample keys."""
    if not skip.key or skip.url not in labels:
        return skip
    return replace(skip, key=f"{labels[skip.url]}/{skip.key}")


def _sidecar(data: bytes | None) -> dict | None:
    """The json sidecar as a dict ({} when there is none); None when it is not a json object."""
    if data is None:
        return {}
    try:
        meta = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: deep nesting
        return None
    return meta if isinstance(meta, dict) else None


# Pieces open_clip's tokenizer BPE-encodes whole: runs of letters and runs of symbols (digits
# go one by one). Python's \w also counts No/Nl numbers as letters: a conservative superset.
_BPE_WORD = re.compile(r"[^\W\d_]+|(?:[^\w\s]|_)+")


def caption_refusal(caption: str) -> tuple[str, str] | None:
    """(reason, detail) when a caption is too long for the tokenizer to take in milliseconds.

    Lengths count the text as open_clip's tokenizer sees it (after ftfy and HTML unescaping),
    so that no entity, control character or mojibake can join short words into a long one.
    """
    size = len(caption.encode("utf-8"))
    if size > MAX_CAPTION_BYTES:
        return "caption_too_long", f"{size:,} bytes > {MAX_CAPTION_BYTES:,}"
    cleaned = _tokenizer_clean(caption)
    size = len(cleaned.encode("utf-8", "surrogatepass"))
    if size > MAX_CAPTION_BYTES:
        return "caption_too_long", f"{size:,} bytes once cleaned > {MAX_CAPTION_BYTES:,}"
    longest = max(map(len, _BPE_WORD.findall(cleaned)), default=0)
    if longest > MAX_CAPTION_WORD_CHARS:
        return "caption_word_too_long", f"a word of {longest:,} chars > {MAX_CAPTION_WORD_CHARS}"
    return None


def _tokenizer_clean(text: str) -> str:
    """open_clip's `basic_clean`: ftfy, then HTML entities unescaped twice."""
    try:
        import ftfy
    except ImportError:  # open_clip's tokenizer needs ftfy; other tokenizers do not clean
        fixed = text
    else:
        fixed = ftfy.fix_text(text)
    return html.unescape(html.unescape(fixed))


def _caption_ext(parts: dict[str, bytes]) -> str | None:
    """The caption part: "txt", else the first `*.txt` one in sorted order ("caption.txt")."""
    if "txt" in parts:
        return "txt"
    return min((ext for ext in parts if ext.endswith(".txt")), default=None)


def read_shard(url: str, labels: dict[str, str]) -> Iterator[Sample | Skip]:
    """The `Sample`s and `Skip`s of one shard, keys under its label in `labels`."""
    return to_samples(group_members(tar_members([url])), labels)


def read_samples(patterns: str | Sequence[str], split: bool = True) -> Iterator[Sample | Skip]:
    """Stream `Sample`s and `Skip`s from shard patterns (this DataLoader worker's share).

    Keys are `shard label/sample key`, labels from `shard_labels` over these patterns' shards
    only, so a role's keys stay the same whatever other shards are read elsewhere.
    """
    urls = expand_patterns(patterns)
    labels = shard_labels(urls)
    mine = split_for_worker(urls) if split else urls
    return to_samples(group_members(tar_members(mine)), labels)
