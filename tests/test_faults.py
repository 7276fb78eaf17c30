"""Fault suite: hostile shards, SIGKILL and resume, stale caches, unsafe checkpoints."""

from __future__ import annotations

import functools
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from shardgen import (
    bomb_png,
    good_members,
    image_bytes,
    jpeg_bytes,
    sample_members,
    write_good_shards,
    write_shard,
)
from test_embed import cache_contents

import mmia.cli
from mmia.cache import EmbeddingCache
from mmia.embed import embed_shards
from mmia.errors import MmiaError
from mmia.model import load_model, load_state_dict
from mmia.views import AugmentConfig

GOOD = {"00000/000000000", "00000/000000001"}  # the good shard every hostile case rides with


@functools.lru_cache(maxsize=1)
def _bomb() -> bytes:
    return bomb_png()


def _one(key, image, caption, sidecar=None):
    """A hostile shard 00001 holding one good sample ('ok') and the sample under test."""
    return good_members(1, 1) + sample_members(key, image, caption, sidecar)


def _truncated(path):
    full = write_shard(path, good_members(1, 6))
    data = open(full, "rb").read()
    path.write_bytes(data[: len(data) // 2 + 100])


def _raw(data: bytes):
    return lambda path: path.write_bytes(data)


IMG = jpeg_bytes(77)


def _png16() -> bytes:
    """A 16-bit greyscale PNG (PIL mode I;16)."""
    buf = io.BytesIO()
    Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).save(buf, "PNG")
    return buf.getvalue()


OK1 = "00001/000010000"
# kind → (shard 00001 as members or writer, good keys besides GOOD, skips, warnings)
KINDS = {
    "truncated_tar": (_truncated, None, {"truncated_shard": 1}, {}),
    "zero_byte_image": (_one("z", b"", b"cap"), {OK1}, {"empty_image": 1}, {}),
    "random_bytes_jpg": (_one("r", os.urandom(2048), b"cap"), {OK1},
                         {"undecodable_image": 1}, {}),
    "decompression_bomb": (None, {OK1}, {"decompression_bomb": 1}, {}),
    "missing_caption": (_one("m", IMG, None), {OK1}, {"missing_caption": 1}, {}),
    "empty_caption": (_one("m", IMG, b"  \n"), {OK1}, {"missing_caption": 1}, {}),
    "missing_image": (_one("m", None, b"cap"), {OK1}, {"missing_image": 1}, {}),
    "caption_not_utf8": (_one("n", IMG, "café".encode("latin-1")), {OK1},
                         {"caption_not_utf8": 1}, {}),
    "caption_1mb": (_one("big", IMG, b"x" * 1_000_000), {OK1}, {"caption_too_long": 1}, {}),
    "duplicate_key_in_shard": (
        sample_members("d", IMG, b"first") + good_members(1, 1)
        + sample_members("d", jpeg_bytes(78), b"second"),
        {"00001/d", OK1}, {"duplicate_key": 1}, {}),
    "duplicate_key_across_shards": (good_members(0, 2), {"00001/000000000", "00001/000000001"},
                                    {}, {}),
    "empty_shard": ([], set(), {"empty_shard": 1}, {}),
    "zero_byte_tar": (_raw(b""), set(), {"empty_shard": 1}, {}),
    "garbage_tar": (_raw(os.urandom(4096)), set(), {"truncated_shard": 1}, {}),
    "cmyk_jpeg": (_one("cmyk", jpeg_bytes(5, mode="CMYK"), b"cmyk"), {OK1, "00001/cmyk"}, {}, {}),
    "rgba_png": (_one("rgba", image_bytes(6, mode="RGBA"), b"rgba"), {OK1, "00001/rgba"}, {},
                 {}),
    "palette_png": (_one("pal", image_bytes(7, mode="P"), b"pal"), {OK1, "00001/pal"}, {}, {}),
    "png_16bit": (_one("deep", _png16(), b"deep"), {OK1, "00001/deep"}, {}, {}),
    "grey_png": (_one("grey", image_bytes(8, mode="L"), b"grey"), {OK1, "00001/grey"}, {}, {}),
    "one_pixel": (_one("px", jpeg_bytes(9, size=1), b"px"), {OK1, "00001/px"}, {}, {}),
    # webdataset's rule: the key ends at the first dot, so "a.b.c.jpg" is key "a", part "b.c.jpg"
    "dotted_key": (_one("a.b.c", IMG, b"dots"), {OK1}, {"missing_image": 1}, {}),
    "subfolder_entry": (_one("sub/dir/k", IMG, b"sub"), {OK1, "00001/sub/dir/k"}, {}, {}),
    "bad_json_sidecar": (_one("j", IMG, b"kept", b"{not json"), {OK1, "00001/j"}, {},
                         {"bad_json_sidecar": 1}),
    "json_sidecar_not_object": (_one("j", IMG, b"kept", b"[1, 2]"), {OK1, "00001/j"}, {},
                                {"bad_json_sidecar": 1}),
}


def write_hostile(folder, kind: str) -> str:
    """Good shard 00000 plus hostile shard 00001 of `kind`; returns their brace pattern."""
    write_shard(folder / "00000.tar", good_members(0, 2))
    spec = KINDS[kind][0]
    if kind == "decompression_bomb":
        spec = _one("bomb", _bomb(), b"bomb")
    if callable(spec):
        spec(folder / "00001.tar")
    else:
        write_shard(folder / "00001.tar", spec)
    return str(folder / "{00000..00001}.tar")


def assert_embedded_once(result, cache_dir, model, good: set[str]) -> None:
    """Every good key has one record and its features are cached (finite, unit norm)."""
    keys = [r.key for r in result.records]
    assert len(keys) == len(set(keys)), "duplicate records"
    assert good <= set(keys)
    cache = EmbeddingCache(str(cache_dir), model.fingerprint)
    image = cache.read_image([r.image_digest for r in result.records], [0])[:, 0]
    text = cache.read_text([r.caption_digest for r in result.records])
    for feats in (image, text):
        assert np.isfinite(feats).all()
        assert np.allclose(np.linalg.norm(feats, axis=1), 1, atol=1e-4)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_hostile_shard_is_survived_and_counted(tmp_path, tiny_model, kind):
    """The run completes, good samples are embedded once, bad ones counted by reason."""
    _, extra, skips, warns = KINDS[kind]
    pattern = write_hostile(tmp_path, kind)
    result = embed_shards(tiny_model, [pattern], str(tmp_path / "c"), batch_size=4,
                          workers=0, progress=False)
    assert dict(result.skips) == skips
    assert dict(result.warnings) == warns
    folder = tmp_path.name  # keys carry the shard's folder and name: FOLDER/00000/KEY
    assert all(r.key.startswith(f"{folder}/") for r in result.records)
    keys = {r.key.removeprefix(f"{folder}/") for r in result.records}
    if extra is None:  # truncated: the intact prefix of the shard is kept, the rest lost
        assert 0 < len(keys - GOOD) < 6 and all(k.startswith("00001/") for k in keys - GOOD)
        extra = keys - GOOD
    assert keys == GOOD | extra
    assert_embedded_once(result, tmp_path / "c", tiny_model, {r.key for r in result.records})


def test_skips_travel_out_of_worker_processes(tmp_path, tiny_model):
    """With a DataLoader worker, skips and warnings are still counted."""
    pattern = write_hostile(tmp_path, "bad_json_sidecar")
    write_shard(tmp_path / "00002.tar", _one("z", b"", b"cap"))
    result = embed_shards(tiny_model, [pattern, str(tmp_path / "00002.tar")],
                          str(tmp_path / "c"), batch_size=4, workers=1, progress=False)
    assert dict(result.skips) == {"empty_image": 1}
    assert dict(result.warnings) == {"bad_json_sidecar": 1}
    assert len(result.records) == 5


def test_audit_reports_skip_counts(tmp_path, tiny_config, capsys):
    """`mmia audit` over hostile members prints the skip counts and records them."""
    (tmp_path / "m").mkdir()
    (tmp_path / "n").mkdir()
    write_shard(tmp_path / "m/00000.tar", good_members(0, 4) + sample_members("z", b"", b"c")
                + sample_members("u", IMG, b"\xff\xfe") + sample_members("r", b"junk", b"c"))
    write_shard(tmp_path / "m/00001.tar", [])
    nonmembers = write_good_shards(tmp_path / "n", 1, 4, seed=1)
    out = tmp_path / "out"
    rc = mmia.cli.main(["audit", "--model", "mmia-test-tiny", "--model-config", tiny_config,
                        "--device", "cpu", "--members", str(tmp_path / "m/{00000..00001}.tar"),
                        "--nonmembers", nonmembers, "--attacks", "csa", "--bootstrap", "50",
                        "--cache", str(tmp_path / "c"), "--out", str(out), "--workers", "0",
                        "--batch-size", "4", "--no-progress"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    expected = {"empty_image": 1, "caption_not_utf8": 1, "undecodable_image": 1,
                "empty_shard": 1}
    text = printed.out + printed.err
    for reason, count in expected.items():
        assert f"{reason}={count}" in text
    metrics = json.loads((out / "metrics.json").read_text())
    data = metrics["data"] if "data" in metrics else metrics["provenance"]["data"]
    assert data["members"]["skipped"] == expected
    assert data["members"]["samples"] == 4
    assert data["nonmembers"]["skipped"] == {}


# ---------------------------------------------------------------- kill and resume


def _embed_cmd(pattern, cache, config):
    return [sys.executable, "-m", "mmia", "embed", "--model", "mmia-test-tiny",
            "--model-config", config, "--shards", pattern, "--cache", str(cache),
            "--views", "1", "--batch-size", "4", "--workers", "1", "--no-progress"]


def _store_keys(folder) -> list[str]:
    """Digests of the committed segments (those with a manifest) of one store folder."""
    return [k for n in sorted(os.listdir(folder)) if n.endswith(".seg.json")
            for k in np.load(os.path.join(folder, n.replace(".seg.json", ".keys.npy"))).tolist()]


def _start_embed(pattern, cache, config):
    """Start `mmia embed`; returns (process, seconds until its model was loaded)."""
    start = time.perf_counter()
    proc = subprocess.Popen(_embed_cmd(pattern, cache, config), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in proc.stderr:  # "model … fingerprint …" comes right before embedding starts
        if "fingerprint" in line:
            break
    return proc, time.perf_counter() - start


def test_sigkill_at_random_moments_then_resume(tmp_path, tiny_config):
    """10 SIGKILLs (during start-up and during embedding), resumed each time: same bytes."""
    pattern = write_good_shards(tmp_path, 2, 12)
    proc, _ = _start_embed(pattern, tmp_path / "ref", tiny_config)
    begin = time.perf_counter()
    assert proc.wait(timeout=240) == 0, proc.stderr.read()
    span = time.perf_counter() - begin  # the embedding phase of an uninterrupted run
    rng = np.random.default_rng(5)
    killed = 0
    for i in range(10):
        if i % 2:  # a random moment of the embedding phase (reads, forwards, commits)
            proc, _ = _start_embed(pattern, tmp_path / "resumed", tiny_config)
            delay = float(rng.uniform(0.0, span))
        else:  # a random moment from process start (imports, model load, first batches)
            proc = subprocess.Popen(_embed_cmd(pattern, tmp_path / "resumed", tiny_config),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
            delay = float(rng.uniform(0.5, 4.0))
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the embed process and its worker
            proc.wait(timeout=30)
            killed += 1
    final = subprocess.run(_embed_cmd(pattern, tmp_path / "resumed", tiny_config),
                           capture_output=True, timeout=240)
    assert final.returncode == 0, final.stderr.decode()
    assert killed >= 5
    fingerprint = next(p.name for p in (tmp_path / "ref").iterdir()
                       if (p / "model.json").exists())
    want = cache_contents(EmbeddingCache(str(tmp_path / "ref"), fingerprint), [0, 1])
    got = cache_contents(EmbeddingCache(str(tmp_path / "resumed"), fingerprint), [0, 1])
    assert len(want["text"][0]) == len(want[0][0]) == len(want["pairs"][0]) == 24
    assert got == want
    cache = EmbeddingCache(str(tmp_path / "resumed"), fingerprint)
    for store in (cache.text, cache.image(0), cache.pairs(1)):
        keys = _store_keys(store.folder)
        assert len(keys) == len(set(keys)) == 24, "duplicate or missing entries after resume"


# ---------------------------------------------------------------- stale caches


def _features(model, pattern, cache_dir, views=0, augment=None):
    result = embed_shards(model, [pattern], str(cache_dir), views=views, batch_size=4,
                          workers=0, augment=augment, progress=False)
    cache = EmbeddingCache(str(cache_dir), model.fingerprint, augment)
    t = result.records
    image = cache.read_image(t.image_digest, [0])  # (n, 1, d); with views: + the K cosines
    if views:
        image = (image[:, 0], cache.pairs(views).read(t.pair_digest))
    return result, image, cache.read_text(t.caption_digest)


def _perturbed_checkpoint(tiny_model, path) -> str:
    state = {k: v.clone() for k, v in tiny_model.model.state_dict().items()}
    for name in ("visual.proj", "text_projection"):  # both towers change
        state[name] += 0.05
    torch.save(state, path)
    return str(path)


def _changed_transform(monkeypatch):
    import open_clip
    from torchvision import transforms

    original = open_clip.create_model_and_transforms

    def patched(*args, **kwargs):
        model, train, preprocess = original(*args, **kwargs)
        steps = [t if not isinstance(t, transforms.Normalize)
                 else transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
                 for t in preprocess.transforms]
        return model, train, transforms.Compose(steps)

    monkeypatch.setattr(open_clip, "create_model_and_transforms", patched)


@pytest.mark.parametrize("change", ["weights", "image_size", "transform", "precision"])
def test_changed_model_never_serves_old_features(tmp_path, tiny_model, tiny_config,
                                                 monkeypatch, change):
    """A new fingerprint, a full re-embed, and features equal to a fresh cache's."""
    pattern = write_good_shards(tmp_path, 1, 5)
    _, old_img, old_txt = _features(tiny_model, pattern, tmp_path / "shared")
    if change == "weights":
        other = load_model("mmia-test-tiny", _perturbed_checkpoint(tiny_model, tmp_path / "w.pt"),
                           tiny_config, device="cpu")
    elif change == "image_size":
        cfg = json.loads(open(tiny_config).read())
        cfg["vision_cfg"]["image_size"] = 48
        (tmp_path / "mmia-test-tiny48.json").write_text(json.dumps(cfg))
        other = load_model("mmia-test-tiny48", model_config=str(tmp_path / "mmia-test-tiny48.json"),
                           device="cpu")
    elif change == "transform":
        _changed_transform(monkeypatch)
        other = load_model("mmia-test-tiny", model_config=tiny_config, device="cpu")
        assert other.description["weights"] == tiny_model.description["weights"]
    else:
        other = load_model("mmia-test-tiny", model_config=tiny_config, device="cpu",
                           precision="bf16")
    assert other.fingerprint != tiny_model.fingerprint
    result, img, txt = _features(other, pattern, tmp_path / "shared")
    assert result.cached == 0 and result.embedded == 5 and result.forward_passes > 0
    _, fresh_img, fresh_txt = _features(other, pattern, tmp_path / "fresh")
    assert img.tobytes() == fresh_img.tobytes() and txt.tobytes() == fresh_txt.tobytes()
    assert not np.array_equal(img, old_img)
    if change in ("weights", "precision"):
        assert not np.array_equal(txt, old_txt)


def test_changed_augmentation_never_serves_old_views(tmp_path, tiny_model):
    """Another AugmentConfig gets another view store and freshly computed views."""
    pattern = write_good_shards(tmp_path, 1, 4)
    old_cfg, new_cfg = AugmentConfig(), AugmentConfig(jitter=0.1)
    _, old, _ = _features(tiny_model, pattern, tmp_path / "shared", views=1, augment=old_cfg)
    result, new, _ = _features(tiny_model, pattern, tmp_path / "shared", views=1,
                               augment=new_cfg)
    shared = EmbeddingCache(str(tmp_path / "shared"), tiny_model.fingerprint, new_cfg)
    assert shared.view_folder(1) != EmbeddingCache(str(tmp_path), "x", old_cfg).view_folder(1)
    assert result.embedded == 4 and result.forward_passes > 0
    _, fresh, _ = _features(tiny_model, pattern, tmp_path / "fresh", views=1, augment=new_cfg)
    assert new[0].tobytes() == fresh[0].tobytes() and new[1].tobytes() == fresh[1].tobytes()
    assert np.array_equal(new[0], old[0])  # view 0 is plain preprocessing: shared
    assert not np.array_equal(new[1], old[1])  # the views' cosines are the new views'
    assert shared.pairs_folder(1) != EmbeddingCache(str(tmp_path), "x", old_cfg).pairs_folder(1)


# ---------------------------------------------------------------- safe loading


class Payload:
    """A custom object: unpickling it must never be allowed."""

    def __init__(self, marker):
        self.marker = str(marker)


class Touch:
    """Unpickling this would create a file (stands in for arbitrary code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("payload", [Payload, Touch])
def test_pickled_object_checkpoint_is_refused(tmp_path, tiny_model, tiny_config, payload):
    """weights_only=True: MmiaError, and the payload never runs."""
    marker = tmp_path / "pwned"
    state = dict(tiny_model.model.state_dict())
    state["extra"] = payload(marker)
    path = tmp_path / "evil.pt"
    torch.save(state, path)
    with pytest.raises(MmiaError, match="pickled objects are refused"):
        load_state_dict(str(path))
    with pytest.raises(MmiaError, match="pickled objects are refused"):
        load_model("mmia-test-tiny", str(path), tiny_config, device="cpu")
    assert not marker.exists()
