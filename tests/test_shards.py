"""Reader edge cases: keys, grouping, skips by reason, workers and rank splitting."""

import inspect
import os
import time
from collections import Counter

import pytest
from shardgen import good_members, jpeg_bytes, serve_folder, write_good_shards, write_shard
from torch.utils.data import DataLoader, IterableDataset
from webdataset.gopen import gopen_schemes

from mmia.errors import MmiaError
from mmia.shards import (
    Sample,
    Skip,
    expand_patterns,
    is_remote,
    read_samples,
    shard_labels,
    split_name,
)


def collect(patterns):
    samples, skips = [], []
    for item in read_samples(patterns):
        (samples if isinstance(item, Sample) else skips).append(item)
    return samples, skips


@pytest.fixture
def laion(tmp_path):
    """A `laion/` shard folder, so shard labels read `laion/00000`."""
    folder = tmp_path / "laion"
    folder.mkdir()
    return folder


def test_reads_img2dataset_layout_with_qualified_keys(laion):
    pattern = write_good_shards(laion, 2, 3)
    samples, skips = collect(pattern)
    assert skips == []
    assert [s.key for s in samples] == [
        "laion/00000/000000000", "laion/00000/000000001", "laion/00000/000000002",
        "laion/00001/000010000", "laion/00001/000010001", "laion/00001/000010002",
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


def test_shard_labels_are_shortest_unique_suffix_of_at_least_two_parts():
    labels = shard_labels(["/a/x/00000.tar", "/a/y/00000.tar", "/a/y/00001.tar",
                           "/b/x/00000.tar.gz", "laion/00007.tar", "00009.tgz",
                           "/data/cc12m/00003.tar"])
    assert labels == {"/a/x/00000.tar": "a/x/00000", "/a/y/00000.tar": "y/00000",
                      "/a/y/00001.tar": "y/00001", "/b/x/00000.tar.gz": "b/x/00000",
                      "laion/00007.tar": "laion/00007", "00009.tgz": "00009",
                      "/data/cc12m/00003.tar": "cc12m/00003"}


def test_shard_labels_tell_apart_hosts_and_identical_paths():
    urls = ["http://h1/laion/00000.tar", "http://h2/laion/00000.tar", "/d/laion/00000.tar",
            "file:/d/laion/00000.tar"]
    labels = shard_labels(urls)
    assert labels["http://h1/laion/00000.tar"] == "h1/laion/00000"
    assert labels["http://h2/laion/00000.tar"] == "h2/laion/00000"
    assert len(set(labels.values())) == 4


def test_a_roles_keys_do_not_depend_on_other_shards(tmp_path):
    (tmp_path / "members/laion").mkdir(parents=True)
    members = write_good_shards(tmp_path / "members/laion", 2, 1)

    def keys():
        return [s.key for s in read_samples(members) if isinstance(s, Sample)]

    alone = keys()
    (tmp_path / "pool/laion").mkdir(parents=True)
    pool = write_good_shards(tmp_path / "pool/laion", 3, 1)
    assert [s.key for s in read_samples(pool) if isinstance(s, Sample)][0] == (
        "laion/00000/000000000")
    assert keys() == alone == ["laion/00000/000000000", "laion/00001/000010000"]
    assert "label_urls" not in inspect.signature(read_samples).parameters


def test_shard_labels_of_many_shards_are_unique_minimal_suffixes():
    paths = [f"/data/{ds}/part{p}/{i:05d}.tar"
             for ds in ("laion", "cc12m") for p in range(4) for i in range(2500)]
    paths += [f"/data/{i:05d}.tar" for i in range(10)] + ["/x/y/laion/part0/00000.tar"]
    labels = shard_labels(paths)
    assert len(labels) == len(paths) == 20_011
    assert len(set(labels.values())) == len(paths)
    stems = {p: p.removesuffix(".tar").strip("/").split("/") for p in paths}
    for path, label in labels.items():
        n = label.count("/") + 1
        assert n >= 2 and stems[path][-n:] == label.split("/")
    cut = {p: label.count("/") for p, label in labels.items()}  # parts in a shorter label
    shared = {k: Counter("/".join(s[-k:]) for s in stems.values()) for k in set(cut.values())}
    assert all(shared[k]["/".join(stems[p][-k:])] > 1 for p, k in cut.items() if k >= 2)
    assert labels["/data/laion/part0/00000.tar"] == "data/laion/part0/00000"
    assert labels["/data/laion/part0/00001.tar"] == "laion/part0/00001"
    assert labels["/data/00003.tar"] == "data/00003"


def test_missing_shard_is_a_clear_error(tmp_path):
    with pytest.raises(MmiaError, match="missing file"):
        expand_patterns(str(tmp_path / "{00000..00003}.tar"))


@pytest.mark.parametrize(
    ("name", "expected"),
    [("000.jpg", ("000", "jpg")), ("a.b.c.txt", ("a", "b.c.txt")),
     ("000.caption.txt", ("000", "caption.txt")), ("K.Caption.TXT", ("K", "caption.txt")),
     ("sub/dir/k1.json", ("sub/dir/k1", "json")), ("a.b/000.jpg", ("a.b/000", "jpg")),
     ("K.JPEG", ("K", "jpeg")), ("noext", ("noext", "")), ("d/.hidden.jpg", ("d/.hidden.jpg", ""))],
)
def test_split_name_splits_at_the_first_dot_of_the_base_name(name, expected):
    assert split_name(name) == expected


def test_multi_dot_members_join_their_sample(laion):
    img = jpeg_bytes(1)
    members = [
        ("000.jpg", img), ("000.caption.txt", b"dotted caption"), ("000.json", b'{"k": 0}'),
        ("001.PNG", img), ("001.alt.txt", b"alt"), ("001.TXT", b"plain wins"),
        ("002.webp", img), ("002.b.txt", b"b"), ("002.a.txt", b"first sorted"),
        ("a.b/003.jpg", img), ("a.b/003.txt", b"dotted folder"),
        ("004.jpg", img), ("004.txt.json", b"{}"),
    ]
    samples, skips = collect(write_shard(laion / "00000.tar", members))
    assert {s.key: s.caption for s in samples} == {
        "laion/00000/000": "dotted caption", "laion/00000/001": "plain wins",
        "laion/00000/002": "first sorted", "laion/00000/a.b/003": "dotted folder"}
    assert samples[0].meta == {"k": 0}
    assert [(k.reason, k.key) for k in skips] == [("missing_caption", "laion/00000/004")]


def test_bad_samples_are_skipped_and_counted(laion):
    img = jpeg_bytes(1)
    members = good_members(0, 2) + [
        ("nocap.jpg", img),
        ("noimg.txt", b"caption only"),
        ("latin.jpg", img), ("latin.txt", "café".encode("latin-1")),
        ("empty.jpg", b""), ("empty.txt", b"zero byte image"),
        ("dup.jpg", img), ("dup.txt", b"first"),
        ("other.jpg", img), ("other.txt", b"between"),
        ("dup.jpg", img), ("dup.txt", b"second"),
        ("v1.2/k.jpg", img), ("v1.2/k.txt", b"dotted folder"),
        ("sub/k.jpg", img), ("sub/k.txt", b"in a folder"),
        ("badjson.jpg", img), ("badjson.txt", b"kept"), ("badjson.json", b"{not json"),
    ]
    pattern = write_shard(laion / "00000.tar", members)
    samples, skips = collect(pattern)
    reasons = sorted(s.reason for s in skips)
    assert reasons == sorted(["missing_caption", "missing_image", "caption_not_utf8",
                              "empty_image", "duplicate_key", "bad_json_sidecar"])
    keys = {s.key for s in samples}
    assert {"laion/00000/dup", "laion/00000/other", "laion/00000/v1.2/k",
            "laion/00000/sub/k", "laion/00000/badjson"} <= keys
    assert next(s for s in samples if s.key == "laion/00000/dup").caption == "first"
    assert next(s for s in skips if s.reason == "bad_json_sidecar").fatal_to_sample is False


def test_truncated_and_empty_shards_do_not_end_the_run(laion):
    full = write_shard(laion / "00000.tar", good_members(0, 6))
    data = open(full, "rb").read()
    (laion / "00001.tar").write_bytes(data[: len(data) // 2 + 100])
    (laion / "00002.tar").write_bytes(b"")
    write_shard(laion / "00003.tar", [])
    write_shard(laion / "00004.tar", good_members(4, 2))
    samples, skips = collect(str(laion / "{00000..00004}.tar"))
    reasons = sorted(s.reason for s in skips)
    assert "truncated_shard" in reasons
    assert reasons.count("empty_shard") == 2
    keys = [s.key for s in samples]
    assert sum(k.startswith("laion/00000/") for k in keys) == 6
    assert sum(k.startswith("laion/00004/") for k in keys) == 2
    assert 0 < sum(k.startswith("laion/00001/") for k in keys) < 6


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


def test_ranks_split_shards(tmp_path, tiny_model):
    """torchrun ranks take every N-th shard (`shard_share`); keys are those of one process."""
    from mmia.embed import embed_shards

    pattern = write_good_shards(tmp_path, 4, 1)

    def keys(share):
        return embed_shards(tiny_model, [pattern], str(tmp_path / "c"), workers=0,
                            progress=False, shard_share=share).records.key.tolist()

    seen = [keys((rank, 2)) for rank in range(2)]
    assert len(seen[0]) == len(seen[1]) == 2
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(keys((0, 1)))


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


def test_a_failing_pipe_keeps_its_prefix_when_it_exits_before_the_first_read(
        tmp_path, monkeypatch):
    import mmia.shards

    full = write_shard(tmp_path / "full.tar", good_members(1, 4))
    (tmp_path / "half.tar").write_bytes(open(full, "rb").read()[: int(0.7 * os.path.getsize(full))])
    opener = mmia.shards._open

    def late_reader(url):
        stream = opener(url)
        time.sleep(0.5)  # the command has exited (non-zero) before tarfile reads
        return stream

    monkeypatch.setattr(mmia.shards, "_open", late_reader)
    broken = f"pipe:cat {tmp_path / 'half.tar'}; exit 1"
    samples, skips = collect(broken)
    assert 1 <= len(samples) < 4 and [k.reason for k in skips] == ["truncated_shard"]


def test_a_sidecar_alone_is_one_missing_image_skip_and_no_sample(laion):
    items = list(read_samples(write_shard(laion / "00000.tar", [("a.json", b"{}")])))
    assert [(type(i), i.reason, i.key) for i in items] == [
        (Skip, "missing_image", "laion/00000/a")]


REMOTE_SCHEMES = sorted(set(gopen_schemes) - {"__default__", "file"})


@pytest.mark.parametrize("scheme", REMOTE_SCHEMES)
def test_every_gopen_scheme_is_remote(scheme):
    assert is_remote(f"{scheme}://host/laion/00000.tar")


@pytest.mark.parametrize("url", ["/d/00000.tar", "d/00000.tar", "file:/d/00000.tar",
                                 "file:///d/00000.tar", "foo://x.tar", "C:/d/00000.tar"])
def test_other_urls_are_local(url):
    assert not is_remote(url)


def test_remote_urls_are_not_checked_and_unknown_schemes_are_local_paths(tmp_path):
    remote = [f"{scheme}://host/laion/{{00000..00001}}.tar" for scheme in REMOTE_SCHEMES]
    assert len(expand_patterns(remote + ["pipe:cat x.tar"])) == 2 * len(REMOTE_SCHEMES) + 1
    with pytest.raises(MmiaError, match="missing file 'foo://x.tar'"):
        expand_patterns("foo://x.tar")


def test_a_local_path_that_looks_like_a_url_is_read_as_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_shard(tmp_path / "foo:00000.tar", good_members(0, 2))
    samples, skips = collect("foo:00000.tar")
    assert (len(samples), skips) == (2, [])


@pytest.fixture
def http_root(tmp_path):
    """A loopback HTTP server over tmp_path; yields its base URL."""
    with serve_folder(tmp_path) as url:
        yield url


def test_http_urls_are_read_and_a_missing_one_is_a_counted_skip(tmp_path, http_root):
    (tmp_path / "laion").mkdir()
    write_good_shards(tmp_path / "laion", 2, 3)
    samples, skips = collect(f"{http_root}/laion/{{00000..00002}}.tar")  # 00002 does not exist
    assert [s.key for s in samples][:2] == ["laion/00000/000000000", "laion/00000/000000001"]
    assert len(samples) == 6 and samples[3].image_bytes == jpeg_bytes(1000)
    assert len(skips) == 1 and skips[0].url.endswith("00002.tar")
    assert skips[0].reason == "unreadable_shard" and "exit 22" in skips[0].detail  # curl: 404


def test_remote_schemes_cover_webdataset_gopen():
    """`is_remote` spells out gopen's schemes (importing webdataset imports torch)."""
    from webdataset.gopen import gopen_schemes

    from mmia.shards import REMOTE_SCHEMES, is_remote

    assert set(gopen_schemes) - {"__default__"} <= REMOTE_SCHEMES
    assert is_remote("pipe:cat x.tar") and is_remote("https://h/x.tar")
    assert not is_remote("/data/x.tar") and not is_remote("file:/data/x.tar")
