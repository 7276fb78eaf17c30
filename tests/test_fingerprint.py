"""The model fingerprint: built from plain values, the same in every process."""

import json
import re
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


def test_a_second_process_reuses_the_cache_without_a_forward_pass(tmp_path, checkpoint):
    """`mmia embed` twice, in two processes: one fingerprint, and the second embeds nothing."""
    from shardgen import write_good_shards

    config = _config(tmp_path / "mmia-fp-cli.json")
    shards = write_good_shards(tmp_path, 1, 4)
    runs = []
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-m", "mmia", "embed", "--model", "mmia-fp-cli", "--model-config",
             config, "--pretrained", checkpoint, "--shards", shards, "--cache",
             str(tmp_path / "cache"), "--device", "cpu", "--workers", "0", "--no-progress"],
            capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        runs.append(done)
    fingerprints = [re.search(r"fingerprint (\w+)", r.stderr).group(1) for r in runs]
    assert fingerprints[0] == fingerprints[1]
    assert "4 embedded now" in runs[0].stdout
    assert "no forward pass was made" in runs[1].stdout and "0 embedded now" in runs[1].stdout


def test_quick_gelu_flags_reach_the_loader():
    from mmia.cli import build_parser

    base = ["embed", "--model", "ViT-B-32", "--shards", "a.tar", "--cache", "c"]
    assert build_parser().parse_args(base).quick_gelu is None
    assert build_parser().parse_args([*base, "--quick-gelu"]).quick_gelu is True
    assert build_parser().parse_args([*base, "--no-quick-gelu"]).quick_gelu is False
