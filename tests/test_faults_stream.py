"""Fault suite, streaming: stalled servers, orphaned children, oversized members and captions,
deeply nested sidecars and member names that are not UTF-8 (issue 14, cases 7, 9 and 10)."""

from __future__ import annotations

import http.server
import io
import os
import re
import subprocess
import sys
import tarfile
import threading
import time
import tracemalloc

import pytest
from shardgen import (
    add_member,
    good_members,
    jpeg_bytes,
    sample_members,
    write_compressed_shard,
    write_header_bomb_shard,
    write_header_chain_shard,
    write_raw_name_shard,
    write_shard,
    write_sparse_map_shard,
)

import mmia.shards
from mmia.embed import embed_shards
from mmia.errors import MmiaError
from mmia.shards import Sample, Skip, read_samples, tar_members

IMG = jpeg_bytes(3)
HAS_PROC = os.path.exists("/proc/self/stat")


def collect(patterns) -> tuple[list[Sample], list[Skip]]:
    samples, skips = [], []
    for item in read_samples(patterns):
        (samples if isinstance(item, Sample) else skips).append(item)
    return samples, skips


def finishes(fn, seconds: float):
    """fn()'s result; fails the test if it has not returned within `seconds` (a hang)."""
    box: dict = {}
    thread = threading.Thread(target=lambda: box.setdefault("result", fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    return box["result"]


@pytest.fixture
def short_stall(monkeypatch):
    """A 1 s stall limit, for tests in which no byte ever arrives."""
    monkeypatch.setattr(mmia.shards, "STALL_SECONDS", 1.0, raising=False)


@pytest.fixture
def startup_stall(monkeypatch):
    """A 3 s stall limit, for tests in which bytes must arrive: it also covers the start-up of
    the child (curl, a Python interpreter) before its first byte, slow on a loaded CI machine."""
    monkeypatch.setattr(mmia.shards, "STALL_SECONDS", 3.0, raising=False)


# ---------------------------------------------------------------- case 7: stalls and children


class StallingServer(http.server.ThreadingHTTPServer):
    """Serves `prefix` (no headers at all when None) of a `length`-byte body, then stalls."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), StallingHandler)
        self.prefix: bytes | None = None
        self.length = 0
        self.release = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/laion/00000.tar"


class StallingHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        server = self.server
        if server.prefix is not None:
            self.send_response(200)
            self.send_header("Content-Length", str(server.length))
            self.end_headers()
            self.wfile.write(server.prefix)
            self.wfile.flush()
        server.release.wait(60)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def stalling():
    server = StallingServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


def tar_and_cut(n_samples: int, keep_samples: int) -> tuple[bytes, bytes]:
    """A shard of `n_samples` and its prefix that breaks off inside sample `keep_samples`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in good_members(0, n_samples):
            add_member(tar, name, data)
    data = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        cut = tar.getmembers()[3 * keep_samples].offset + 100  # inside the next header
    return data, data[:cut]


def test_a_server_that_never_sends_headers_is_an_unreadable_shard(stalling, short_stall):
    samples, skips = finishes(lambda: collect(stalling.url), 20)
    assert samples == []
    assert [s.reason for s in skips] == ["unreadable_shard"]
    assert "stalled: no data for 1 s" in skips[0].detail


def test_a_body_that_stalls_keeps_its_prefix_as_a_truncated_shard(stalling, startup_stall):
    data, stalling.prefix = tar_and_cut(4, 2)
    stalling.length = len(data)
    samples, skips = finishes(lambda: collect(stalling.url), 20)
    assert [s.key for s in samples] == ["laion/00000/000000000", "laion/00000/000000001"]
    assert [s.reason for s in skips] == ["truncated_shard"]
    assert "stalled" in skips[0].detail


def test_a_pipe_command_that_stalls_is_an_unreadable_shard(short_stall):
    samples, skips = finishes(lambda: collect("pipe:sleep 30"), 20)
    assert samples == [] and [s.reason for s in skips] == ["unreadable_shard"]
    assert "stalled" in skips[0].detail


SLOW_WRITER = """
import sys, time
with open(sys.argv[1], "rb") as f:
    for block in iter(lambda: f.read(2048), b""):
        sys.stdout.buffer.write(block)
        sys.stdout.flush()
        time.sleep(0.4)
"""


def test_a_shard_that_trickles_in_slower_than_the_stall_limit_is_read_whole(tmp_path,
                                                                            startup_stall):
    """The stall limit is about silence, not total time: 4 s of 0.4 s gaps is fine."""
    path = write_shard(tmp_path / "00000.tar", good_members(0, 3))
    assert os.path.getsize(path) // 2048 * 0.4 > mmia.shards.STALL_SECONDS
    (tmp_path / "slow.py").write_text(SLOW_WRITER)
    samples, skips = finishes(lambda: collect(f"pipe:{sys.executable} {tmp_path}/slow.py {path}"),
                              60)
    assert (len(samples), skips) == (3, [])


def test_the_stall_limit_comes_from_the_environment(tmp_path):
    code = "import mmia.shards as s; print(s.STALL_SECONDS)"
    env = {**os.environ, "MMIA_STALL_SECONDS": "7.5"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "7.5", out.stderr


def test_a_bad_stall_limit_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(mmia.shards, "STALL_SECONDS", float("nan"))
    monkeypatch.setenv("MMIA_STALL_SECONDS", "soon")
    with pytest.raises(MmiaError, match="MMIA_STALL_SECONDS must be a positive number.*'soon'"):
        mmia.shards.expand_patterns("http://127.0.0.1:9/{00000..00001}.tar")


def proc_stat(pid: int) -> tuple[str, str, int, int] | None:
    """(comm, state, ppid, session) of a live process, None once it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    comm, rest = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
    if rest[0] in ("Z", "X"):
        return None
    return comm, rest[0], int(rest[1]), int(rest[3])


def descendants(root: int) -> dict[int, str]:
    """Live processes below `root` (children of children…, and their sessions' members)."""
    stats = {int(p): proc_stat(int(p)) for p in os.listdir("/proc") if p.isdigit()}
    stats = {pid: s for pid, s in stats.items() if s is not None}
    found: set[int] = set()
    while True:
        more = {pid for pid, s in stats.items()
                if pid not in found and (s[2] in found | {root} or s[3] in found)}
        if not more:
            return {pid: stats[pid][0] for pid in found}
        found |= more


def wait_for(condition, seconds: float):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    return condition()


@pytest.mark.skipif(not HAS_PROC, reason="needs /proc")
def test_closing_the_reader_early_kills_a_stalled_curl(stalling):
    data, stalling.prefix = tar_and_cut(4, 2)
    stalling.length = len(data)
    members = tar_members([stalling.url])
    assert next(members)[1] == "000000000.jpg"
    curl = wait_for(lambda: [p for p, c in descendants(os.getpid()).items() if c == "curl"], 5)
    assert len(curl) == 1
    finishes(members.close, 10)
    assert proc_stat(curl[0]) is None


CHILD = """
import sys
import mmia.shards
mmia.shards.STALL_SECONDS = 600.0
members = mmia.shards.tar_members([sys.argv[1]])
print("reading", flush=True)
next(members)
"""


@pytest.mark.skipif(not HAS_PROC, reason="needs /proc")
@pytest.mark.parametrize("kind", ["http", "pipe"])
def test_children_die_with_their_parent(stalling, kind):
    """SIGKILL the reading process: curl, or a pipe command with its own children, exits."""
    url = stalling.url if kind == "http" else "pipe:sleep 60 | cat"
    expected = {"curl"} if kind == "http" else {"sleep", "cat"}
    parent = subprocess.Popen([sys.executable, "-c", CHILD, url], stdout=subprocess.PIPE,
                              text=True)
    found: dict[int, str] = {}
    try:
        assert parent.stdout.readline().strip() == "reading"
        found = wait_for(lambda: expected <= set(descendants(parent.pid).values())
                         and descendants(parent.pid), 10)
        assert found, f"no {expected} below the reader"
        parent.kill()
        parent.wait()
        gone = wait_for(lambda: not any(proc_stat(p) for p in found), 10)
        assert gone, f"still running after their parent died: {found}"
    finally:
        parent.kill()
        parent.wait()
        for pid in found:  # clean up after a failure (the processes this test started)
            if proc_stat(pid) is not None:
                os.kill(pid, 9)


# ---------------------------------------------------------------- case 9: members and captions


@pytest.mark.parametrize(("mode", "level"), [("w", None), ("w:gz", None), ("w:bz2", None),
                                             ("w:bz2", 1), ("w:xz", None)])
def test_compressed_and_plain_shards_are_read(tmp_path, mode, level):
    kwargs = {} if level is None else {"compresslevel": level}
    path = write_compressed_shard(tmp_path / "00000.tar", good_members(0, 3), mode, **kwargs)
    samples, skips = collect(path)
    assert (len(samples), skips) == (3, [])
    assert samples[2].image_bytes == jpeg_bytes(2)


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_a_member_over_its_cap_drops_its_sample_unread(tmp_path, monkeypatch, mode):
    for name, cap in (("MAX_TEXT_MEMBER_BYTES", 1000), ("MAX_IMAGE_MEMBER_BYTES", 5000)):
        monkeypatch.setattr(mmia.shards, name, cap, raising=False)
    big_image = jpeg_bytes(4, size=96)
    assert len(big_image) > 5000
    members = (good_members(0, 1) + sample_members("longcap", IMG, b"y" * 1001)
               + sample_members("bigimg", big_image, b"ok")
               + sample_members("bigjson", IMG, b"ok", b" " * 1001)
               + [("atcap.jpg", IMG), ("atcap.txt", b"zz " * 333 + b"z"),
                  ("atcap.npy", b"\0" * 9000)])  # 1,000 bytes: at the cap; .npy is never read
    samples, skips = collect(write_compressed_shard(tmp_path / "00000.tar", members, mode))
    assert sorted(s.key.split("/")[-1] for s in samples) == ["000000000", "atcap"]
    folder = tmp_path.name
    assert sorted((s.reason, s.key, s.detail) for s in skips) == [
        ("member_too_large", f"{folder}/00000/bigimg",
         f"bigimg.jpg: {len(big_image):,} bytes > 5,000"),
        ("member_too_large", f"{folder}/00000/bigjson", "bigjson.json: 1,001 bytes > 1,000"),
        ("member_too_large", f"{folder}/00000/longcap", "longcap.txt: 1,001 bytes > 1,000"),
    ]


def test_a_huge_member_of_a_small_tar_gz_is_skipped_without_being_read(tmp_path):
    """A 13 MB .tar.gz holding a 3 GB caption, scaled down: 200 MB of zeros in 200 kB."""
    size = 200 << 20
    members = (good_members(0, 1) + [("huge.jpg", IMG), ("huge.txt", size)]
               + good_members(1, 1))
    path = write_compressed_shard(tmp_path / "00000.tar.gz", members, "w:gz", compresslevel=1)
    assert os.path.getsize(path) < size // 100
    tracemalloc.start()
    try:
        samples, skips = finishes(lambda: collect(path), 60)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak:,} bytes in memory at once"
    assert [s.key.split("/")[-1] for s in samples] == ["000000000", "000010000"]
    assert [s.reason for s in skips] == ["member_too_large"]
    assert skips[0].detail.startswith(f"huge.txt: {size:,} bytes > ")


@pytest.mark.parametrize("first", [b"BZhA1", b"BZh91AY&SY", b"\x1f\x8b\x08", b"\xfd7zXZ"])
def test_a_plain_tar_whose_first_name_starts_like_a_compressor_magic_is_read(tmp_path, first):
    """A valid tar header is a plain tar; only a compressor's whole magic picks a decompressor."""
    members = [(first + b".jpg", IMG), (first + b".txt", b"a cat")]
    members += [(name.encode(), data) for name, data in good_members(0, 1)]
    samples, skips = collect(write_raw_name_shard(tmp_path / "00000.tar", members))
    assert [s.caption for s in samples] == ["a cat", "a photo of item 0-0 seed 0"]
    assert [s.reason for s in skips if s.fatal_to_sample] == []


@pytest.mark.parametrize("size", [-1, None])
def test_reading_a_replayed_head_to_the_end_reads_the_whole_stream(size):
    stream = mmia.shards._Prefixed(b"head", io.BytesIO(b" and the rest"))
    assert stream.read(2) == b"he"
    assert stream.read(size) == b"ad and the rest"
    assert stream.read() == b""


@pytest.mark.parametrize(("kind", "name"), [("x", "pax"), ("g", "pax global"),
                                            ("L", "GNU long-name"), ("K", "GNU long-link")])
def test_an_oversized_header_member_ends_its_shard_unread(tmp_path, monkeypatch, kind, name):
    """tarfile reads a pax header or GNU long name whole: a 1.4 MB .tar.gz of a 300 MB pax
    header cost 900 MB of memory. Scaled down: a 1 MiB header against a 64 KiB cap."""
    monkeypatch.setattr(mmia.shards, "MAX_HEADER_MEMBER_BYTES", 64 << 10, raising=False)
    path = write_header_bomb_shard(tmp_path / "00000.tar.gz", kind, 1 << 20)
    samples, skips = collect(path)
    assert [s.key.split("/")[-1] for s in samples] == ["000000000"]
    assert [s.reason for s in skips] == ["truncated_shard"]
    assert re.match(rf"{name} header member of 1,04\d,\d{{3}} bytes > 65,536 \(at byte ",
                    skips[0].detail), skips[0].detail


@pytest.mark.parametrize(("count", "size", "detail"), [
    (400, 1000, "over 8 header members in a row"),  # tarfile: RecursionError, a traceback
    (3, 40_000, "the header members of one member take over 65,536 bytes"),
])
def test_a_long_chain_of_header_members_ends_its_shard(tmp_path, monkeypatch, count, size,
                                                       detail):
    """Each header member is under the cap; together they are not."""
    monkeypatch.setattr(mmia.shards, "MAX_HEADER_MEMBER_BYTES", 64 << 10, raising=False)
    samples, skips = collect(write_header_chain_shard(tmp_path / "00000.tar", count, size))
    assert [s.key.split("/")[-1] for s in samples] == ["000000000"]
    assert [s.reason for s in skips] == ["truncated_shard"]
    assert skips[0].detail.startswith(detail), skips[0].detail


def test_a_long_gnu_sparse_map_ends_its_shard_unread(tmp_path, monkeypatch):
    """tarfile keeps every entry of an old-GNU sparse map: an 0.8 MB .tar.gz of a 100 MB map
    cost 770 MB of memory. Scaled down: a 100 kB map against a 64 KiB cap."""
    monkeypatch.setattr(mmia.shards, "MAX_HEADER_MEMBER_BYTES", 64 << 10, raising=False)
    samples, skips = collect(write_sparse_map_shard(tmp_path / "00000.tar", 200))
    assert [s.key.split("/")[-1] for s in samples] == ["000000000"]
    assert [(s.reason, s.detail) for s in skips] == [
        ("truncated_shard", "the header members of one member take over 65,536 bytes")]


def _damaged_at_header(data: bytes, offset: int, damage: str) -> bytes:
    if damage == "cut inside":
        return data[: offset + 100]
    if damage == "cut before":
        return data[:offset]
    return data[: offset + 5] + bytes([data[offset + 5] ^ 0x55]) + data[offset + 6 :]


@pytest.mark.parametrize(("damage", "detail"), [
    ("cut inside", "the archive ends inside a member header at byte 4,608"),
    ("cut before", "the archive ends without its end-of-archive blocks at byte 4,608"),
    ("corrupt", "a corrupt member header at byte 4,608"),
])
def test_a_shard_broken_at_a_member_header_is_a_truncated_shard(tmp_path, damage, detail):
    """tarfile ends the archive at such a header as if it were whole: 2 of 3 samples were lost
    without a count."""
    data, _ = tar_and_cut(3, 1)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        offset = tar.getmembers()[3].offset  # sample 1's first header
    path = tmp_path / "00000.tar"
    path.write_bytes(_damaged_at_header(data, offset, damage))
    samples, skips = collect(str(path))
    assert [s.key.split("/")[-1] for s in samples] == ["000000000"]
    assert [(s.reason, s.detail) for s in skips] == [("truncated_shard", detail)]


@pytest.mark.parametrize("form", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_long_names_under_the_header_cap_are_read(tmp_path, form):
    key = "é" * 300
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w", format=form) as tar:
        for member, data in sample_members(key, IMG, b"a long name"):
            add_member(tar, member, data)
    samples, skips = collect(str(path))
    assert ([s.key for s in samples], skips) == ([f"{tmp_path.name}/00000/{key}"], [])


def _caption_skips(tmp_path, caption: str) -> tuple[list[Sample], list[Skip]]:
    path = write_shard(tmp_path / "00000.tar", sample_members("c", IMG, caption.encode()))
    return collect(path)


@pytest.mark.parametrize(("caption", "reason"), [
    ("x" * 99_000, "caption_too_long"),  # 213 s in open_clip's tokenizer
    ("word " * 206, "caption_too_long"),
    ("é" * 513, "caption_too_long"),  # 1026 UTF-8 bytes
    ("a photo of " + "q" * 65, "caption_word_too_long"),
    ("a&#98;" * 40, "caption_word_too_long"),  # entities the tokenizer unescapes: one word
    ("ab\x1f" * 40, "caption_word_too_long"),  # control characters ftfy drops
])
def test_captions_the_tokenizer_would_choke_on_are_refused(tmp_path, caption, reason):
    samples, skips = _caption_skips(tmp_path, caption)
    assert samples == [] and [s.reason for s in skips] == [reason]


def test_captions_at_the_caps_are_kept_whole(tmp_path):
    caption = " ".join(["q" * 64] * 15) + " r" + "é" * 24
    assert len(caption.encode()) == mmia.shards.MAX_CAPTION_BYTES
    samples, skips = _caption_skips(tmp_path, caption)
    assert skips == [] and samples[0].caption == caption


# ---------------------------------------------------------------- case 10: sidecars and names


def test_a_deeply_nested_json_sidecar_is_a_bad_json_warning(tmp_path):
    path = write_shard(tmp_path / "00000.tar", sample_members("deep", IMG, b"kept", b"[" * 100_000)
                       + sample_members("deeper", IMG, b"kept", b'{"a":' * 50_000))
    samples, skips = collect(path)
    assert [s.meta for s in samples] == [{}, {}]
    assert [(s.reason, s.fatal_to_sample) for s in skips] == [("bad_json_sidecar", False)] * 2


def _non_utf8_shard(tmp_path) -> str:
    (tmp_path / "m").mkdir()
    members = [(n.encode(), d) for n, d in good_members(0, 2)]
    members += [(b"caf\xe9.jpg", IMG), (b"caf\xe9.txt", b"latin-1 name"),
                (b"caf\\xe9.jpg", jpeg_bytes(5)), (b"caf\\xe9.txt", b"a real backslash"),
                (b"nocap\xff.jpg", IMG)]
    return write_raw_name_shard(tmp_path / "m/00000.tar", members)


def test_member_names_that_are_not_utf8_get_printable_keys(tmp_path):
    samples, skips = collect(_non_utf8_shard(tmp_path))
    keys = [s.key for s in samples]
    assert keys[-1] == "m/00000/caf\\xe9" and samples[-1].caption == "latin-1 name"
    assert [(s.reason, s.key) for s in skips] == [
        ("member_name_not_utf8", "m/00000/caf\\xe9"),
        ("duplicate_key", "m/00000/caf\\xe9"),  # the real backslash reads the same: one key
        ("missing_caption", "m/00000/nocap\\xff")]
    for text in keys + [s.key for s in skips]:
        text.encode("utf-8")  # never a surrogate escape


def test_a_non_utf8_member_name_survives_embedding_as_a_counted_warning(tmp_path, tiny_model):
    result = embed_shards(tiny_model, [_non_utf8_shard(tmp_path)], str(tmp_path / "c"),
                          batch_size=4, workers=0, progress=False)
    keys = [r.key for r in result.records]
    assert "m/00000/caf\\xe9" in keys and len(keys) == 3
    assert dict(result.warnings) == {"member_name_not_utf8": 1}
    assert result.skips["missing_caption"] == 1 and result.skips["duplicate_key"] == 1
    "\n".join(keys).encode("utf-8")
