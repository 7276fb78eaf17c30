import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory) -> str:
    """A random-init open_clip model config small enough for CPU tests."""
    path = tmp_path_factory.mktemp("cfg") / "mmia-test-tiny.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return str(path)


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    from mmia.model import load_model

    return load_model("mmia-test-tiny", model_config=tiny_config, device="cpu")
