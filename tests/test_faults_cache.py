"""Fault suite, cache: a damaged cache never changes a feature without saying so.

Every damage below was measured on mmia 0.1 (issue 14, case 1): flipped bytes turned CSA AUC
0.607 into 0.007 with no warning; other cases served wrong rows or died with a traceback.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil

import numpy as np
import pytest
from shardgen import write_good_shards

import mmia.cache
import mmia.cli
import mmia.embed
import mmia.encode
from mmia.cache import (
    FEATURES,
    KEYS,
    MANIFEST,
    QUARANTINE,
    CacheMiss,
    CacheWriteError,
    EmbeddingCache,
    FeatureStore,
    _SortedRuns,
    verify_cache,
)
from mmia.embed import embed_shards
from mmia.errors import MmiaError

D = 8


def _digests(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:031d}"[:32] for i in range(n)]


def _rows(n: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(size=(n, D)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.fixture
def two_segments(tmp_path):
    """A store with segments a (digests a…, 5 rows) and b (digests b…, 5 rows)."""
    folder = tmp_path / "store"
    store = FeatureStore(str(folder))
    truth = {}
    for prefix, seed in (("a", 1), ("b", 2)):
        keys, rows = _digests(prefix, 5), _rows(5, seed)
        assert store.write(keys, rows) == 5
        truth.update(zip(keys, rows, strict=True))
    names = sorted(n[: -len(MANIFEST)] for n in os.listdir(folder) if n.endswith(MANIFEST))
    return folder, names, truth


def _flip(path, offset=-7):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def _forge(folder, name, feats):
    """Replace a segment's features and rewrite its manifest to match: only finiteness is left."""
    import hashlib

    np.save(folder / (name + FEATURES), feats)
    manifest = json.loads((folder / (name + MANIFEST)).read_text())
    manifest["feat_sha256"] = hashlib.sha256(np.ascontiguousarray(feats).tobytes()).hexdigest()
    manifest["feat_bytes"] = (folder / (name + FEATURES)).stat().st_size
    (folder / (name + MANIFEST)).write_text(json.dumps(manifest))


def _damage(kind, folder, a, b):
    f = lambda name, suffix: folder / (name + suffix)  # noqa: E731
    if kind == "flipped_feature_bytes":
        _flip(f(a, FEATURES))
    elif kind == "swapped_feature_files":
        tmp = folder / "x"
        os.replace(f(a, FEATURES), tmp)
        os.replace(f(b, FEATURES), f(a, FEATURES))
        os.replace(tmp, f(b, FEATURES))
    elif kind == "truncated_feature_file":
        data = f(a, FEATURES).read_bytes()
        f(a, FEATURES).write_bytes(data[: len(data) - 40])
    elif kind == "broken_header":
        data = bytearray(f(a, FEATURES).read_bytes())
        data[:10] = b"garbage!!!"
        f(a, FEATURES).write_bytes(bytes(data))
    elif kind == "deleted_feature_file":
        f(a, FEATURES).unlink()
    elif kind == "wrong_width":
        np.save(f(a, FEATURES), np.zeros((5, D + 2), np.float32))
    elif kind == "keys_longer_than_features":
        np.save(f(a, KEYS), np.asarray(_digests("a", 7), "S32"))
    elif kind == "nan_rows_behind_a_valid_checksum":
        feats = np.load(f(a, FEATURES))
        feats[2] = np.nan
        _forge(folder, a, feats)
    elif kind == "garbage_keys_file":
        f(a, KEYS).write_bytes(os.urandom(300))
    elif kind == "empty_keys_file":
        f(a, KEYS).write_bytes(b"")
    elif kind == "deleted_keys_file":
        f(a, KEYS).unlink()
    elif kind == "garbage_manifest":
        f(a, MANIFEST).write_bytes(b"{" * 5000)
    elif kind == "manifest_rows_overflow":
        manifest = json.loads(f(a, MANIFEST).read_text())
        f(a, MANIFEST).write_text(json.dumps(manifest).replace('"rows": 5', '"rows": 1e400'))
    elif kind == "second_segment_same_keys_other_rows":
        # a copy of a's digests and manifest over b's rows, named to be found first
        for suffix in (KEYS, MANIFEST):
            shutil.copy(f(a, suffix), folder / ("00000000-0first" + suffix))
        shutil.copy(f(b, FEATURES), folder / ("00000000-0first" + FEATURES))
    else:
        raise AssertionError(kind)


