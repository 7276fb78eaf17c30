"""Warm reads at scale (issue 13): a segment checked by an earlier process is not hashed again
while its file is the one checked (verification marks), reads fill blocks with plain reads and
can reuse one array, and content comparisons go by 64-bit hash with every match confirmed."""

from __future__ import annotations

import os

import numpy as np
import pytest

import mmia.audit
import mmia.cache
from mmia.audit import RoleSamples, check_roles_disjoint
from mmia.cache import FEATURES, QUARANTINE, CacheMiss, EmbeddingCache, FeatureStore
from mmia.errors import MmiaError
from mmia.sample_index import SampleTable

D = 6
VERIFIED = "verified"  # mmia.cache.VERIFIED: the folder of verification marks


def _digests(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:0{32 - len(prefix)}d}" for i in range(n)]


def _rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)


@pytest.fixture
def store_with_two_segments(tmp_path):
    folder = tmp_path / "store"
    store = FeatureStore(str(folder))
    truth = {}
    for prefix, seed in (("a", 1), ("b", 2)):
        keys, rows = _digests(prefix, 5), _rows(5, seed)
        store.write(keys, rows)
        truth.update(zip(keys, rows, strict=True))
    return folder, truth


@pytest.fixture
def hashes(monkeypatch):
    """Counts the feature-data checks (`_check_data` calls) by file name."""
    calls: list[str] = []
    real = mmia.cache._check_data
    monkeypatch.setattr(mmia.cache, "_check_data",
                        lambda f, *a: calls.append(os.path.basename(f.name)) or real(f, *a))
    return calls


def _new_process() -> None:
    mmia.cache._VERIFIED.clear()  # what a new process starts with


def _feature_files(folder) -> list:
    return sorted(p for p in folder.iterdir() if p.name.endswith(FEATURES))


def test_a_later_process_trusts_the_mark_until_the_file_changes(store_with_two_segments, hashes,
                                                                monkeypatch):
    assert mmia.cache.VERIFIED == VERIFIED
    folder, truth = store_with_two_segments
    monkeypatch.setattr(mmia.cache, "MARK_AFTER_SECONDS", 0.0)
    keys = list(truth)
    _new_process()
    assert np.array_equal(FeatureStore(str(folder)).read(keys), np.stack(list(truth.values())))
    assert len(hashes) == 2 and len(os.listdir(folder / VERIFIED)) == 2
    _new_process()
    assert np.array_equal(FeatureStore(str(folder)).read(keys), np.stack(list(truth.values())))
    assert len(hashes) == 2  # marked: not hashed again
    damaged = _feature_files(folder)[0]
    data = bytearray(damaged.read_bytes())
    data[-3] ^= 0x5A
    damaged.write_bytes(bytes(data))  # in place: same inode and size, another ctime
    _new_process()
    store = FeatureStore(str(folder)).refresh()
    assert store.contains(keys).tolist() == [False] * 5 + [True] * 5
    assert hashes[2:] == [damaged.name]  # only the changed file is hashed again
    assert (folder / QUARANTINE / damaged.name).exists()
    assert sorted(os.listdir(folder / VERIFIED)) == [_feature_files(folder)[0].name.replace(
        FEATURES, ".json")]  # the quarantined segment's mark is gone
    with pytest.raises(CacheMiss):
        store.read(keys[:5])


def _marks(folder) -> list[str]:
    return sorted(os.listdir(folder / VERIFIED)) if (folder / VERIFIED).exists() else []


def test_a_file_changed_just_before_its_check_is_not_marked(store_with_two_segments, hashes,
                                                            monkeypatch):
    """Within MARK_AFTER_SECONDS of a change (by the file system's clock) a mark could outlive
    an edit in the same tick of a coarse clock: the next process checks again."""
    folder, truth = store_with_two_segments
    monkeypatch.setattr(mmia.cache, "MARK_AFTER_SECONDS", 3600.0)
    for _ in range(2):
        _new_process()
        FeatureStore(str(folder)).read(list(truth))
    assert len(hashes) == 4 and _marks(folder) == []  # no mark, no temporary file left


