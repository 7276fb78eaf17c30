"""rcsa: the target's cosine calibrated per pair by reference models (constructed inputs where
the right ranking is known, then `mmia audit` end to end with reference checkpoints)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from shardgen import write_good_shards
from sklearn.metrics import roc_auc_score

from mmia.attacks import RCSA, Features, MissingInput
from mmia.audit import AuditConfig, run_audit
from mmia.cli import main
from mmia.errors import MmiaError
from mmia.modelref import ModelRequest


def pairs_with_cosine(cos: np.ndarray, rng: np.random.Generator, d: int = 16) -> tuple:
    """Unit image and text vectors whose row-wise cosine is exactly `cos`."""
    a = rng.normal(size=(len(cos), d))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b = rng.normal(size=(len(cos), d))
    b -= (b * a).sum(1, keepdims=True) * a  # orthogonal to a
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    text = cos[:, None] * a + np.sqrt(1 - cos[:, None] ** 2) * b
    return a.astype(np.float32), text.astype(np.float32)


def features(target_cos: np.ndarray, ref_cos: np.ndarray, seed: int = 0) -> Features:
    image, text = pairs_with_cosine(target_cos, np.random.default_rng(seed))
    return Features(keys=[str(i) for i in range(len(target_cos))], image=image, text=text,
                    ref_cosines=ref_cos.astype(np.float32))


def world(n: int, seed: int, member: bool, refs: int = 3) -> Features:
    """In Fisher-z units (cos = tanh z): per-pair difficulty e spread widely; references see e
    plus noise; the target sees 0.1 + 0.8 e plus 0.05 more for members: plain cosine ranks
    by difficulty, not membership."""
    rng = np.random.default_rng(seed)
    e = rng.uniform(-0.4, 1.2, n)
    ref = e[:, None] + rng.normal(0, 0.01, (n, refs))
    target = 0.1 + 0.8 * e + (0.05 if member else 0.0) + rng.normal(0, 0.01, n)
    return features(np.tanh(target), np.tanh(ref), seed)


def test_offset_is_target_minus_the_references_mean_in_fisher_z():
    z = np.array([[0.5, 0.1, 0.3], [0.2, 0.2, 0.2], [-0.1, 0.0, -0.4]])  # target, refs
    f = features(np.tanh(z[:, 0]), np.tanh(z[:, 1:]))
    got = RCSA(calibration="offset").fit().score(f)
    np.testing.assert_allclose(got, [0.3, 0.0, 0.1], atol=1e-4)


def test_regress_learns_the_scale_between_target_and_references():
    known, members, nonmembers = world(400, 1, False), world(300, 2, True), world(300, 3, False)
    rcsa = RCSA(calibration="regress").fit(known_nonmembers=known)
    np.testing.assert_allclose(rcsa.coef_[0], 0.1, atol=0.02)
    np.testing.assert_allclose(rcsa.coef_[1:].sum(), 0.8, atol=0.03)
    labels = np.r_[np.ones(300), np.zeros(300)]
    scores = np.r_[rcsa.score(members), rcsa.score(nonmembers)]
    plain = np.r_[[(f.image * f.text).sum(1) for f in (members, nonmembers)]].ravel()
    assert roc_auc_score(labels, scores) > 0.99  # membership, once difficulty is removed
    assert roc_auc_score(labels, plain) < 0.65  # plain cosine mostly ranks difficulty
    # known non-members' residuals are centred, in units of their spread
    assert abs(float(np.mean(rcsa.score(world(400, 4, False))))) < 0.2


def test_z_divides_by_the_references_spread_floored_by_the_typical_one():
    target = np.tanh(np.array([0.6, 0.6]))
    refs = np.tanh(np.array([[0.5, 0.3, 0.4], [0.4, 0.4, 0.4]]))  # sd 0.1 and 0 in z units
    known = features(np.tanh(np.array([0.3, 0.2, 0.1])),
                     np.tanh(np.array([[0.2, 0.3, 0.4], [0.1, 0.2, 0.3], [0.0, 0.1, 0.2]])))
    rcsa = RCSA(calibration="z").fit(known_nonmembers=known)
    assert rcsa.spread_ == pytest.approx(0.1, rel=1e-3)
    np.testing.assert_allclose(rcsa.score(features(target, refs)), [2.0, 2.0], rtol=1e-3)


def test_rcsa_refuses_missing_or_mismatched_references():
    f = features(np.array([0.5, 0.1]), np.zeros((2, 2)))
    no_refs = Features(keys=f.keys, image=f.image, text=f.text)
    with pytest.raises(MissingInput, match="ref_cosines"):
        RCSA(calibration="offset").fit().score(no_refs)
    with pytest.raises(MissingInput, match="known non-members"):
        RCSA("regress").fit()
    one = features(np.array([0.5, 0.1, 0.2]), np.zeros((3, 1)))
    with pytest.raises(MissingInput, match="two reference"):
        RCSA(calibration="z").fit(known_nonmembers=one)
    fitted = RCSA("regress").fit(known_nonmembers=world(50, 5, False, refs=2))
    with pytest.raises(MissingInput, match="fitted with 2"):
        fitted.score(world(10, 6, False, refs=3))
    with pytest.raises(ValueError, match="calibration"):
        RCSA(calibration="lira")
    assert RCSA("regress").learns_from_known_nonmembers
    assert not RCSA().learns_from_known_nonmembers  # offset, the default: all known calibrate


# ---------------------------------------------------------------- mmia audit with references


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_config):
    """Three random-init tiny models saved as checkpoints: a target and two references."""
    import open_clip
    import torch

    from mmia.model import register_model_config

    folder = tmp_path_factory.mktemp("ckpt")
    name = register_model_config(tiny_config)
    paths = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = open_clip.create_model(name)
        path = folder / f"model-{seed}.pt"
        torch.save({"state_dict": model.state_dict(), "model_name": name, "epoch": 0}, path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("rcsa-shards")
    out = {}
    for i, role in enumerate(("members", "nonmembers", "known", "pool")):
        (root / role).mkdir()
        out[role] = write_good_shards(root / role, 1, 10, seed=i + 1)
    return out


def audit_args(tiny_config, shards, tmp_path, target: str, *extra: str) -> list[str]:
    return ["audit", "--model", "mmia-test-tiny", "--model-config", tiny_config,
            "--pretrained", target, "--members", shards["members"],
            "--nonmembers", shards["nonmembers"], "--known-nonmembers", shards["known"],
            "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"),
            "--bootstrap", "20", "--no-progress", "--workers", "0", "--device", "cpu", *extra]


def test_audit_runs_rcsa_with_reference_checkpoints(tmp_path, tiny_config, shards, checkpoints,
                                                     monkeypatch):
    target, ref1, ref2 = checkpoints
    args = audit_args(tiny_config, shards, tmp_path, target, "--attacks", "csa,rcsa",
                      "--reference", ref1, "--reference", ref2, "--rcsa-calibration", "offset")
    assert main(args) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    refs = metrics["settings"]["references"]
    assert [r["pretrained"] for r in refs] == [ref1, ref2]
    fingerprints = {r["fingerprint"] for r in refs} | {metrics["model"]["fingerprint"]}
    assert len(fingerprints) == 3  # each reference's features under its own fingerprint
    assert all((tmp_path / "cache" / fp / "text").is_dir() for fp in fingerprints)
    assert metrics["attacks"]["rcsa"]["rcsa_calibration"] == "offset"

    # the scores are the target's cosine minus the references' mean (Fisher z), computed
    # directly
    from mmia.cache import EmbeddingCache
    from mmia.embed import embed_shards
    from mmia.model import load_model

    def cosines(ckpt: str) -> np.ndarray:
        loaded = load_model("mmia-test-tiny", ckpt, tiny_config, device="cpu")
        cos = []
        for role in ("members", "nonmembers"):
            t = embed_shards(loaded, [shards[role]], str(tmp_path / "cache"), workers=0).records
            cache = EmbeddingCache(str(tmp_path / "cache"), loaded.fingerprint)
            img, txt = cache.image(0).read(t.image_digest), cache.text.read(t.caption_digest)
            cos.append((img * txt).sum(1) / np.linalg.norm(img, axis=1)
                       / np.linalg.norm(txt, axis=1))
        return np.concatenate(cos)

    expected = np.arctanh(cosines(target)) - (np.arctanh(cosines(ref1))
                                              + np.arctanh(cosines(ref2))) / 2
    rows = [line.split(",") for line in (tmp_path / "out" / "scores.csv").read_text().split()[1:]]
    got = np.array([float(r[3]) for r in rows if r[2] == "rcsa"])
    np.testing.assert_allclose(got, expected, atol=2e-3)

    # a warm rerun builds no model at all: target and references come from the cache
    import mmia.model

    monkeypatch.setattr(mmia.model, "load_model", lambda *a, **k: pytest.fail("model built"))
    assert main(args[:args.index("--out") + 1] + [str(tmp_path / "out2")]
                + args[args.index("--out") + 2:]) == 0


def test_rcsa_without_references_is_skipped_with_a_note(tmp_path, tiny_config, shards,
                                                        checkpoints, capsys):
    args = audit_args(tiny_config, shards, tmp_path, checkpoints[0], "--attacks", "csa,rcsa")
    assert main(args) == 0
    assert "attack rcsa skipped: it needs reference models: --reference CKPT" in \
        capsys.readouterr().err


def test_bad_references_are_refused_in_one_line(tmp_path, tiny_config, shards, checkpoints,
                                                capsys):
    target = checkpoints[0]
    args = audit_args(tiny_config, shards, tmp_path, target, "--attacks", "csa,rcsa",
                      "--reference", str(tmp_path / "missing.pt"))
    assert main(args) == 2
    assert "reference checkpoint" in capsys.readouterr().err
    cfg = AuditConfig(members=[shards["members"]], nonmembers=[shards["nonmembers"]],
                      known_nonmembers=[shards["known"]], attacks=("csa", "rcsa"),
                      cache=str(tmp_path / "c2"), workers=0,
                      references=(ModelRequest("mmia-test-tiny", target, tiny_config, "cpu"),))
    from mmia.model import load_model

    loaded = load_model("mmia-test-tiny", target, tiny_config, device="cpu")
    result = run_audit(loaded, cfg)  # csa runs; rcsa is skipped with the reason
    assert "csa" in result.metrics and "rcsa" not in result.metrics
    assert any(n.startswith("attack rcsa skipped") and "is the target model itself" in n
               for n in result.notes)
    with pytest.raises(MmiaError, match="ModelRequest"):
        AuditConfig(members=["m"], nonmembers=["n"], references=("ckpt.pt",))
    with pytest.raises(MmiaError, match="rcsa-calibration"):
        AuditConfig(members=["m"], nonmembers=["n"], rcsa_calibration="lira")
