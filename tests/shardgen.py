"""Write small img2dataset-style shards for tests."""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import json
import tarfile
import threading
from collections.abc import Iterator

import numpy as np
from PIL import Image


def jpeg_bytes(seed: int, size: int = 32, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    image = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt, quality=90)
    return buf.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_shard(path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            add_member(tar, name, data)
    return str(path)


def good_members(shard_id: int, n: int, seed: int = 0) -> list[tuple[str, bytes]]:
    members = []
    for row in range(n):
        key = f"{shard_id:05d}{row:04d}"
        caption = f"a photo of item {shard_id}-{row} seed {seed}"
        members += [
            (f"{key}.jpg", jpeg_bytes(seed * 100_000 + shard_id * 1000 + row)),
            (f"{key}.txt", caption.encode()),
            (f"{key}.json", json.dumps({"key": key, "caption": caption}).encode()),
        ]
    return members


def write_good_shards(folder, n_shards: int, per_shard: int, seed: int = 0) -> str:
    """Shards 00000.tar … ; returns a brace pattern covering them."""
    for s in range(n_shards):
        write_shard(folder / f"{s:05d}.tar", good_members(s, per_shard, seed))
    return str(folder / f"{{00000..{n_shards - 1:05d}}}.tar")


def image_bytes(seed: int, size: int = 32, mode: str = "RGB", fmt: str = "PNG") -> bytes:
    """An image in any PIL mode and format (PNG by default; no JPEG quality argument)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


def bomb_png(side: int = 20000) -> bytes:
    """A decompression bomb: a tiny 1-bit PNG with `side`² pixels."""
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")
    return buf.getvalue()


def sample_members(key: str, image: bytes | None, caption: bytes | None,
                   sidecar: bytes | None = None) -> list[tuple[str, bytes]]:
    """Members of one sample; a None part is left out."""
    parts = [(f"{key}.jpg", image), (f"{key}.txt", caption), (f"{key}.json", sidecar)]
    return [(name, data) for name, data in parts if data is not None]


def write_raw_name_shard(path, members: list[tuple[bytes, bytes]]) -> str:
    """A shard whose member names are raw bytes (e.g. not UTF-8), written as they are."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        for name, data in members:
            add_member(tar, name.decode("latin-1"), data)
    return str(path)


class _Zeros(io.RawIOBase):
    """`size` zero bytes, produced as they are read (never all in memory)."""

    def __init__(self, size: int):
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def write_compressed_shard(path, members: list[tuple[str, bytes | int]], mode: str = "w:gz",
                           **kwargs) -> str:
    """A compressed shard; a member given as an int is that many zero bytes, streamed."""
    with tarfile.open(path, mode, **kwargs) as tar:
        for name, data in members:
            if isinstance(data, bytes):
                add_member(tar, name, data)
                continue
            info = tarfile.TarInfo(name)
            info.size, info.mtime = data, 0
            tar.addfile(info, _Zeros(data))
    return str(path)


def pax_record(keyword: str, value: bytes) -> bytes:
    """One pax header record, "<length> <keyword>=<value>\\n", its length counting itself."""
    body = b" " + keyword.encode() + b"=" + value + b"\n"
    length = len(body) + len(str(len(body)))
    length = len(body) + len(str(length))  # one more digit, where counting itself adds one
    return str(length).encode() + body


def write_header_bomb_shard(path, kind: str, size: int) -> str:
    """A .tar.gz of sample 0, a `kind` header member of over `size` bytes ("x": pax, "g": pax
    global, "L": GNU long name, "K": GNU long link) with the member it applies to, sample 1."""
    form = tarfile.PAX_FORMAT if kind in "xg" else tarfile.GNU_FORMAT
    with tarfile.open(path, "w:gz", format=form, compresslevel=1) as tar:
        for name, data in good_members(0, 1):
            add_member(tar, name, data)
        info = tarfile.TarInfo("bomb.txt")
        if kind == "x":
            info.pax_headers = {"comment": "a" * size}
        elif kind == "L":
            info.name = "a" * size + ".txt"
        elif kind == "K":
            info.type, info.linkname = tarfile.SYMTYPE, "a" * size
        elif kind == "g":
            record = pax_record("comment", b"a" * size)
            header = tarfile.TarInfo("pax_global_header")
            header.type, header.size = tarfile.XGLTYPE, len(record)
            tar.addfile(header, io.BytesIO(record))
        tar.addfile(info)
        for name, data in good_members(1, 1):
            add_member(tar, name, data)
    return str(path)


def write_header_chain_shard(path, count: int, size: int) -> str:
    """A tar of sample 0, `count` GNU long-name members of `size` bytes in a row in front of
    one caption member (the last name wins), then sample 1."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in good_members(0, 1):
            add_member(tar, name, data)
        name = ("n" * size)[: size - 5].encode() + b".txt\0"
        for _ in range(count):
            header = tarfile.TarInfo("././@LongLink")
            header.type, header.size = tarfile.GNUTYPE_LONGNAME, len(name)
            tar.addfile(header, io.BytesIO(name))
        add_member(tar, "chained.txt", b"a caption")
        for name, data in good_members(1, 1):
            add_member(tar, name, data)
    return str(path)


def _old_gnu_sparse_member(blocks: int) -> bytes:
    """An empty old-GNU sparse member whose map runs on over `blocks` extension blocks."""
    header = bytearray(tarfile.TarInfo("sparse.txt").tobuf(tarfile.GNU_FORMAT))
    header[156:157] = tarfile.GNUTYPE_SPARSE
    header[482] = 1  # isextended: the map goes on in extension blocks
    header[148:156] = b"%06o\0 " % tarfile.calc_chksums(bytes(header))[0]
    entry = tarfile.itn(1, 12, tarfile.GNU_FORMAT) * 2  # (offset 1, 1 byte)
    extension = entry * 21 + b"\1" + bytes(7)  # 21 entries, isextended
    return bytes(header) + extension * blocks + bytes(tarfile.BLOCKSIZE)


def write_sparse_map_shard(path, blocks: int) -> str:
    """A tar of sample 0, an old-GNU sparse member with a map of `blocks` extension blocks,
    sample 1."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in good_members(0, 1):
            add_member(tar, name, data)
        raw = _old_gnu_sparse_member(blocks)
        tar.fileobj.write(raw)  # as TarFile.addfile writes a header it has built
        tar.offset += len(raw)
        for name, data in good_members(1, 1):
            add_member(tar, name, data)
    return str(path)


@contextlib.contextmanager
def serve_folder(folder) -> Iterator[str]:
    """A quiet loopback http server over `folder` while inside; yields its base url."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass
