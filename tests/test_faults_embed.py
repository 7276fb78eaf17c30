"""Fault suite, embedding engine: descriptor limits, elongated images, huge batch sizes,
skip reasons shown, concurrent runs on one cache (issue 14, cases 8, 9, 11, 13, 14)."""

from __future__ import annotations

import functools
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from PIL import Image
from shardgen import (
    good_members,
    sample_members,
    serve_folder,
    write_good_shards,
    write_shard,
)
from test_embed import cache_contents

import mmia.cli
import mmia.embed
import mmia.encode
from mmia.cache import EmbeddingCache
from mmia.embed import embed_shards
from mmia.errors import MmiaError
from mmia.shards import Sample

# ---------------------------------------------------------------- case 8: descriptor limit

_LOW_LIMIT_EMBED = textwrap.dedent("""
    import json, resource, sys
    limit, pattern, cache, config, views = sys.argv[1:6]
    resource.setrlimit(resource.RLIMIT_NOFILE,
                       (int(limit), resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    from mmia.embed import embed_shards
    from mmia.model import load_model
    model = load_model("mmia-test-tiny", model_config=config, device="cpu")
    result = embed_shards(model, [pattern], cache, views=int(views), batch_size=8, workers=1,
                          progress=False)
    print(json.dumps({"embedded": result.embedded, "records": len(result.records)}))
""")


def test_many_views_cross_a_low_descriptor_limit(tmp_path, tiny_model, tiny_config):
    """16 samples × 7 views from a worker under RLIMIT_NOFILE 64: one tensor per view ran out
    of descriptors (and lost the chunk); one tensor per chunk completes, with the features of
    an in-process run."""
    pattern = write_good_shards(tmp_path, 1, 16)
    root = os.path.dirname(os.path.dirname(os.path.abspath(mmia.__file__)))
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(
        [sys.executable, "-c", _LOW_LIMIT_EMBED, "64", pattern, str(tmp_path / "worker"),
         tiny_config, "6"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True)
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("embedding under a low descriptor limit hung")
    assert proc.returncode == 0, err[-2000:]
    assert json.loads(out.splitlines()[-1]) == {"embedded": 16, "records": 16}, err[-2000:]
    embed_shards(tiny_model, [pattern], str(tmp_path / "inline"), views=6, batch_size=8,
                 workers=0, progress=False)
    views = range(7)
    got = cache_contents(EmbeddingCache(str(tmp_path / "worker"), tiny_model.fingerprint), views)
    want = cache_contents(EmbeddingCache(str(tmp_path / "inline"), tiny_model.fingerprint), views)
    assert len(want["pairs"][0]) == 16
    assert got == want


class _UnpicklableUrl(str):
    """A shard url that carries a lambda: a chunk holding it cannot be sent."""


def _unpicklable_second_sample(read_shard):
    """Wrap the reader so its second sample carries a lambda: its chunk cannot be sent."""

    def reader(url, labels):
        for i, item in enumerate(read_shard(url, labels)):
            if i == 1 and isinstance(item, Sample):
                item.url = _UnpicklableUrl(item.url)
                item.url.carry = lambda: None
            yield item

    return reader


def test_a_chunk_lost_by_a_worker_is_an_error(tmp_path, tiny_model, monkeypatch):
    """A chunk a worker fails to send (as EMFILE did) must not vanish with exit 0."""
    monkeypatch.setattr(mmia.encode, "read_shard",
                        _unpicklable_second_sample(mmia.encode.read_shard))
    pattern = write_good_shards(tmp_path, 1, 4)
    with pytest.raises(MmiaError, match="never arrived"):
        embed_shards(tiny_model, [pattern], str(tmp_path / "c"), batch_size=4, workers=1,
                     progress=False, mp_context="fork")


# ---------------------------------------------------------------- case 9: elongated images


@functools.lru_cache(maxsize=2)
def _strip_png(width: int, height: int) -> bytes:
    """A black greyscale strip: about 1-2 KB on disk, a million pixels."""
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, "PNG", optimize=True)
    return buf.getvalue()


@pytest.mark.parametrize("size", [(1, 1_000_000), (1_000_000, 1)])
def test_extreme_aspect_ratio_is_a_counted_skip(tmp_path, tiny_model, size):
    """A 1 × 1,000,000 PNG passes the pixel-count guard; the shortest-side resize would make
    it gigabytes. It is refused before decoding, counted, and its size shown."""
    png = _strip_png(*size)
    assert len(png) < 4096
    write_shard(tmp_path / "00000.tar", good_members(0, 2) + sample_members("strip", png, b"s"))
    result = embed_shards(tiny_model, [str(tmp_path / "00000.tar")], str(tmp_path / "c"),
                          batch_size=4, workers=0, progress=False)
    assert dict(result.skips) == {"extreme_aspect_ratio": 1}
    assert len(result.records) == 2 and result.embedded == 2
    assert f"{size[0]}x{size[1]}" in result.summary()


