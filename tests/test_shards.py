"""Reader edge cases: keys, grouping, skips by reason, workers and rank splitting."""

import io
import json
import os
import tarfile

import pytest
from shardgen import add_member, good_members, jpeg_bytes, write_good_shards, write_shard
from torch.utils.data import DataLoader, IterableDataset

from mmia.errors import MmiaError
from mmia.shards import Sample, Skip, expand_patterns, read_samples, shard_labels, split_name


def collect(patterns):
    samples, skips = [], []
    for item in read_samples(patterns):
        (samples if isinstance(item, Sample) else skips).append(item)
    return samples, skips


def test_reads_img2dataset_layout_with_qualified_keys(tmp_path):
    pattern = write_good_shards(tmp_path, 2, 3)
    samples, skips = collect(pattern)
    assert skips == []
    assert [s.key for s in samples] == [
        "00000/000000000", "00000/000000001", "00000/000000002",
        "00001/000010000", "00001/000010001", "00001/000010002",
    ]
    assert samples[4].caption == "a photo of item 1-1 seed 0"
    assert samples[4].meta["key"] == "000010001"
    assert samples[0].image_bytes == jpeg_bytes(0)


def test_several_patterns_and_file_urls(tmp_path):
    write_good_shards(tmp_path, 3, 2)
    samples, _ = collect([f"file:{tmp_path}/00000.tar", str(tmp_path / "{00001..00002}.tar")])
    assert len(samples) == 6


def test_same_shard_names_in_two_folders_get_distinct_keys(tmp_path):
    for sub in ("laion", "cc12m"):
        (tmp_path / sub).mkdir()
        write_good_shards(tmp_path / sub, 1, 2, seed=0)
    samples, _ = collect([str(tmp_path / "laion/00000.tar"), str(tmp_path / "cc12m/00000.tar")])
    keys = [s.key for s in samples]
    assert len(set(keys)) == 4
    assert keys[0] == "laion/00000/000000000" and keys[2] == "cc12m/00000/000000000"


def test_shard_labels_are_shortest_unique_suffix():
    labels = shard_labels(["/a/x/00000.tar", "/a/y/00000.tar", "/a/y/00001.tar"])
    assert labels == {"/a/x/00000.tar": "x/00000", "/a/y/00000.tar": "y/00000",
                      "/a/y/00001.tar": "00001"}


def test_missing_shard_is_a_clear_error(tmp_path):
    with pytest.raises(MmiaError, match="missing file"):
        expand_patterns(str(tmp_path / "{00000..00003}.tar"))


@pytest.mark.parametrize(
    ("name", "expected"),
    [("000.jpg", ("000", "jpg")), ("a.b.c.txt", ("a.b.c", "txt")),
     ("sub/dir/k1.json", ("sub/dir/k1", "json")), ("K.JPEG", ("K", "jpeg"))],
)
def test_split_name(name, expected):
    assert split_name(name) == expected


def test_bad_samples_are_skipped_and_counted(tmp_path):
    img = jpeg_bytes(1)
    members = good_members(0, 2) + [
        ("nocap.jpg", img),
        ("noimg.txt", b"caption only"),
        ("latin.jpg", img), ("latin.txt", "café".encode("latin-1")),
        ("empty.jpg", b""), ("empty.txt", b"zero byte image"),
        ("dup.jpg", img), ("dup.txt", b"first"),
        ("other.jpg", img), ("other.txt", b"between"),
        ("dup.jpg", img), ("dup.txt", b"second"),
        ("with.dots.jpg", img), ("with.dots.txt", b"dotted key"),
        ("sub/k.jpg", img), ("sub/k.txt", b"in a folder"),
        ("badjson.jpg", img), ("badjson.txt", b"kept"), ("badjson.json", b"{not json"),
    ]
    pattern = write_shard(tmp_path / "00000.tar", members)
    samples, skips = collect(pattern)
    reasons = sorted(s.reason for s in skips)
    assert reasons == sorted(["missing_caption", "missing_image", "caption_not_utf8",
                              "empty_image", "duplicate_key", "bad_json_sidecar"])
    keys = {s.key for s in samples}
    assert {"00000/dup", "00000/other", "00000/with.dots", "00000/sub/k",
            "00000/badjson"} <= keys
    assert next(s for s in samples if s.key == "00000/dup").caption == "first"
    assert next(s for s in skips if s.reason == "bad_json_sidecar").fatal_to_sample is False


