"""White-box (loss, grad) and MC-dropout (mcd) attacks: against a direct torch autograd
computation on the tiny model, on constructed inputs, and through `mmia audit`."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from shardgen import jpeg_bytes, write_good_shards

from mmia.attacks import MCD, Features, Grad, Loss, MissingInput
from mmia.attacks.whitebox import loss_and_grad
from mmia.cli import main
from mmia.encode import Encoder
from mmia.errors import MmiaError
from mmia.variants import (
    DropoutPass,
    WhiteboxNorms,
    dropout_passes,
    whitebox_features,
    with_attention_dropout,
)

CAPTIONS = [f"a photo of thing {i}" for i in range(7)]


def inputs(loaded, n: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([loaded.preprocess(Image.open(io.BytesIO(jpeg_bytes(i))).convert("RGB"))
                          for i in range(n)])
    return images, loaded.tokenizer(CAPTIONS[:n])


def autograd_loss_and_grad(model, images, tokens, pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """Per pair i < `pairs`: the symmetric contrastive loss against the other samples'
    (detached) features as negatives, and the norm of its gradient w.r.t. visual.proj and
    text_projection, by torch autograd."""
    with torch.no_grad():
        neg_e = torch.nn.functional.normalize(model.encode_image(images[pairs:]), dim=-1)
        neg_t = torch.nn.functional.normalize(model.encode_text(tokens[pairs:]), dim=-1)
    losses, grads = [], []
    for i in range(pairs):
        model.zero_grad()
        e = torch.nn.functional.normalize(model.encode_image(images[i:i + 1]), dim=-1)[0]
        t = torch.nn.functional.normalize(model.encode_text(tokens[i:i + 1]), dim=-1)[0]
        s = model.logit_scale.exp()
        a = s * torch.cat([(e * t).sum()[None], neg_t @ e])
        b = s * torch.cat([(e * t).sum()[None], neg_e @ t])
        loss = -0.5 * (torch.log_softmax(a, 0)[0] + torch.log_softmax(b, 0)[0])
        loss.backward()
        grads.append(float(torch.sqrt(model.visual.proj.grad.pow(2).sum()
                                      + model.text_projection.grad.pow(2).sum())))
        losses.append(float(loss.detach()))
    model.zero_grad(set_to_none=True)
    return np.array(losses), np.array(grads)


def test_loss_and_grad_match_torch_autograd(tiny_model):
    """The closed form over cached features and norms equals autograd through the model."""
    images, tokens = inputs(tiny_model)
    pairs = 3
    want_loss, want_grad = autograd_loss_and_grad(tiny_model.model, images, tokens, pairs)
    norms = WhiteboxNorms(tiny_model).get()
    encoder, plain = Encoder(norms, 8), Encoder(tiny_model, 8)
    image, text = plain.images(list(images)), plain.texts(CAPTIONS)
    wb = whitebox_features(encoder.images(list(images)), encoder.texts(CAPTIONS))
    got_loss, got_grad = loss_and_grad(image[:pairs], text[:pairs], wb[:pairs],
                                       image[pairs:], text[pairs:])
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-4)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-3)
    # the attacks negate them (higher = member) and take known non-members as negatives
    known = Features(keys=list("abcd"), image=image[pairs:], text=text[pairs:])
    feats = Features(keys=list("xyz"), image=image[:pairs], text=text[:pairs], whitebox=wb[:pairs])
    np.testing.assert_allclose(Loss().fit(known_nonmembers=known).score(feats), -want_loss,
                               rtol=1e-4)
    np.testing.assert_allclose(Grad().fit(known_nonmembers=known).score(feats), -want_grad,
                               rtol=1e-3)
    # the model is left as it was: projections back in place
    assert tiny_model.model.visual.proj is not None
    assert tiny_model.model.text_projection is not None


def test_whitebox_attacks_rank_a_fitted_pair_above_a_confused_one():
    """Constructed: a pair aligned with its caption and far from the negatives (low loss,
    small gradient) scores above one whose caption sits among the negatives."""
    rng = np.random.default_rng(0)
    neg = rng.normal(size=(50, 8))
    neg /= np.linalg.norm(neg, axis=1, keepdims=True)
    known = Features(keys=[str(i) for i in range(50)], image=neg, text=neg)
    fitted = rng.normal(size=8)
    image = np.stack([fitted, neg[0] + 0.3 * rng.normal(size=8)])
    text = np.stack([fitted + 0.05 * rng.normal(size=8), neg[1]])
    wb = np.array([[1.0, 1.0, 20.0], [1.0, 1.0, 20.0]], np.float32)
    feats = Features(keys=["fit", "confused"], image=image, text=text, whitebox=wb)
    for attack in (Loss(), Grad()):
        scores = attack.fit(known_nonmembers=known).score(feats)
        assert scores[0] > scores[1], attack.name
    with pytest.raises(MissingInput, match="whitebox"):
        Loss().fit(known_nonmembers=known).score(Features(keys=["a"], image=image[:1],
                                                          text=text[:1]))
    with pytest.raises(MissingInput, match="known_nonmembers"):
        Grad().fit()
    # negatives from the pool: the same scores as with those pairs as known non-members, and
    # nothing learnt from the known non-members (all of them calibrate)
    pool_loss = Loss(negatives="pool")
    assert not pool_loss.learns_from_known_nonmembers and Loss().learns_from_known_nonmembers
    other = Features(keys=["k"], image=image[:1], text=text[:1])
    np.testing.assert_allclose(pool_loss.fit(known_nonmembers=other, pool=known).score(feats),
                               Loss().fit(known_nonmembers=known).score(feats), rtol=1e-6)
    with pytest.raises(MissingInput, match="'pool'"):
        Loss(negatives="pool").fit(known_nonmembers=other)


def test_mcd_statistics_on_constructed_cosines():
    cos = np.array([[0.9, 0.9, 0.9], [0.5, 0.7, 0.9]], np.float32)
    feats = Features(keys=["a", "b"], image=np.zeros((2, 0)), text=np.zeros((2, 0)),
                     mcd_cosines=cos)
    np.testing.assert_allclose(MCD("mean").score(feats), [0.9, 0.7], rtol=1e-6)
    np.testing.assert_allclose(MCD("neg_std").score(feats), [0.0, -0.2], atol=1e-6)
    assert MCD("mean_std").score(feats)[0] > MCD("mean_std").score(feats)[1]
    with pytest.raises(MissingInput, match="mcd_cosines"):
        MCD().score(Features(keys=["a"], image=np.zeros((1, 0)), text=np.zeros((1, 0))))


def test_dropout_passes_are_distinct_seeded_and_leave_the_target_alone(tiny_model):
    images, _ = inputs(tiny_model)
    passes = dropout_passes(tiny_model, passes=3, p=0.3)
    prints = {p.fingerprint for p in passes} | {tiny_model.fingerprint}
    assert len(prints) == 4  # every pass is its own model in the cache
    assert DropoutPass(tiny_model, 0.3, 1).fingerprint == passes[1].fingerprint  # stable
    assert DropoutPass(tiny_model, 0.1, 1).fingerprint != passes[1].fingerprint
    first = [Encoder(p.get(), 8).images(list(images)) for p in passes]
    again = Encoder(passes[0].get(), 8).images(list(images))
    np.testing.assert_array_equal(first[0], again)  # a pass repeats over the same batch
    assert not np.allclose(first[0], first[1], atol=1e-4)  # passes differ
    plain = Encoder(tiny_model, 8).images(list(images))
    np.testing.assert_array_equal(plain, Encoder(tiny_model, 8).images(list(images)))
    assert not tiny_model.model.training and all(
        not m.training for m in tiny_model.model.modules())  # the target stays in eval mode
    with pytest.raises(MmiaError, match="no attention layer"):
        with_attention_dropout(torch.nn.Linear(2, 2), 0.1)


def test_audit_runs_mcd_loss_and_grad_and_reruns_warm(tmp_path, tiny_config, monkeypatch):
    roles = {}
    for i, role in enumerate(("members", "nonmembers", "known", "pool")):
        (tmp_path / role).mkdir()
        roles[role] = write_good_shards(tmp_path / role, 1, 8, seed=i + 1)

    def audit(out: str) -> int:
        return main(["audit", "--model", "mmia-test-tiny", "--model-config", tiny_config,
                     "--members", roles["members"], "--nonmembers", roles["nonmembers"],
                     "--known-nonmembers", roles["known"], "--attacks", "csa,mcd,loss,grad",
                     "--mcd-passes", "3", "--cache", str(tmp_path / "cache"),
                     "--out", str(tmp_path / out), "--bootstrap", "20", "--no-progress",
                     "--workers", "0", "--device", "cpu"])

    assert audit("out") == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert {"csa", "mcd", "loss", "grad"} <= metrics["attacks"].keys()
    assert metrics["settings"]["mcd_passes"] == 3
    assert metrics["attacks"]["loss"]["n_known_nonmembers_fit"] == 4  # half are negatives
    assert metrics["attacks"]["grad"]["whitebox_negatives"] == "known_nonmembers"
    assert main(["audit", "--model", "mmia-test-tiny", "--model-config", tiny_config,
                 "--members", roles["members"], "--nonmembers", roles["nonmembers"],
                 "--known-nonmembers", roles["known"], "--pool", roles["pool"],
                 "--attacks", "grad", "--cache", str(tmp_path / "cache"),
                 "--out", str(tmp_path / "pool"), "--bootstrap", "20", "--no-progress",
                 "--workers", "0", "--device", "cpu"]) == 0
    grad = json.loads((tmp_path / "pool" / "metrics.json").read_text())["attacks"]["grad"]
    assert (grad["whitebox_negatives"], grad["n_whitebox_negatives"]) == ("pool", 8)
    assert grad["n_known_nonmembers_fit"] == 0 and grad["n_calibration"] == 8
    folders = [p for p in (tmp_path / "cache").iterdir() if (p / "text").is_dir()]
    assert len(folders) == 1 + 3 + 1  # the target, 3 dropout passes, the white-box norms
    import mmia.model

    monkeypatch.setattr(mmia.model, "load_model", lambda *a, **k: pytest.fail("model built"))
    assert audit("out2") == 0  # warm: every pass and the norms come from the cache
    again = json.loads((tmp_path / "out2" / "metrics.json").read_text())
    for name in ("mcd", "loss", "grad"):
        assert again["attacks"][name]["auc"] == metrics["attacks"][name]["auc"]


def test_projection_norms_are_float32_for_half_precision_and_linear_projections(tiny_model):
    """‖h‖/‖u‖ of an nn.Linear projection with bf16 weights and inputs, autocast on: computed
    in float32 (no dtype clash, no bf16 rounding)."""
    norms = WhiteboxNorms(tiny_model).get().model
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8).to(torch.bfloat16)
    h = torch.randn(5, 16).to(torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = norms._ratios(h, linear)
    with torch.no_grad():
        h64 = h.double()
        u = h64 @ linear.weight.double().T + linear.bias.double()
        want = h64.norm(dim=-1) / u.norm(dim=-1)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got[:, 0].numpy(), want.numpy(), rtol=1e-5)
    assert float(got[0, 1]) == pytest.approx(float(tiny_model.model.logit_scale.exp()))


def test_projection_is_restored_when_the_forward_pass_fails(tiny_model, monkeypatch):
    norms = WhiteboxNorms(tiny_model).get().model
    visual = tiny_model.model.visual
    proj = visual.proj

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(type(visual), "forward", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        norms.encode_image(torch.zeros(1, 3, 8, 8))
    assert visual.proj is proj


def test_companion_settings_are_refused_in_one_line_before_any_work(tmp_path, capsys):
    from mmia.audit import AuditConfig
    from mmia.pilot import PilotSettings

    for bad, message in (({"mcd_dropout": 2.0}, "--mcd-dropout"),
                         ({"mcd_passes": 1}, "--mcd-passes"),
                         ({"mcd_statistic": "median"}, "--mcd-statistic"),
                         ({"rcsa_calibration": "lira"}, "--rcsa-calibration")):
        with pytest.raises(MmiaError, match=message):
            PilotSettings(**bad)
        with pytest.raises(MmiaError, match=message):
            AuditConfig(members=["m"], nonmembers=["n"], **bad)
    assert main(["pilot", "--root", str(tmp_path / "p"), "--out", str(tmp_path / "o"),
                 "--mcd-dropout", "2"]) == 2
    assert "--mcd-dropout must lie strictly between 0 and 1" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()  # refused before building anything


def test_mc_dropout_covers_open_clips_own_attention_modules():
    """Modules with an attn_drop dropout (open_clip's Attention, timm's) get dropout too, in
    training mode alone: their other parts stay in eval mode."""
    from open_clip.transformer import Attention

    model = torch.nn.Sequential(Attention(8, num_heads=2), torch.nn.Dropout(0.5)).eval()
    copy = with_attention_dropout(model, 0.2)
    attention = copy[0]
    assert attention.attn_drop.p == 0.2 and attention.training and attention.attn_drop.training
    assert not copy[1].training and not copy.training  # other dropouts stay off
    assert not model[0].training and model[0].attn_drop.p == 0.0  # the original is untouched