def test_a_file_changed_while_it_is_hashed_is_not_marked(store_with_two_segments, hashes,
                                                         monkeypatch):
    folder, truth = store_with_two_segments
    monkeypatch.setattr(mmia.cache, "MARK_AFTER_SECONDS", 0.0)
    real = mmia.cache._check_data

    def touch_during_the_hash(f, *args):
        real(f, *args)
        os.chmod(f.name, 0o644)  # any change of the file's metadata moves its ctime
        monkeypatch.setattr(mmia.cache, "_check_data", real)

    monkeypatch.setattr(mmia.cache, "_check_data", touch_during_the_hash)
    _new_process()
    store = FeatureStore(str(folder)).refresh()
    assert store.contains(list(truth)).all()  # checks both segments, touching the first
    assert len(_marks(folder)) == 1  # only the untouched one is marked
    assert np.array_equal(store.read(list(truth)), np.stack(list(truth.values())))
    assert len(_marks(folder)) == 2  # the touched file, checked again as it is now


def test_an_expired_mark_is_hashed_again(store_with_two_segments, hashes, monkeypatch):
    folder, truth = store_with_two_segments
    monkeypatch.setattr(mmia.cache, "MARK_AFTER_SECONDS", 0.0)
    _new_process()
    FeatureStore(str(folder)).read(list(truth))
    monkeypatch.setattr(mmia.cache, "MARK_LIFETIME_SECONDS", 0.0)
    _new_process()
    FeatureStore(str(folder)).read(list(truth))
    assert len(hashes) == 4


def test_verify_ignores_marks_and_a_mark_is_bound_to_its_manifest(store_with_two_segments,
                                                                  hashes, monkeypatch):
    folder, truth = store_with_two_segments
    monkeypatch.setattr(mmia.cache, "MARK_AFTER_SECONDS", 0.0)
    _new_process()
    FeatureStore(str(folder)).read(list(truth))
    assert len(hashes) == 2
    _new_process()
    assert FeatureStore(str(folder)).verify_all() == (2, 10)
    assert len(hashes) == 4  # `mmia cache verify` hashes everything, marks or not
    mark = next((folder / VERIFIED).iterdir())
    mark.write_text(mark.read_text().replace('"feat_sha256": "', '"feat_sha256": "0'))
    _new_process()
    FeatureStore(str(folder)).read(list(truth))
    assert len(hashes) == 5  # that mark no longer matches the manifest: hashed again


def test_compaction_hashes_what_marks_vouch_for_and_removes_their_marks(tmp_path, hashes,
                                                                       monkeypatch):
    """A merged segment gets a new checksum of what compaction read, so what it reads is
    hashed first, marked or not; the merged segments' marks (and stale temporary files) go."""
    monkeypatch.setattr(mmia.cache, "MARK_AFTER_SECONDS", 0.0)
    store, truth = FeatureStore(str(tmp_path)), {}
    for i in range(4):
        keys, rows = _digests(f"{i}", 3), _rows(3, i)
        store.write(keys, rows)
        truth.update(zip(keys, rows, strict=True))
    store.read(list(truth))
    assert len(_marks(tmp_path)) == 4 and len(hashes) == 4
    stale = tmp_path / VERIFIED / ".tmp-left-by-a-killed-run"
    stale.write_text("")
    os.utime(stale, (0, 0))
    _new_process()
    compacting = FeatureStore(str(tmp_path))
    compacting.read(list(truth))
    assert len(hashes) == 4  # the marks were trusted for serving
    assert compacting.compact(target_bytes=1 << 20) == (4, 1)
    assert len(hashes) == 8  # but not for merging
    assert len(_marks(tmp_path)) <= 1 and not stale.exists()
    assert np.array_equal(compacting.read(list(truth)), np.stack(list(truth.values())))