def test_truncated_and_empty_shards_do_not_end_the_run(tmp_path):
    full = write_shard(tmp_path / "00000.tar", good_members(0, 6))
    data = open(full, "rb").read()
    (tmp_path / "00001.tar").write_bytes(data[: len(data) // 2 + 100])
    (tmp_path / "00002.tar").write_bytes(b"")
    write_shard(tmp_path / "00003.tar", [])
    write_shard(tmp_path / "00004.tar", good_members(4, 2))
    samples, skips = collect(str(tmp_path / "{00000..00004}.tar"))
    reasons = sorted(s.reason for s in skips)
    assert "truncated_shard" in reasons
    assert reasons.count("empty_shard") == 2
    keys = [s.key for s in samples]
    assert sum(k.startswith("00000/") for k in keys) == 6
    assert sum(k.startswith("00004/") for k in keys) == 2
    assert 0 < sum(k.startswith("00001/") for k in keys) < 6


class Stream(IterableDataset):
    def __init__(self, pattern):
        self.pattern = pattern

    def __iter__(self):
        return (s.key for s in read_samples(self.pattern) if isinstance(s, Sample))


@pytest.mark.parametrize("workers", [2, 3])
def test_workers_split_shards_without_loss_or_duplicates(tmp_path, workers):
    pattern = write_good_shards(tmp_path, 2, 3)  # fewer shards than workers for 3
    loader = DataLoader(Stream(pattern), batch_size=None, num_workers=workers)
    keys = list(loader)
    assert len(keys) == 6 and len(set(keys)) == 6


def test_ranks_split_shards(tmp_path, monkeypatch):
    import torch.distributed as dist

    pattern = write_good_shards(tmp_path, 4, 1)
    seen = []
    for rank in range(2):
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_rank", lambda r=rank: r)
        monkeypatch.setattr(dist, "get_world_size", lambda: 2)
        seen.append([s.key for s in read_samples(pattern) if isinstance(s, Sample)])
    assert len(seen[0]) == len(seen[1]) == 2
    assert not set(seen[0]) & set(seen[1])


def test_pipe_urls_are_read(tmp_path):
    path = write_shard(tmp_path / "00000.tar", good_members(0, 2))
    samples, _ = collect(f"pipe:cat {path}")
    assert len(samples) == 2


def test_a_failing_pipe_is_a_counted_skip_not_a_crash(tmp_path):
    path = write_shard(tmp_path / "00000.tar", good_members(0, 2))
    full = write_shard(tmp_path / "full.tar", good_members(1, 4))
    half = tmp_path / "half.tar"
    half.write_bytes(open(full, "rb").read()[: int(0.7 * os.path.getsize(full))])
    broken = f"pipe:cat {half}; exit 1"
    samples, skips = collect([f"pipe:cat {path}", "pipe:exit 3", broken])
    by_url = {u: sum(s.url == u for s in samples) for u in (f"pipe:cat {path}", broken)}
    assert by_url[f"pipe:cat {path}"] == 2 and 1 <= by_url[broken] < 4  # intact prefix kept
    assert [(k.reason, k.url) for k in skips] == [("unreadable_shard", "pipe:exit 3"),
                                                 ("truncated_shard", broken)]


def test_skip_is_not_a_sample():
    assert not isinstance(Skip("x"), Sample)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        add_member(tar, "a.json", json.dumps({}).encode())
    assert buf.getvalue()


@pytest.fixture
def http_root(tmp_path):
    """A loopback HTTP server over tmp_path; yields its base URL."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_urls_are_read_and_a_missing_one_is_a_counted_skip(tmp_path, http_root):
    (tmp_path / "laion").mkdir()
    write_good_shards(tmp_path / "laion", 2, 3)
    samples, skips = collect(f"{http_root}/laion/{{00000..00002}}.tar")  # 00002 does not exist
    assert [s.key for s in samples][:2] == ["00000/000000000", "00000/000000001"]
    assert len(samples) == 6 and samples[3].image_bytes == jpeg_bytes(1000)
    assert len(skips) == 1 and skips[0].url.endswith("00002.tar")
    assert skips[0].reason == "unreadable_shard" and "exit 22" in skips[0].detail  # curl: 404
