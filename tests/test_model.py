"""Model loader: QuickGELU guard, eval mode, fingerprints, custom preprocessing."""

import json

import torch

from mmia.model import load_model, quickgelu_name


def test_quickgelu_tags_are_built_with_quickgelu():
    assert quickgelu_name("ViT-B-32", "openai") == "ViT-B-32-quickgelu"
    assert quickgelu_name("ViT-B-32", "laion400m_e32") == "ViT-B-32-quickgelu"
    assert quickgelu_name("ViT-B-32", "laion2b_s34b_b79k") == "ViT-B-32"
    assert quickgelu_name("ViT-B-32-quickgelu", "openai") == "ViT-B-32-quickgelu"


def test_loaded_model_is_in_eval_mode_and_fingerprint_is_stable(tiny_model, tiny_config):
    assert not tiny_model.model.training
    assert all(not m.training for m in tiny_model.model.modules())
    again = load_model("mmia-test-tiny", model_config=tiny_config, device="cpu")
    assert again.fingerprint == tiny_model.fingerprint


def test_checkpoint_round_trip_and_weight_change(tmp_path, tiny_model, tiny_config):
    state = {k: v.clone() for k, v in tiny_model.model.state_dict().items()}
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, tmp_path / "a.pt")
    same = load_model("mmia-test-tiny", str(tmp_path / "a.pt"), tiny_config, device="cpu")
    assert same.fingerprint == tiny_model.fingerprint
    state["logit_scale"] = state["logit_scale"] + 1
    torch.save(state, tmp_path / "b.pt")
    other = load_model("mmia-test-tiny", str(tmp_path / "b.pt"), tiny_config, device="cpu")
    assert other.fingerprint != tiny_model.fingerprint


def test_preprocess_cfg_in_model_config_is_applied(tmp_path, tiny_model):
    from conftest import TINY_CONFIG

    cfg = {**TINY_CONFIG, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    path = tmp_path / "mmia-test-tiny-half.json"
    path.write_text(json.dumps(cfg))
    loaded = load_model("mmia-test-tiny-half", model_config=str(path), device="cpu")
    norm = loaded.preprocess.transforms[-1]
    assert list(norm.mean) == [0.5] * 3 and list(norm.std) == [0.5] * 3
    assert loaded.fingerprint != tiny_model.fingerprint