DAMAGES = ["flipped_feature_bytes", "swapped_feature_files", "truncated_feature_file",
           "broken_header", "deleted_feature_file", "wrong_width", "keys_longer_than_features",
           "nan_rows_behind_a_valid_checksum", "garbage_keys_file", "empty_keys_file",
           "deleted_keys_file", "garbage_manifest", "manifest_rows_overflow",
           "second_segment_same_keys_other_rows"]


@pytest.mark.parametrize("kind", DAMAGES)
def test_damaged_segment_is_never_served(two_segments, kind, caplog):
    """Each read returns the true rows or says they are missing; the bad segment is
    quarantined with a one-line log, and the good segment is still served."""
    folder, (a, b), truth = two_segments
    _damage(kind, folder, a, b)
    store = FeatureStore(str(folder))
    with caplog.at_level(logging.WARNING, logger="mmia"):
        store.refresh()
        found = store.contains(list(truth))
    a_keys = _digests("a", 5)
    bad = 2 if kind == "swapped_feature_files" else 1  # each file fails its own manifest
    if kind == "second_segment_same_keys_other_rows":
        assert found.all()  # the forged copy is out, the genuine a is served
    else:
        assert not found[:5].any() and found[5:].all() == (bad == 1)
        with pytest.raises(CacheMiss, match="not in the cache"):
            store.read(a_keys)
    if found.any():
        served = store.read([k for k, ok in zip(truth, found, strict=True) if ok])
        expected = np.stack([truth[k] for k, ok in zip(truth, found, strict=True) if ok])
        assert np.array_equal(served, expected)
    assert [r.levelname for r in caplog.records] == ["WARNING"] * bad
    assert all("quarantined segment" in r.getMessage() for r in caplog.records)
    reasons = [n for n in os.listdir(folder / QUARANTINE) if n.endswith(".reason.txt")]
    assert len(reasons) == bad


def test_features_changed_after_the_check_are_not_served(two_segments):
    """A file replaced between the check and a later read is checked again."""
    folder, (a, _), truth = two_segments
    store = FeatureStore(str(folder)).refresh()
    keys = _digests("a", 5)
    assert store.contains(keys).all()
    (folder / (a + FEATURES)).unlink()  # a new file (new inode) with other rows
    np.save(folder / (a + FEATURES), _rows(5, 9))
    with pytest.raises(CacheMiss):
        store.read(keys)
    assert (folder / QUARANTINE / (a + FEATURES)).exists()