# ---------------------------------------------------------------- case 11: huge batch sizes


def _record_forward_rows(model, monkeypatch) -> list[int]:
    """Rows of every batch passed to the image and text encoders (a wrapper that refuses
    to run more than 4096 rows, so the unbounded code fails fast instead of thrashing)."""
    rows: list[int] = []
    for name in ("encode_image", "encode_text"):
        original = getattr(model.model, name)

        def wrapper(batch, *args, _original=original, **kwargs):
            rows.append(len(batch))
            assert len(batch) <= 4096, f"a forward pass of {len(batch)} rows"
            return _original(batch, *args, **kwargs)

        monkeypatch.setattr(model.model, name, wrapper)
    return rows


def test_huge_batch_size_with_few_samples_pads_to_a_bounded_size(tmp_path, tiny_model,
                                                                  monkeypatch):
    """--batch-size 100000 with 6 samples: every forward pass has the same, bounded number
    of rows (1024, the documented cap), and the features equal a --batch-size 1024 run's."""
    pattern = write_good_shards(tmp_path, 2, 3)
    rows = _record_forward_rows(tiny_model, monkeypatch)
    huge = embed_shards(tiny_model, [pattern], str(tmp_path / "huge"), batch_size=100_000,
                        workers=0, progress=False)
    assert huge.embedded == 6 and rows and set(rows) == {1024}
    embed_shards(tiny_model, [pattern], str(tmp_path / "cap"), batch_size=1024, workers=0,
                 progress=False)
    fingerprint = tiny_model.fingerprint
    assert (cache_contents(EmbeddingCache(str(tmp_path / "huge"), fingerprint), [0])
            == cache_contents(EmbeddingCache(str(tmp_path / "cap"), fingerprint), [0]))


def test_batch_size_beyond_memory_is_refused_before_any_forward_pass(tmp_path, tiny_model,
                                                                      monkeypatch):
    """With room for 10 padded rows of image input, --batch-size 64 is one-line MmiaError
    naming 10, before any shard is read or forward pass made; --batch-size 10 runs."""
    copies = mmia.encode.INPUT_COPIES
    row_bytes = copies * 3 * 32 * 32 * 4  # tiny model: 3×32×32 fp32 inputs
    monkeypatch.setattr(mmia.encode, "available_memory", lambda device: 10 * row_bytes + 5)
    rows = _record_forward_rows(tiny_model, monkeypatch)
    pattern = write_good_shards(tmp_path, 1, 3)
    with pytest.raises(MmiaError, match=r"--batch-size 64 .*use --batch-size 10 or less") as e:
        embed_shards(tiny_model, [pattern], str(tmp_path / "c"), batch_size=64, workers=0,
                     progress=False)
    assert "\n" not in str(e.value)
    assert rows == [] and not (tmp_path / "c").exists()
    ok = embed_shards(tiny_model, [pattern], str(tmp_path / "c"), batch_size=10, workers=0,
                      progress=False)
    assert ok.embedded == 3 and set(rows) == {10}


# ---------------------------------------------------------------- case 13: why a shard failed


@pytest.fixture
def http_root(tmp_path):
    """A loopback http server over tmp_path/www; yields its base url."""
    (tmp_path / "www").mkdir()
    with serve_folder(tmp_path / "www") as url:
        yield url


def _example_for(lines: list[str], where: str) -> str:
    found = [line for line in lines if where in line]
    assert found, f"no example naming {where!r} in {lines}"
    detail = found[0].split(where, 1)[1].lstrip(": ")
    assert len(detail) >= 5, f"no reason given for {where!r}: {found[0]!r}"
    return detail


