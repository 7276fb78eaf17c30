"""The cache index (issue 13): a bucket directory on the top bits of each digest's hash finds
exactly what a dictionary would, with adds interleaved with lookups and with colliding hashes,
and a lookup's per-call work does not grow with the number of segments."""

from __future__ import annotations

import os

import numpy as np
import pytest

import mmia.cache
from mmia.cache import FeatureStore, _SortedRuns

MAX = np.iinfo(np.uint64).max


def _random_digests(rng: np.random.Generator, n: int) -> np.ndarray:
    chars = np.frombuffer(b"0123456789abcdef", np.uint8)[rng.integers(0, 16, (n, 32))]
    return chars.view("S32").reshape(n)


def _assert_directories_consistent(index: _SortedRuns) -> None:
    """Each run is sorted by hash, and bucket b holds exactly the entries whose hash's top bits
    are b."""
    for run in index.runs:
        hashes = run.hashes
        assert (hashes[1:] >= hashes[:-1]).all()
        buckets = (hashes >> run.shift).astype(np.int64)
        counts = np.bincount(buckets, minlength=len(run.directory) - 1)
        assert np.array_equal(np.diff(run.directory), counts)
        assert len(run.directory) - 1 <= 2 * max(1, len(hashes))  # ≤ 1 bucket per 0.5 entry


def _check_against(index: _SortedRuns, first: dict, query: np.ndarray) -> None:
    segment, row = index.locate(query)
    for k, s, r in zip(query, segment, row, strict=True):
        assert (s, r) == first.get(k, (-1, 0))


def _fill(index: _SortedRuns, rng: np.random.Generator, pool: np.ndarray, segments: int,
          check_every: int = 1, parts: list | None = None) -> dict:
    """Adds of random subsets of `pool` (digests repeat across segments), each followed by a
    lookup of the whole pool plus absent digests; the reference is a dictionary of the first
    (segment, row) of each digest. `parts` collects each add's (keys, segment)."""
    first: dict = {}
    absent = _random_digests(rng, 50)
    for segment in range(segments):
        keys = np.unique(pool[rng.integers(0, len(pool), rng.integers(1, 120))])
        keys = keys[rng.permutation(len(keys))]
        index.add(keys, segment)
        if parts is not None:
            parts.append((keys, segment))
        for row, k in enumerate(keys):
            first.setdefault(k, (segment, row))
        if segment % check_every == 0:
            _assert_directories_consistent(index)
            _check_against(index, first, np.r_[pool, absent])
    return first


def test_directory_index_agrees_with_a_dictionary_on_random_digests():
    rng = np.random.default_rng(3)
    index = _SortedRuns()
    pool = _random_digests(rng, 2000)
    parts: list = []
    first = _fill(index, rng, pool, 60, parts=parts)
    assert len(index.runs) <= int(np.log2(sum(len(r.table) for r in index.runs))) + 2
    at_once = _SortedRuns()  # what a process opening the store builds: one sort, one run
    at_once.add_many(parts)
    assert len(at_once.runs) == 1
    _assert_directories_consistent(at_once)
    _check_against(at_once, first, np.r_[pool, _random_digests(rng, 100)])
    assert index.unique_count() == at_once.unique_count() == len(first)


@pytest.mark.parametrize("forced", ["few_values", "one_top_bucket", "all_maximal"])
def test_directory_index_is_exact_when_hashes_collide(monkeypatch, forced):
    """Colliding hashes (4 values; all in the last bucket; all equal to the largest uint64)
    are settled by the digests, and the directory stays consistent."""
    real = mmia.cache.key_hash
    fakes = {
        "few_values": lambda keys: real(keys) % np.uint64(4),
        "one_top_bucket": lambda keys: real(keys) | np.uint64(0xFFFF_FFFF_0000_0000),
        "all_maximal": lambda keys: np.full(len(keys), MAX, np.uint64),
    }
    monkeypatch.setattr(mmia.cache, "key_hash", fakes[forced])
    rng = np.random.default_rng(4)
    index = _SortedRuns()
    parts: list = []
    first = _fill(index, rng, _random_digests(rng, 150), 25, check_every=4, parts=parts)
    at_once = _SortedRuns()
    at_once.add_many(parts)
    _check_against(at_once, first, np.r_[list(first), _random_digests(rng, 30)])


