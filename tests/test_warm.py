"""The warm path: a shard whose sample index is current and whose features are cached is
answered without reading its tar, decoding an image or building the model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from shardgen import bomb_png, good_members, serve_folder, write_good_shards, write_shard

import mmia.encode
import mmia.shards
from mmia.embed import embed_shards
from mmia.modelref import LazyModel, ModelRequest


class NoModel:
    """A model reference whose model must never be built."""

    def __init__(self, fingerprint: str):
        self.fingerprint = fingerprint
        self.description = {}

    def get(self):
        raise AssertionError("the model was built on a warm run")


def _no_reading(monkeypatch) -> None:
    def refuse(urls):
        raise AssertionError(f"a shard was read: {list(urls)}")

    monkeypatch.setattr(mmia.shards, "tar_members", refuse)


def _hostile_shard(folder) -> str:
    members = good_members(7, 3) + [
        ("bad.jpg", b"not an image"), ("bad.txt", b"a caption"),
        ("nocap.jpg", good_members(8, 1)[0][1]),
        ("bomb.png", bomb_png()), ("bomb.txt", b"a bomb"),
    ]
    return write_shard(folder / "00007.tar", members)


def _summary(result) -> tuple:
    t = result.records
    return (t.key.tolist(), t.image_digest.tolist(), t.caption_digest.tolist(),
            t.caption.tolist(), t.url().tolist(), np.round(t.stats, 6).tolist(),
            dict(result.skips), dict(result.warnings), result.skip_examples)


def _embed(model, patterns, cache, **kw):
    kw = {"views": 0, "batch_size": 4, "workers": 0, "progress": False, **kw}
    return embed_shards(model, patterns, str(cache), **kw)


def test_warm_run_reads_no_shard_decodes_nothing_and_builds_no_model(tmp_path, tiny_model,
                                                                      monkeypatch):
    pattern = write_good_shards(tmp_path, 2, 3)
    hostile = _hostile_shard(tmp_path)
    cold = _embed(tiny_model, [pattern, hostile], tmp_path / "c", views=2)
    assert cold.skips["undecodable_image"] == 1 and cold.skips["missing_caption"] == 1
    assert cold.shards_read == 3
    _no_reading(monkeypatch)
    warm = _embed(NoModel(tiny_model.fingerprint), [pattern, hostile], tmp_path / "c", views=2)
    assert _summary(warm) == _summary(cold)
    assert warm.shards_read == 0 and warm.forward_passes == 0
    assert warm.cached == len(warm.records) == 9 and warm.embedded == 0
    assert "3 of 3 shards answered from the sample index" in warm.summary()


def test_a_changed_shard_is_read_again(tmp_path, tiny_model):
    pattern = write_good_shards(tmp_path, 2, 3)
    _embed(tiny_model, [pattern], tmp_path / "c")
    write_shard(tmp_path / "00001.tar", good_members(1, 4, seed=5))  # new content and size
    again = _embed(tiny_model, [pattern], tmp_path / "c")
    fresh = _embed(tiny_model, [pattern], tmp_path / "fresh")
    assert again.shards_read == 1 and again.embedded == 4
    assert _summary(again) == _summary(fresh)


def test_more_views_reread_the_shard_but_not_its_known_bad_images(tmp_path, tiny_model,
                                                                   monkeypatch):
    hostile = _hostile_shard(tmp_path)
    _embed(tiny_model, [hostile], tmp_path / "c")
    decoded = []
    real = mmia.encode.decode_image
    monkeypatch.setattr(mmia.encode, "decode_image",
                        lambda data: decoded.append(len(data)) or real(data))
    more = _embed(tiny_model, [hostile], tmp_path / "c", views=2)
    assert more.shards_read == 1 and len(more.records) == 3
    assert len(decoded) == 3  # the good images, for their views; not "bad" nor the bomb
    assert more.skips["undecodable_image"] == 1 and more.skips["decompression_bomb"] == 1


def test_keys_follow_the_labels_of_this_run(tmp_path, tiny_model, monkeypatch):
    for top in ("x", "y"):
        (tmp_path / top / "a").mkdir(parents=True)
        write_shard(tmp_path / top / "a" / "00000.tar", good_members(0, 2, seed=ord(top)))
    one = str(tmp_path / "x" / "a" / "00000.tar")
    both = [one, str(tmp_path / "y" / "a" / "00000.tar")]
    alone = _embed(tiny_model, [one], tmp_path / "c")
    assert alone.records.key[0].startswith("a/00000/")
    _embed(tiny_model, both, tmp_path / "c")  # indexes the y shard too
    _no_reading(monkeypatch)
    warm = _embed(NoModel(tiny_model.fingerprint), both, tmp_path / "c")
    assert {k.rsplit("/", 1)[0] for k in warm.records.key} == {"x/a/00000", "y/a/00000"}
    warm_alone = _embed(NoModel(tiny_model.fingerprint), [one], tmp_path / "c")
    assert warm_alone.records.key.tolist() == alone.records.key.tolist()


def test_http_shard_is_indexed_by_its_length_and_pipe_shards_are_not(tmp_path, tiny_model,
                                                                      monkeypatch):
    write_good_shards(tmp_path, 1, 3)
    with serve_folder(tmp_path) as base:
        url = f"{base}/00000.tar"
        pipe = f"pipe:cat {tmp_path / '00000.tar'}"
        cold = _embed(tiny_model, [url], tmp_path / "c")
        _embed(tiny_model, [pipe], tmp_path / "p")
        index = tmp_path / "p" / "samples"
        assert not index.exists() or os.listdir(index) == []
        _no_reading(monkeypatch)
        warm = _embed(NoModel(tiny_model.fingerprint), [url], tmp_path / "c")
        assert _summary(warm) == _summary(cold)
        with pytest.raises(AssertionError, match="a shard was read"):
            _embed(tiny_model, [pipe], tmp_path / "p")


def test_model_memo_gives_the_built_fingerprint_without_building(tmp_path, tiny_config):
    request = ModelRequest("mmia-test-tiny", model_config=tiny_config, device="cpu")
    first = LazyModel(request, str(tmp_path))
    built = first.get().fingerprint
    again = LazyModel(request, str(tmp_path))
    assert again.fingerprint == built and not again.built
    assert again.description["weights"] == first.get().description["weights"]
    other = LazyModel(ModelRequest("mmia-test-tiny", model_config=tiny_config, device="cpu",
                                   precision="bf16"), str(tmp_path))
    assert other._memo is None  # another request: no memo to trust


def test_warm_cli_audit_imports_no_torch(tmp_path, tiny_config):
    (tmp_path / "m").mkdir()
    (tmp_path / "n").mkdir()
    members = write_good_shards(tmp_path / "m", 1, 12)
    nonmembers = write_good_shards(tmp_path / "n", 1, 12, seed=3)
    args = ["audit", "--model", "mmia-test-tiny", "--model-config", tiny_config,
            "--device", "cpu", "--members", members, "--nonmembers", nonmembers,
            "--attacks", "csa,blind", "--cache", str(tmp_path / "c"), "--out",
            str(tmp_path / "out"), "--workers", "0", "--no-progress", "--bootstrap", "50"]
    code = ("import json, sys; from mmia.cli import main; rc = main(sys.argv[1:]); "
            "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules}))")
    runs = [subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                           text=True, timeout=300) for _ in range(2)]
    cold, warm = (json.loads(r.stdout.strip().splitlines()[-1]) for r in runs)
    assert cold == {"rc": 0, "torch": True}, runs[0].stderr
    assert warm == {"rc": 0, "torch": False}, runs[1].stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["data"]["members"]["shards_read"] == 0


def test_report_thumbnails_are_re_read_from_the_shards(tmp_path, tiny_model):
    """The audit holds no image bytes: the report's top-k images are re-read from their shards
    (local ones), by key."""
    from shardgen import jpeg_bytes

    from mmia.sample_index import ImageLoader

    pattern = write_good_shards(tmp_path, 2, 3)
    table = _embed(tiny_model, [pattern], tmp_path / "c").records
    rows = [4, 0, 5]
    expected = [jpeg_bytes(1001), jpeg_bytes(0), jpeg_bytes(1002)]  # shard 1 rows 1, 2; shard 0
    assert ImageLoader(table)(rows) == expected


def test_default_workers_follow_the_device():
    from mmia.embed import default_workers

    assert default_workers("cuda", 16) == 8 and default_workers("cuda", 4) == 3
    assert default_workers("cpu", 16) == 1 and default_workers("cpu", 1) == 0


def test_augmented_views_are_made_at_the_model_input_size(tiny_model):
    """Views v ≥ 1 of a large image are the views of it shrunk to the model's input side (so
    augmenting costs what a small image does); view 0 is the plain preprocessing."""
    import torch
    from PIL import Image
    from shardgen import jpeg_bytes

    from mmia.encode import decode_image
    from mmia.views import AugmentConfig, input_side, make_view, make_views, shrunk

    side = input_side(tiny_model.preprocess)
    assert side == 32
    big = decode_image(jpeg_bytes(3, size=256)).resize((400, 256), Image.BICUBIC)
    small = shrunk(big, side)
    assert small.size == (50, 32) and shrunk(small, side) is small
    cfg = AugmentConfig()
    views = make_views(big, "d" * 32, [0, 1, 2], tiny_model.preprocess, cfg)
    assert torch.equal(views[0], tiny_model.preprocess(big))
    for v in (1, 2):
        assert torch.equal(views[v], make_view(small, "d" * 32, v, tiny_model.preprocess, cfg))


def test_torch_threads_default_to_this_process_share_of_the_cores(monkeypatch):
    from mmia.encode import torch_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert torch_threads(1, None) == 8 and torch_threads(0, None) == 8
    assert torch_threads(1, 3) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four torchrun ranks share the machine
    assert torch_threads(1, None) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert torch_threads(1, None) == 3 and torch_threads(1, 2) == 2


def test_an_http_shard_changed_in_place_is_read_again(tmp_path, tiny_model):
    """A tar keeps its length when a caption changes; the index trusts the server's
    Last-Modified (or ETag), never the length alone."""
    members = good_members(0, 3)
    write_shard(tmp_path / "00000.tar", members)
    size = (tmp_path / "00000.tar").stat().st_size
    with serve_folder(tmp_path) as base:
        url = f"{base}/00000.tar"
        _embed(tiny_model, [url], tmp_path / "c")
        edited = [(n, d.replace(b"a photo", b"b photo")) for n, d in members]
        write_shard(tmp_path / "00000.tar", edited)
        later = (tmp_path / "00000.tar").stat().st_mtime + 5
        os.utime(tmp_path / "00000.tar", (later, later))
        assert (tmp_path / "00000.tar").stat().st_size == size
        again = _embed(tiny_model, [url], tmp_path / "c")
    assert again.shards_read == 1
    assert all(c.startswith("b photo") for c in again.records.caption)


def test_a_shard_that_broke_off_is_not_indexed(tmp_path, tiny_model):
    """A truncated read may be an I/O error of the moment: the shard is read again next time."""
    path = tmp_path / "00000.tar"
    write_shard(path, good_members(0, 4))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])
    first = _embed(tiny_model, [str(path)], tmp_path / "c")
    assert first.skips["truncated_shard"] == 1 and len(first.records) >= 1
    again = _embed(tiny_model, [str(path)], tmp_path / "c")
    assert again.shards_read == 1 and _summary(again) == _summary(first)


def test_samples_with_nothing_to_encode_are_committed_as_they_go(tmp_path, tiny_model):
    """Pair cosines from kept view features need no forward pass; they are still committed in
    steps of `flush_every`, not all at the end."""
    pattern = write_good_shards(tmp_path, 1, 24)
    _embed(tiny_model, [pattern], tmp_path / "c", views=3, keep_view_features=True)
    again = _embed(tiny_model, [pattern], tmp_path / "c", views=2, keep_view_features=True,
                   flush_every=8)
    assert again.forward_passes == 0 and again.embedded == 24
    from mmia.cache import EmbeddingCache

    store = EmbeddingCache(str(tmp_path / "c"), tiny_model.fingerprint).pairs(2)
    assert len(os.listdir(store.folder)) >= 3 * 3  # ≥ 3 commits of 3 files each
