"""The model fingerprint: built from plain values, the same in every process."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import TINY_CONFIG

from mmia.model import load_model

# open_clip 2.x put a plain function in the eval transform: its repr holds a memory address
CHILD = """
import sys

import open_clip
from open_clip import transform

from mmia.model import load_model

original = open_clip.create_model_and_transforms


def with_function_step(*args, **kwargs):
    model, train, preprocess = original(*args, **kwargs)
    preprocess.transforms.insert(0, transform._convert_to_rgb)
    return model, train, preprocess


open_clip.create_model_and_transforms = with_function_step
loaded = load_model("mmia-fp-tiny", sys.argv[1], model_config=sys.argv[2], device="cpu")
print(loaded.fingerprint)
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_model) -> str:
    path = tmp_path_factory.mktemp("fp") / "tiny.pt"
    torch.save(tiny_model.model.state_dict(), path)
    return str(path)


def _config(path, **extra) -> str:
    path.write_text(json.dumps({**TINY_CONFIG, **extra}))
    return str(path)


def test_fingerprint_is_the_same_in_two_processes(tmp_path, checkpoint):
    config = _config(tmp_path / "tiny.json")
    prints = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", CHILD, checkpoint, config],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        prints.append(done.stdout.split()[-1])
    assert prints[0] == prints[1]


def test_description_holds_plain_values_and_library_versions(tmp_path, checkpoint):
    loaded = load_model("mmia-fp-tiny", checkpoint, _config(tmp_path / "tiny.json"),
                        device="cpu")
    text = json.dumps(loaded.description)
    assert "0x" not in text and "Compose(" not in text
    versions = json.dumps(loaded.description.get("versions"))
    for library in ("open_clip", "torch", "torchvision", "pillow"):
        assert library in versions, loaded.description


def test_fingerprint_follows_the_model_config_with_the_same_weights(tmp_path, checkpoint):
    gelu = load_model("mmia-fp-tiny", checkpoint, _config(tmp_path / "gelu.json"), device="cpu")
    quick = load_model("mmia-fp-tiny", checkpoint, _config(tmp_path / "quick.json",
                                                           quick_gelu=True), device="cpu")
    assert quick.description["weights"] == gelu.description["weights"]
    assert quick.fingerprint != gelu.fingerprint


def test_fingerprint_follows_precision(tmp_path, checkpoint):
    config = _config(tmp_path / "tiny.json")
    prints = {p: load_model("mmia-fp-tiny", checkpoint, config, device="cpu",
                            precision=p).fingerprint for p in ("fp32", "bf16", "amp")}
    assert len(set(prints.values())) == 3, prints