def test_lookup_of_an_empty_query_and_an_empty_index():
    index = _SortedRuns()
    segment, row = index.locate(np.zeros(0, "S32"))
    assert segment.shape == row.shape == (0,)
    assert (index.locate(_random_digests(np.random.default_rng(0), 3))[0] == -1).all()


def test_store_lookups_agree_after_reopening_and_with_adds_interleaved(tmp_path):
    """Through the store: digests written over many commits are found by a store that indexed
    them incrementally and by one that opened the folder afresh (one run, sorted once)."""
    rng = np.random.default_rng(5)
    writer, truth = FeatureStore(str(tmp_path)), {}
    for _ in range(12):
        keys = _random_digests(rng, int(rng.integers(1, 40)))
        feats = rng.standard_normal((len(keys), 4)).astype(np.float32)
        writer.write(list(keys.astype(str)), feats)
        for k, f in zip(keys.astype(str), feats, strict=True):
            truth.setdefault(k, f)
        query = list(truth) + list(_random_digests(rng, 10).astype(str))
        assert writer.contains(query).tolist() == [q in truth for q in query]
    reader = FeatureStore(str(tmp_path)).refresh()
    assert len(reader._index.runs) == 1
    keys = list(truth)
    assert np.array_equal(reader.read(keys), np.stack([truth[k] for k in keys]))
    assert np.array_equal(writer.read(keys), np.stack([truth[k] for k in keys]))


def _segments(tmp_path, count: int) -> tuple[FeatureStore, list[str]]:
    store, keys = FeatureStore(str(tmp_path)), []
    rng = np.random.default_rng(6)
    for _ in range(count):
        batch = list(_random_digests(rng, 3).astype(str))
        store.write(batch, rng.standard_normal((3, 4)).astype(np.float32))
        keys += batch
    return FeatureStore(str(tmp_path)).refresh(), keys


def test_repeated_lookups_do_not_stat_every_segment_each_call(tmp_path, monkeypatch):
    """The first lookup checks each segment it touches; lookups soon after trust that check
    instead of one stat per segment per call (reads still stat what they serve)."""
    store, keys = _segments(tmp_path, 20)
    assert store.contains(keys).all()
    stats = []
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda path, *a, **k: stats.append(path) or
                        real_stat(path, *a, **k))
    for _ in range(5):
        assert store.contains(keys).all()
    assert len(stats) == 0


def test_a_file_replaced_after_its_check_is_caught_once_the_stat_is_due(tmp_path, monkeypatch):
    store, keys = _segments(tmp_path, 3)
    assert store.contains(keys).all()
    name = sorted(n for n in os.listdir(tmp_path) if n.endswith(mmia.cache.FEATURES))[0]
    path = tmp_path / name
    path.unlink()  # another file (new inode), other rows: its checksum no longer matches
    np.save(path, np.ones((3, 4), np.float32))
    monkeypatch.setattr(mmia.cache, "RESTAT_SECONDS", 0.0)
    found = store.contains(keys)
    assert found.sum() == 6 and not found[:3].any()
    assert (tmp_path / mmia.cache.QUARANTINE / name).exists()


def test_a_file_changed_in_place_is_caught_after_a_refresh(tmp_path):
    """A new look at the folder (a new run opening the store, a write) stats again: bytes
    flipped in place (same inode) since the last check are found at once."""
    store, keys = _segments(tmp_path, 3)
    assert store.contains(keys).all()
    name = sorted(n for n in os.listdir(tmp_path) if n.endswith(mmia.cache.FEATURES))[1]
    data = bytearray((tmp_path / name).read_bytes())
    data[-3] ^= 0x5A
    (tmp_path / name).write_bytes(bytes(data))
    os.utime(tmp_path / name, ns=(1, 1))  # whatever the timestamp granularity
    found = store.refresh().contains(keys)
    assert found.sum() == 6 and not found[3:6].any()