def test_an_os_error_is_not_taken_for_corruption(two_segments, monkeypatch):
    """Out of file descriptors (or EIO) says nothing about the segment: it propagates and
    nothing is quarantined."""
    folder, _, truth = two_segments
    real_open = open

    def emfile(path, *args, **kwargs):
        if str(path).endswith(FEATURES):
            raise OSError(errno.EMFILE, "Too many open files", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(mmia.cache, "open", emfile, raising=False)  # how the cache opens files
    with pytest.raises(OSError, match="Too many open files"):
        FeatureStore(str(folder)).refresh().contains(list(truth))
    assert not (folder / QUARANTINE).exists()


def test_data_is_checked_once_per_process(two_segments, monkeypatch):
    """A second store object (another role, another audit step) does not hash again; a
    verify does."""
    import mmia.cache

    folder, _, truth = two_segments
    calls = []
    real = mmia.cache._check_data
    monkeypatch.setattr(mmia.cache, "_check_data", lambda *a: calls.append(a[0]) or real(*a))
    mmia.cache._VERIFIED.clear()
    for _ in range(3):
        FeatureStore(str(folder)).refresh().read(list(truth))
    assert len(calls) == 2  # two segments, once each
    FeatureStore(str(folder)).verify_all()
    assert len(calls) == 4


def test_refresh_if_changed_sees_a_new_segment(tmp_path):
    one, two = FeatureStore(str(tmp_path)), FeatureStore(str(tmp_path))
    one.write(_digests("a", 2), _rows(2, 0))
    assert two.refresh_if_changed().contains(_digests("a", 2)).all()
    one.write(_digests("b", 2), _rows(2, 1))
    os.utime(tmp_path, ns=(1, 1))  # whatever the timestamp granularity: the folder changed
    assert two.refresh_if_changed().contains(_digests("b", 2)).all()


def test_write_rejects_non_finite_features(tmp_path):
    store = FeatureStore(str(tmp_path / "s"))
    rows = _rows(3, 0)
    rows[1, 0] = np.inf
    with pytest.raises(MmiaError, match="NaN or inf features for 1 of 3"):
        store.write(_digests("a", 3), rows)
    assert not (tmp_path / "s").exists() or not os.listdir(tmp_path / "s")


def test_write_commits_only_new_digests(tmp_path):
    """A second writer (another process, another store object) adds only what is new."""
    one, two = FeatureStore(str(tmp_path)), FeatureStore(str(tmp_path))
    assert one.write(_digests("a", 4), _rows(4, 0)) == 4
    assert two.write_new(_digests("a", 6), _rows(6, 0)) == _digests("a", 6)[4:]
    assert two.write(_digests("a", 6), _rows(6, 0)) == 0
    assert len(FeatureStore(str(tmp_path)).refresh()) == 6


def test_disk_full_leaves_no_partial_segment(tmp_path, monkeypatch):
    store = FeatureStore(str(tmp_path))
    store.write(_digests("a", 2), _rows(2, 0))
    before = sorted(os.listdir(tmp_path))
    real_save = np.save

    def full(file, arr, *args, **kwargs):
        if getattr(file, "name", "").find(".keys.npy") >= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(file, arr, *args, **kwargs)

    monkeypatch.setattr(np, "save", full)
    with pytest.raises(CacheWriteError, match="No space left on device.*kept"):
        store.write(_digests("b", 2), _rows(2, 1))
    assert sorted(os.listdir(tmp_path)) == before
    assert np.array_equal(FeatureStore(str(tmp_path)).refresh().read(_digests("a", 2)),
                          _rows(2, 0))


def test_sorted_runs_match_a_dictionary():
    """The merged-runs index finds the first segment holding each digest."""
    rng = np.random.default_rng(0)
    index, first = _SortedRuns(), {}
    for segment in range(40):
        keys = np.asarray([f"{k:032d}" for k in rng.integers(0, 300, rng.integers(1, 30))],
                          "S32")
        keys = np.unique(keys)
        index.add(keys, segment)
        for row, k in enumerate(keys):
            first.setdefault(k, (segment, row))
        assert len(index.runs) <= int(np.log2(sum(map(len, [r[0] for r in index.runs])))) + 2
    query = np.asarray([f"{k:032d}" for k in range(320)], "S32")
    segment, row = index.locate(query)
    for k, s, r in zip(query, segment, row, strict=True):
        assert (s, r) == first.get(k, (-1, 0))


# ---------------------------------------------------------------- through embed and the CLI


def _segment_files(store: FeatureStore) -> list[str]:
    return sorted(n[: -len(MANIFEST)] for n in os.listdir(store.folder) if n.endswith(MANIFEST))


def test_embed_re_embeds_what_was_quarantined(tmp_path, tiny_model):
    """Flipped bytes in a cached segment: the next embed says so, computes those samples
    again, and serves exactly the features of an undamaged cache."""
    pattern = write_good_shards(tmp_path, 2, 6)
    cache_dir = str(tmp_path / "c")
    first = embed_shards(tiny_model, [pattern], cache_dir, batch_size=4, workers=0,
                         flush_every=4, progress=False)
    cache = EmbeddingCache(cache_dir, tiny_model.fingerprint)
    digests = [r.image_digest for r in first.records]
    truth = cache.read_image(digests, [0])
    name = _segment_files(cache.image(0))[1]
    _flip(tmp_path / "c" / tiny_model.fingerprint / "image" / "view-000" / (name + FEATURES))
    again = embed_shards(tiny_model, [pattern], cache_dir, batch_size=4, workers=0,
                         flush_every=4, progress=False)
    assert 0 < again.embedded < len(first.records)
    fresh = EmbeddingCache(cache_dir, tiny_model.fingerprint)
    assert np.array_equal(fresh.read_image(digests, [0]), truth)
    assert verify_cache(cache_dir).clean


def test_cache_verify_command(tmp_path, tiny_model, capsys):
    """`mmia cache verify` checks every store, quarantines bad segments, exits 1 if any."""
    pattern = write_good_shards(tmp_path, 1, 5)
    cache_dir = tmp_path / "c"
    embed_shards(tiny_model, [pattern], str(cache_dir), views=1, batch_size=4, workers=0,
                 progress=False)
    assert mmia.cli.main(["cache", "verify", "--cache", str(cache_dir)]) == 0
    clean = capsys.readouterr().out
    assert "3 stores" in clean and "every committed segment passed" in clean
    text = cache_dir / tiny_model.fingerprint / "text"
    _flip(text / (_segment_files(FeatureStore(str(text)))[0] + FEATURES))
    assert mmia.cli.main(["cache", "verify", "--cache", str(cache_dir)]) == 1
    out = capsys.readouterr().out
    assert "checksum mismatch" in out and "1 bad segments quarantined" in out
    assert mmia.cli.main(["cache", "verify", "--cache", str(cache_dir)]) == 0
    assert "1 segments were already in quarantine" in capsys.readouterr().out


def test_audit_after_damage_gives_the_undamaged_scores(tmp_path, tiny_config, capsys):
    """The issue's case: bytes flipped in a feature file must not change any score."""
    (tmp_path / "m").mkdir()
    (tmp_path / "n").mkdir()
    members = write_good_shards(tmp_path / "m", 1, 8, seed=0)
    nonmembers = write_good_shards(tmp_path / "n", 1, 8, seed=1)
    cache = tmp_path / "c"

    def audit(out):
        rc = mmia.cli.main(["audit", "--model", "mmia-test-tiny", "--model-config", tiny_config,
                            "--device", "cpu", "--members", members, "--nonmembers", nonmembers,
                            "--attacks", "csa", "--bootstrap", "20", "--cache", str(cache),
                            "--out", str(tmp_path / out), "--workers", "0", "--batch-size", "4",
                            "--no-progress"])
        assert rc == 0, capsys.readouterr().err
        return (tmp_path / out / "scores.csv").read_text()

    clean = audit("clean")
    capsys.readouterr()
    fingerprint = next(p for p in cache.iterdir() if (p / "model.json").exists()).name
    for store in ("text", "image/view-000"):
        folder = cache / fingerprint / store
        for name in _segment_files(FeatureStore(str(folder))):
            _flip(folder / (name + FEATURES), offset=-3)
    clean_metrics = json.loads((tmp_path / "clean" / "metrics.json").read_text())
    assert clean_metrics["cache"]["quarantined_segments"] == []
    damaged = sum(len(_segment_files(FeatureStore(str(cache / fingerprint / s))))
                  for s in ("text", "image/view-000"))
    assert audit("damaged") == clean
    err = capsys.readouterr().err
    assert "quarantined segment" in err and "checksum mismatch" in err
    metrics = json.loads((tmp_path / "damaged" / "metrics.json").read_text())
    recorded = metrics["cache"]["quarantined_segments"]  # counted in the outputs, not only logged
    assert len(recorded) == damaged >= 2 and all("checksum mismatch" in r for r in recorded)
    assert any("quarantined" in n for n in metrics["notes"])


def test_probe_sees_a_folder_that_cannot_be_written():
    assert not EmbeddingCache("/proc/self", "fp").writable()


def test_read_only_cache_refuses_before_any_forward_pass(tmp_path, tiny_model, monkeypatch,
                                                         capsys):
    """A read-only cache serves what it holds; one that needs writes fails before the work."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    done = write_good_shards(tmp_path / "a", 1, 4, seed=0)
    more = write_good_shards(tmp_path / "b", 1, 4, seed=1)
    cache_dir = tmp_path / "c"
    embed_shards(tiny_model, [done], str(cache_dir), batch_size=4, workers=0, progress=False)
    monkeypatch.setattr(EmbeddingCache, "writable", lambda self: False)  # root ignores modes
    served = embed_shards(tiny_model, [done], str(cache_dir), batch_size=4, workers=0,
                          progress=False)
    assert (served.embedded, served.cached, served.forward_passes) == (0, 4, 0)
    def no_forward(*args, **kwargs):
        raise AssertionError("a forward pass was made")

    monkeypatch.setattr(mmia.encode.Encoder, "_run", no_forward)
    with pytest.raises(MmiaError, match="read-only.*not in it"):
        embed_shards(tiny_model, [done, more], str(cache_dir), batch_size=4, workers=0,
                     progress=False)


def test_commit_lock_held_elsewhere_is_waited_for_and_said(tmp_path, monkeypatch, caplog):
    """A run that holds the lock long (stopped with Ctrl-Z, a slow disk) is waited for, with a
    line saying so, never silently."""
    import fcntl
    import threading

    monkeypatch.setattr(mmia.cache, "LOCK_PATIENCE", 0.1)
    fd = os.open(tmp_path / mmia.cache.COMMIT_LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    threading.Timer(0.5, os.close, [fd]).start()
    with caplog.at_level(logging.INFO, logger="mmia"), mmia.cache.commit_lock(str(tmp_path)):
        pass
    assert any("waiting for the cache lock" in r.getMessage() for r in caplog.records)


def test_no_file_locks_is_a_warning_not_a_failure(tmp_path, monkeypatch, caplog):
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING, logger="mmia"), mmia.cache.commit_lock(str(tmp_path)):
        pass
    assert "no file locks here" in caplog.text


# ---------------------------------------------------------------- compaction (issue 13)


def _many_segments(folder, count: int = 12, rows: int = 3) -> dict[str, np.ndarray]:
    store, truth = FeatureStore(str(folder)), {}
    for s in range(count):
        keys, feats = [f"s{s:02d}{i:029d}" for i in range(rows)], _rows(rows, s)
        store.write(keys, feats)
        truth.update(zip(keys, feats, strict=True))
    return truth


def test_compaction_merges_segments_and_serves_the_same_rows(tmp_path):
    folder = tmp_path / "store"
    truth = _many_segments(folder)
    reader = FeatureStore(str(folder)).refresh()  # indexed the 12 small segments
    merged, written = FeatureStore(str(folder)).compact()
    assert (merged, written) == (12, 1)
    assert len(_segment_files(FeatureStore(str(folder)))) == 1
    keys = list(truth)
    expected = np.stack([truth[k] for k in keys])
    assert np.array_equal(FeatureStore(str(folder)).refresh().read(keys), expected)
    assert np.array_equal(reader.read(keys), expected)  # a stale index looks them up again
    assert not (folder / QUARANTINE).exists()


def test_compaction_killed_before_removing_old_segments_serves_each_digest_once(tmp_path,
                                                                               monkeypatch):
    folder = tmp_path / "store"
    truth = _many_segments(folder, count=4)
    monkeypatch.setattr(FeatureStore, "_remove",
                        lambda self, name: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        FeatureStore(str(folder)).compact()
    monkeypatch.undo()
    store = FeatureStore(str(folder)).refresh()
    assert len(_segment_files(store)) == 5 and len(store) == 12  # the copy, once
    keys = list(truth)
    assert np.array_equal(store.read(keys), np.stack([truth[k] for k in keys]))
    FeatureStore(str(folder)).compact()
    assert len(_segment_files(FeatureStore(str(folder)))) == 1
    assert verify_cache(str(tmp_path)).clean


def test_compaction_quarantines_a_bad_segment_instead_of_merging_it(tmp_path):
    folder = tmp_path / "store"
    truth = _many_segments(folder, count=4)
    bad = _segment_files(FeatureStore(str(folder)))[2]
    _flip(folder / (bad + FEATURES))
    FeatureStore(str(folder)).compact()
    store = FeatureStore(str(folder)).refresh()
    found = store.contains(list(truth))
    assert found.sum() == 9 and len(_segment_files(store)) == 1
    assert (folder / QUARANTINE / (bad + ".reason.txt")).exists()


def test_embed_compacts_whenever_a_store_has_many_small_segments(tmp_path, tiny_model, monkeypatch):
    import mmia.encode

    monkeypatch.setattr(mmia.encode, "COMPACT_AFTER", 4)
    pattern = write_good_shards(tmp_path, 2, 6)
    first = embed_shards(tiny_model, [pattern], str(tmp_path / "c"), batch_size=2, workers=0,
                         flush_every=2, progress=False)
    cache = EmbeddingCache(str(tmp_path / "c"), tiny_model.fingerprint)
    # 12 samples committed 2 at a time: 6 commits per store, merged whenever 4 are small
    assert len(_segment_files(cache.image(0))) < 4 and len(_segment_files(cache.text)) < 4
    t = first.records
    again = embed_shards(tiny_model, [pattern], str(tmp_path / "fresh"), batch_size=2,
                         workers=0, progress=False)
    fresh = EmbeddingCache(str(tmp_path / "fresh"), tiny_model.fingerprint)
    assert np.array_equal(cache.read_image(t.image_digest, [0]),
                          fresh.read_image(again.records.image_digest, [0]))


def test_cache_info_and_compact_commands(tmp_path, capsys):
    _many_segments(tmp_path / "c" / "fp" / "text", count=5)
    assert mmia.cli.main(["cache", "info", "--cache", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "fp/text\t5\t15\t" in out and "1 stores" in out
    assert mmia.cli.main(["cache", "compact", "--cache", str(tmp_path / "c")]) == 0
    assert "merged 5 segments into 1" in capsys.readouterr().out
    mmia.cli.main(["cache", "info", "--cache", str(tmp_path / "c")])
    assert "fp/text\t1\t15\t" in capsys.readouterr().out


def test_index_is_exact_when_digest_hashes_collide(monkeypatch):
    """The index searches by a 64-bit hash of each digest; where hashes collide (forced here:
    4 distinct values), the digests themselves decide."""
    import mmia.cache

    real = mmia.cache.key_hash
    monkeypatch.setattr(mmia.cache, "key_hash", lambda keys: real(keys) % np.uint64(4))
    index, first = _SortedRuns(), {}
    rng = np.random.default_rng(1)
    for segment in range(12):
        keys = np.unique(np.asarray([f"{k:032d}" for k in rng.integers(0, 100, 15)], "S32"))
        index.add(keys, segment)
        for row, k in enumerate(keys):
            first.setdefault(k, (segment, row))
    query = np.asarray([f"{k:032d}" for k in range(110)], "S32")
    segment, row = index.locate(query)
    for k, s, r in zip(query, segment, row, strict=True):
        assert (s, r) == first.get(k, (-1, 0))