def test_unreadable_shards_say_why_in_summary_and_metrics(tmp_path, tiny_model, tiny_config,
                                                         http_root, capsys):
    """A directory as a shard and an http 404: the summary, the console and metrics.json
    give each shard and its reason next to the counts; examples stay few per reason."""
    (tmp_path / "m").mkdir()
    (tmp_path / "n").mkdir()
    (tmp_path / "adir").mkdir()
    bad = [sample_members(f"bad{i}", b"not an image %d" % i, b"c") for i in range(8)]
    write_shard(tmp_path / "m/00000.tar", good_members(0, 4) + sum(bad, []))
    nonmembers = write_good_shards(tmp_path / "n", 1, 4, seed=1)
    missing = f"{http_root}/missing.tar"
    folder = str(tmp_path / "adir")
    result = embed_shards(tiny_model, [str(tmp_path / "m/00000.tar"), folder, missing],
                          str(tmp_path / "c0"), batch_size=4, workers=0, progress=False)
    assert result.skips == {"unreadable_shard": 2, "undecodable_image": 8}
    summary = result.summary().splitlines()
    assert "directory" in _example_for(summary, folder).lower()
    _example_for(summary, missing)
    assert len([line for line in summary if "undecodable_image: " in line]) == 3

    out = tmp_path / "out"
    rc = mmia.cli.main(["audit", "--model", "mmia-test-tiny", "--model-config", tiny_config,
                        "--device", "cpu", "--members", str(tmp_path / "m/00000.tar"),
                        "--members", folder, "--members", missing, "--nonmembers", nonmembers,
                        "--attacks", "csa", "--bootstrap", "20", "--cache", str(tmp_path / "c"),
                        "--out", str(out), "--workers", "0", "--batch-size", "4",
                        "--no-progress"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    console = (printed.out + printed.err).splitlines()
    assert "directory" in _example_for(console, folder).lower()
    _example_for(console, missing)
    data = json.loads((out / "metrics.json").read_text())["data"]["members"]
    assert data["skipped"] == {"unreadable_shard": 2, "undecodable_image": 8}
    examples = data["skip_examples"]
    assert "directory" in _example_for(examples["unreadable_shard"], folder).lower()
    _example_for(examples["unreadable_shard"], missing)
    assert len(examples["undecodable_image"]) == 3


# ---------------------------------------------------------------- case 14: concurrent runs


def _store_digests(cache: EmbeddingCache, views) -> dict:
    """The set of digests cached in each store."""
    out = {}
    stores = {"text": cache.text, **{v: cache.image(v) for v in views if v == 0}}
    if max(views) >= 1:
        stores["pairs"] = cache.pairs(max(views))
    for name, store in stores.items():
        store.refresh()
        out[name] = store.digests()
    return out


def test_a_run_overtaken_by_another_says_it_embedded_nothing(tmp_path, tiny_model):
    """Run A has queued every sample when run B embeds them all into the same cache: A makes
    no forward pass, commits nothing and says 0 embedded, 12 cached; B says 12 embedded."""
    pattern = write_good_shards(tmp_path, 1, 12)
    cache_dir = str(tmp_path / "c")
    other: list = []

    def overtake(done: int, counts: dict) -> None:
        if not other:  # A's first chunk is queued, not yet encoded (batch 32 > 12 samples)
            other.append(embed_shards(tiny_model, [pattern], cache_dir, views=1, batch_size=32,
                                      workers=0, progress=False))

    first = embed_shards(tiny_model, [pattern], cache_dir, views=1, batch_size=32, workers=0,
                         progress=overtake)
    assert (other[0].embedded, other[0].cached) == (12, 0)
    assert (first.embedded, first.cached) == (0, 12)
    assert first.forward_passes == 0
    assert "0 embedded now, 12 already cached" in first.summary()


def _yield_cpu(done: int, counts: dict) -> None:
    """A progress callback that lets the other thread run (interleaves the two runs)."""
    time.sleep(0.005)


def test_concurrent_runs_claim_each_sample_once(tmp_path, tiny_model):
    """Two embeds of the same shards into one cache at once: the samples they say they
    embedded add up to the distinct samples, and every feature is cached."""
    pattern = write_good_shards(tmp_path, 3, 8)
    cache_dir = str(tmp_path / "c")
    start = threading.Barrier(2)
    results: list = [None, None]
    errors: list = []

    def run(i: int) -> None:
        try:
            start.wait()
            results[i] = embed_shards(tiny_model, [pattern], cache_dir, views=1, batch_size=4,
                                      workers=0, flush_every=4, progress=_yield_cpu)
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    a, b = results
    assert len(a.records) == len(b.records) == 24
    assert a.embedded + b.embedded == 24
    assert a.embedded + a.cached == b.embedded + b.cached == 24
    cache = EmbeddingCache(cache_dir, tiny_model.fingerprint)
    want_images = {r.image_digest for r in a.records}
    stored = _store_digests(cache, [0, 1])
    assert stored[0] == want_images and stored["pairs"] == set(a.records.pair_digest.astype(str))
    assert stored["text"] == {r.caption_digest for r in a.records}
    assert cache.read_image(sorted(want_images), [0]).shape == (24, 1, 32)