@pytest.mark.parametrize("window_rows", [None, 7])
def test_reads_of_runs_gaps_and_scattered_rows_into_a_reused_array(tmp_path, monkeypatch,
                                                                   window_rows):
    if window_rows:  # rows near each other are read through windows of 7 rows
        monkeypatch.setattr(mmia.cache, "SPAN_BYTES", window_rows * 4 * D)
    rng = np.random.default_rng(0)
    store, keys, rows = FeatureStore(str(tmp_path)), [], []
    for s in range(3):
        k, r = _digests(f"s{s}", 200), _rows(200, s)
        store.write(k, r)
        keys += k
        rows.append(r)
    keys, truth = np.array(keys, "S32"), np.concatenate(rows)
    reader = FeatureStore(str(tmp_path)).refresh()
    buffer = np.full((800, D), np.nan, np.float32)
    picks = {"in order": np.arange(600), "reversed": np.arange(600)[::-1],
             "a run with gaps": np.arange(0, 600, 2), "scattered": rng.choice(600, 40, False),
             "one row": np.array([417]), "shuffled": rng.permutation(600),
             "repeated digests": rng.integers(0, 600, 700)}
    for what, pick in picks.items():
        got = reader.read(keys[pick])
        assert np.array_equal(got, truth[pick]), what
        into = reader.read(keys[pick], into=buffer)
        assert np.array_equal(into, truth[pick]) and np.shares_memory(into, buffer), what
    too_small = np.zeros((10, D), np.float32)
    got = reader.read(keys[:50], into=too_small)
    assert not np.shares_memory(got, too_small) and np.array_equal(got, truth[:50])
    wrong_width = np.zeros((50, D + 1), np.float32)
    assert np.array_equal(reader.read(keys[:50], into=wrong_width), truth[:50])
    read_only = np.zeros((50, D), np.float32)
    read_only.flags.writeable = False
    assert np.array_equal(reader.read(keys[:50], into=read_only), truth[:50])


def test_a_store_mixing_feature_widths_is_an_error_not_garbage(tmp_path):
    store = FeatureStore(str(tmp_path))
    store.write(_digests("a", 40), _rows(40, 0))
    store.write(_digests("b", 40), np.ones((40, D + 2), np.float32))
    with pytest.raises(MmiaError, match="widths 6 and 8"):
        FeatureStore(str(tmp_path)).read(_digests("a", 40) + _digests("b", 40))


def test_a_file_replaced_between_its_check_and_the_read_is_not_served(tmp_path, monkeypatch):
    store = FeatureStore(str(tmp_path))
    keys, rows = _digests("a", 50), _rows(50, 0)
    store.write(keys, rows)
    (path,) = _feature_files(tmp_path)
    real = FeatureStore._features

    def check_then_replace(self, seg, *args):
        feat = real(self, seg, *args)
        replacement = np.load(path)
        replacement[3] += 1
        path.unlink()
        np.save(path, replacement)  # a new file behind the checked one's name
        monkeypatch.setattr(FeatureStore, "_features", real)
        return feat

    monkeypatch.setattr(FeatureStore, "_features", check_then_replace)
    with pytest.raises(CacheMiss):
        FeatureStore(str(tmp_path)).read(keys)
    assert (tmp_path / QUARANTINE / path.name).exists()


def test_a_file_touched_after_its_check_is_checked_again_not_quarantined(tmp_path, hashes):
    store = FeatureStore(str(tmp_path))
    keys, rows = _digests("a", 50), _rows(50, 0)
    store.write(keys, rows)
    _new_process()
    reader = FeatureStore(str(tmp_path))
    assert np.array_equal(reader.read(keys), rows)
    reader._segments[0].seen_unchanged = -np.inf
    os.chmod(_feature_files(tmp_path)[0], 0o600)  # a backup tool's chmod: another ctime
    assert np.array_equal(reader.read(keys), rows) and len(hashes) == 2
    assert not (tmp_path / QUARANTINE).exists()


