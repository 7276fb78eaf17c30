"""Write small img2dataset-style shards for tests."""

from __future__ import annotations

import io
import json
import tarfile

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
