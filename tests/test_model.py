"""Model loader: QuickGELU guard, eval mode, fingerprints, custom preprocessing."""

import json

import numpy as np
import pytest
import torch

from mmia.embed import Encoder
from mmia.errors import MmiaError
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


# ---------------------------------------------------------------- QuickGELU for local files


@pytest.fixture(scope="module")
def vit_b32_file(tmp_path_factory) -> str:
    """A random-init ViT-B-32 state dict on disk (fp16 to halve the file)."""
    import open_clip

    model = open_clip.create_model("ViT-B-32")
    path = tmp_path_factory.mktemp("vitb32") / "vit-b-32.pt"
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)
    return str(path)


def _activations(model: torch.nn.Module) -> set[type]:
    from open_clip.transformer import QuickGELU

    return {type(m) for m in model.modules() if isinstance(m, (QuickGELU, torch.nn.GELU))}


def test_checkpoint_file_of_quickgelu_architecture_needs_a_choice(vit_b32_file):
    with pytest.raises(MmiaError) as info:
        load_model("ViT-B-32", vit_b32_file, device="cpu")
    message = str(info.value)
    assert "\n" not in message
    for word in ("--quick-gelu", "--no-quick-gelu", "openai", "laion400m_e31", "laion400m_e32"):
        assert word in message, message


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_checkpoint_file_is_built_with_the_chosen_activation(vit_b32_file, quick_gelu):
    from open_clip.transformer import QuickGELU

    loaded = load_model("ViT-B-32", vit_b32_file, device="cpu", quick_gelu=quick_gelu)
    assert _activations(loaded.model) == {QuickGELU if quick_gelu else torch.nn.GELU}
    assert isinstance(loaded.model.visual.transformer.resblocks[0].mlp.gelu,
                      QuickGELU if quick_gelu else torch.nn.GELU)


def test_custom_config_checkpoint_needs_no_quickgelu_choice(tmp_path, tiny_model, tiny_config):
    torch.save(tiny_model.model.state_dict(), tmp_path / "tiny.pt")
    loaded = load_model("mmia-test-tiny", str(tmp_path / "tiny.pt"), tiny_config, device="cpu")
    assert _activations(loaded.model) == {torch.nn.GELU}
    assert loaded.fingerprint == tiny_model.fingerprint


# ---------------------------------------------------------------- precision


def test_unknown_precision_is_refused(tiny_config):
    with pytest.raises(MmiaError) as info:
        load_model("mmia-test-tiny", model_config=tiny_config, device="cpu", precision="fp8")
    message = str(info.value)
    assert "\n" not in message
    for word in ("fp8", "fp32", "fp16", "bf16", "amp"):
        assert word in message, message


def _inputs(loaded, n: int = 6) -> tuple[list[torch.Tensor], list[str]]:
    size = loaded.model.visual.image_size
    images = list(torch.rand((n, 3, *size), generator=torch.Generator().manual_seed(1)))
    return images, [f"a photo of thing number {i}" for i in range(n)]


def test_amp_runs_under_autocast_close_to_fp32(tiny_model, tiny_config):
    amp = load_model("mmia-test-tiny", model_config=tiny_config, device="cpu", precision="amp")
    assert amp.description["weights"] == tiny_model.description["weights"]
    images, captions = _inputs(tiny_model)
    for encode in (lambda e: e.images(images), lambda e: e.texts(captions)):
        exact, mixed = encode(Encoder(tiny_model, 8)), encode(Encoder(amp, 8))
        gap = float(np.abs(exact - mixed).max())
        assert 0 < gap < 0.05, f"amp vs fp32 max abs difference {gap}"


def test_amp_features_do_not_depend_on_batch_mates(tiny_config):
    amp = load_model("mmia-test-tiny", model_config=tiny_config, device="cpu", precision="amp")
    images, captions = _inputs(amp)
    encoder = Encoder(amp, 4)
    assert encoder.images(images[:1]).tobytes() == encoder.images(images[:3])[:1].tobytes()
    assert encoder.texts(captions[:1]).tobytes() == encoder.texts(captions[:4])[:1].tobytes()