def test_the_mapped_file_is_the_checked_file(tmp_path, monkeypatch):
    """Scattered rows come from a map of the descriptor whose identity was checked: a file
    put behind the name while the header is read is neither served nor taken for checked."""
    store = FeatureStore(str(tmp_path))
    keys, rows = _digests("a", 300), _rows(300, 0)
    store.write(keys, rows)
    (path,) = _feature_files(tmp_path)
    real = mmia.cache._open_rows

    def replace_while_reading_the_header(f):
        replacement = np.load(path)
        replacement[:] = 7
        path.unlink()
        np.save(path, replacement)
        monkeypatch.setattr(mmia.cache, "_open_rows", real)
        return real(f)

    monkeypatch.setattr(mmia.cache, "_open_rows", replace_while_reading_the_header)
    _new_process()
    scattered = [keys[i] for i in (0, 150, 299)]
    try:
        served = FeatureStore(str(tmp_path)).read(scattered)
    except CacheMiss:
        served = None
    assert served is None or np.array_equal(served, rows[[0, 150, 299]])  # never the 7s
    assert (tmp_path / QUARANTINE / path.name).exists()  # the replacement failed its check


def test_blocks_reuse_their_arrays_and_give_every_row(tmp_path):
    cache = EmbeddingCache(str(tmp_path), "f" * 16)
    n = 23
    image_keys, text_keys = _digests("i", n), _digests("t", n)
    cache.image(0).write(image_keys, _rows(n, 1))
    cache.text.write(text_keys, _rows(n, 2))
    table = SampleTable([f"k{i}" for i in range(n)], image_keys, text_keys, ["c"] * n,
                        [0] * n, ["u"], [None] * n, np.zeros((n, 10), np.float32))
    samples = RoleSamples(table, cache)
    whole = samples.features()
    seen, arrays = [], set()
    for block in samples.blocks(size=5):
        seen.append((block.image.copy(), block.text.copy(), list(block.keys)))
        arrays.add(block.image.__array_interface__["data"][0])
    assert np.array_equal(np.concatenate([s[0] for s in seen]), whole.image)
    assert np.array_equal(np.concatenate([s[1] for s in seen]), whole.text)
    assert sum((s[2] for s in seen), []) == whole.keys
    assert len(arrays) == 1  # one array, refilled block after block


def _table(contents: list[tuple[int, int]], prefix: str) -> SampleTable:
    n = len(contents)
    return SampleTable([f"{prefix}/{i}" for i in range(n)],
                       [f"{a:032d}" for a, _ in contents], [f"{b:032x}" for _, b in contents],
                       ["c"] * n, [0] * n, [prefix], [None] * n, np.zeros((n, 10), np.float32))


@pytest.mark.parametrize("collide", [False, True])
def test_content_comparisons_are_exact_even_when_hashes_collide(monkeypatch, collide):
    from mmia.audit import content_in, first_of_each_content

    if collide:  # every content hashes alike: only the digests can tell them apart
        monkeypatch.setattr(mmia.audit, "key_hash",
                            lambda digests: np.zeros(len(digests), np.uint64))
    rng = np.random.default_rng(1)
    contents = [tuple(map(int, pair)) for pair in rng.integers(0, 6, (60, 2))]
    table = _table(contents, "a")
    expected = sorted({c: i for i, c in reversed(list(enumerate(contents)))}.values())
    assert first_of_each_content(table).tolist() == expected
    other = [(a + 3, b) for a, b in contents[:20]]  # some equal contents, some not
    found = content_in(_table(other, "b"), table)
    assert found.tolist() == [c in set(contents) for c in other]
    check_roles_disjoint({"members": _table([(1, 1), (2, 2)], "m"),
                          "nonmembers": _table([(1, 2), (2, 1)], "n")})
    with pytest.raises(MmiaError, match="1 sample"):
        check_roles_disjoint({"members": _table([(1, 1), (2, 2)], "m"),
                              "nonmembers": _table([(1, 2), (2, 2)], "n")})
