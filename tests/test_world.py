"""Tests for the pilot world: deterministic shards, ground truth, layout, tiny training."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import open_clip
import pytest
import torch
import webdataset as wds

from mmia.world import (
    SPLITS,
    TrainConfig,
    WorldConfig,
    build_pilot,
    load_checkpoint,
    make_world,
    read_ground_truth,
    register_model_config,
    train_clip,
)

TINY = WorldConfig(seed=3, n_members=60, n_eval=20, n_known_nonmembers=10, n_pool_members=10,
                   n_pool_nonmembers=10, n_reference=30, n_post_release=10, n_post_release_known=10,
                   samples_per_shard=25)
TINY_MODEL = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 1, "width": 64, "head_width": 32,
                   "patch_size": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def _digest_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("w") / "world", TINY)


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("cfg") / "mmia-test-tiny.json"
    p.write_text(json.dumps(TINY_MODEL))
    return p


def test_same_seed_identical_bytes(world, tmp_path):
    again = make_world(tmp_path / "again", TINY)
    assert _digest_tree(world.root) == _digest_tree(again.root)
    other = make_world(tmp_path / "other", WorldConfig(**{**TINY.to_dict(), "seed": 4}))
    assert _digest_tree(world.root) != _digest_tree(other.root)


def test_splits_and_ground_truth(world):
    gt = read_ground_truth(world.root)
    keys = [k for s in SPLITS for k in world.keys[s]]
    assert len(keys) == len(set(keys)) == len(gt)
    assert len(world.keys["train"]) == TINY.n_members
    assert len(world.keys["eval_members"]) == len(world.keys["eval_nonmembers"]) == TINY.n_eval
    assert len(world.keys["pool"]) == TINY.n_pool_members + TINY.n_pool_nonmembers

    # Identity of a sample = its url (copies keep the url and bytes of the train sample).
    urls: dict[str, set[str]] = {}
    for split in SPLITS:
        ds = wds.WebDataset(world.urls(split), shardshuffle=False)
        urls[split] = set()
        for s in ds:
            meta = json.loads(s["json"])
            urls[split].add(meta["url"])
            row = gt[s["__key__"]]
            assert row["split"] == split
            assert row["member"] == int(split in ("train", "eval_members")
                                        or (split == "pool" and row["source_key"] != s["__key__"]))
    assert urls["eval_members"] <= urls["train"]
    pool_members = {k for k in world.keys["pool"] if gt[k]["member"]}
    assert len(pool_members) == TINY.n_pool_members
    assert all(gt[k]["source_key"] in set(world.keys["train"]) for k in pool_members)
    assert not {gt[k]["source_key"] for k in pool_members} & {
        gt[k]["source_key"] for k in world.keys["eval_members"]}
    disjoint = ["train", "eval_nonmembers", "known_nonmembers", "reference", "post_release",
                "post_release_known"]
    for i, a in enumerate(disjoint):
        for b in disjoint[i + 1:]:
            assert not urls[a] & urls[b], (a, b)
    assert not (urls["pool"] - urls["train"]) & (urls["eval_nonmembers"] | urls["reference"])


def test_img2dataset_layout(world):
    split_dir = world.split_dir("train")
    assert sorted(p.name for p in split_dir.iterdir())[:4] == [
        "00000.manifest.json", "00000.tar", "00000_stats.json", "00001.manifest.json"]
    stats = json.loads((split_dir / "00000_stats.json").read_text())
    assert stats["successes"] == stats["count"] == TINY.samples_per_shard
    ds = wds.WebDataset(world.urls("eval_nonmembers"), shardshuffle=False).decode("pil")
    samples = list(ds)
    assert len(samples) == TINY.n_eval
    s = samples[0]
    assert s["__key__"] == "020000000"  # shard 2000, row 0
    assert samples[5]["__key__"] == "020000005"
    assert set(k for k in s if not k.startswith("__")) == {"jpg", "txt", "json"}
    assert s["jpg"].size == (64, 64) and s["jpg"].mode == "RGB"
    meta = s["json"]
    for field in ["url", "caption", "key", "status", "width", "height", "original_width",
                  "original_height", "exif", "sha256", "error_message"]:
        assert field in meta
    assert meta["key"] == s["__key__"] and meta["caption"] == s["txt"]
    assert meta["status"] == "success" and meta["exif"] is None
    raw = next(iter(wds.WebDataset(world.urls("eval_nonmembers"), shardshuffle=False)))
    assert hashlib.sha256(raw["jpg"]).hexdigest() == meta["sha256"]
    manifest = json.loads((world.split_dir("eval_nonmembers") / "02000.manifest.json").read_text())
    assert manifest["split"] == "eval_nonmembers" and manifest["keys"][0] == "020000000"


def test_post_release_is_shifted(world):
    caps = [s["txt"].decode() for s in wds.WebDataset(world.urls("post_release"),
                                                      shardshuffle=False)]
    new_words = ("teal", "pink", "brown", "lime", "star", "ring", "diamond", "maroon", "cyan")
    assert sum(any(w in c for w in new_words) for c in caps) >= len(caps) // 2


def test_tiny_training_lowers_loss_and_checkpoint_loads(world, tiny_config, tmp_path):
    cfg = TrainConfig(epochs=30, batch_size=30, lr=2e-3, warmup_steps=2, max_steps=30)
    out = tmp_path / "ck" / "target.pt"
    res = train_clip(world.split_dir("train"), tiny_config, out, cfg)
    assert len(res.losses) == 30
    assert sum(res.losses[-5:]) / 5 < res.losses[0] - 0.3
    res2 = train_clip(world.split_dir("train"), tiny_config, tmp_path / "ck2" / "target.pt", cfg)
    assert res2.losses == res.losses  # seeded and repeatable

    ck = torch.load(out, weights_only=True)
    assert ck["model_name"] == "mmia-test-tiny" and isinstance(ck["epoch"], int)
    assert (out.parent / "mmia-test-tiny.json").exists()
    name = register_model_config(out.parent / "mmia-test-tiny.json")
    fresh, _, _ = open_clip.create_model_and_transforms(name)
    fresh.load_state_dict(ck["state_dict"])
    model, preprocess, tok = load_checkpoint(out)
    assert not model.training
    with torch.no_grad():
        f = model.encode_text(tok(["a red circle"]), normalize=True)
    assert f.shape == (1, 32)


def test_build_pilot_reuses(tmp_path, tiny_config):
    cfg = TrainConfig(epochs=1, batch_size=30, warmup_steps=1, max_steps=2)
    w = WorldConfig(**{**TINY.to_dict(), "n_reference": 30})
    p1 = build_pilot(tmp_path, w, cfg, tiny_config)
    assert (p1.root / "done").exists() and p1.target_ckpt.exists() and p1.reference_ckpt.exists()
    mtime = p1.target_ckpt.stat().st_mtime_ns
    p2 = build_pilot(tmp_path, w, cfg, tiny_config)
    assert p2.root == p1.root and p2.target_ckpt.stat().st_mtime_ns == mtime
    assert p2.world.keys["train"] == p1.world.keys["train"]
    (p1.root / "done").unlink()  # partial folder -> rebuilt
    p3 = build_pilot(tmp_path, w, cfg, tiny_config)
    assert (p3.root / "done").exists() and p3.target_ckpt.stat().st_mtime_ns != mtime
    assert p3.world.keys == p1.world.keys  # the rebuilt world is the same world


def test_half_references_train_on_half_the_reference_split(tmp_path, tiny_config):
    cfg = TrainConfig(epochs=1, batch_size=5, warmup_steps=1)
    world = make_world(tmp_path / "w", WorldConfig(**{**TINY.to_dict(), "n_reference": 30}))
    full = train_clip(world.split_dir("reference"), tiny_config, tmp_path / "full.pt", cfg)
    half = train_clip(world.split_dir("reference"), tiny_config, tmp_path / "h.pt", cfg, half=0)
    assert (len(full.losses), len(half.losses)) == (6, 3)  # 30 and 15 samples, batches of 5
    w = WorldConfig(**{**TINY.to_dict(), "n_reference": 30})
    tiny = TrainConfig(epochs=1, batch_size=30, warmup_steps=1, max_steps=1)
    pilot = build_pilot(tmp_path / "p", w, tiny, tiny_config, reference=False, half_references=2)
    names = [p.name for p in pilot.half_reference_ckpts]
    assert names == ["reference-half-0.pt", "reference-half-1.pt"]
    assert all(p.exists() for p in pilot.half_reference_ckpts)
    assert not pilot.reference_ckpt.exists()
    a, b = (torch.load(p, weights_only=True)["state_dict"] for p in pilot.half_reference_ckpts)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # other halves, other seeds
    mtimes = [p.stat().st_mtime_ns for p in pilot.half_reference_ckpts]
    again = build_pilot(tmp_path / "p", w, tiny, tiny_config, reference=False, half_references=2)
    assert [p.stat().st_mtime_ns for p in again.half_reference_ckpts] == mtimes  # reused
