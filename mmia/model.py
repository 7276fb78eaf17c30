"""Load any open_clip model for auditing: tag, local checkpoint, local-dir or custom config.

Always eval mode, weights loaded with `weights_only=True`, the QuickGELU trap guarded, and a
fingerprint that changes whenever weights, preprocessing, precision or open_clip change.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mmia.errors import MmiaError

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
PREPROCESS_KEYS = {"mean": "image_mean", "std": "image_std",
                   "interpolation": "image_interpolation", "resize_mode": "image_resize_mode"}
# a custom config's `preprocess_cfg` (mean, std, interpolation, resize_mode), by model name
PREPROCESS_OVERRIDES: dict[str, dict] = {}


@dataclass
class LoadedModel:
    """A model ready to embed: eval mode, its eval preprocessing, tokenizer and fingerprint."""

    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable
    fingerprint: str
    name: str
    pretrained: str | None
    precision: str
    device: torch.device
    description: dict


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MmiaError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu")
    return torch.device(device)


def register_model_config(config_path: str, name: str | None = None) -> str:
    """Register a custom open_clip model-config JSON; returns the model name to build."""
    import open_clip

    if not os.path.isfile(config_path):
        raise MmiaError(f"model config {config_path!r} does not exist: pass a JSON file path")
    try:
        with open(config_path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as exc:
        raise MmiaError(f"model config {config_path!r} is not valid JSON ({exc})") from None
    if "embed_dim" not in cfg or "vision_cfg" not in cfg or "text_cfg" not in cfg:
        raise MmiaError(
            f"model config {config_path!r} lacks embed_dim/vision_cfg/text_cfg: "
            "it must be an open_clip model config"
        )
    stem = os.path.splitext(os.path.basename(config_path))[0]
    name = name or stem
    preprocess_cfg = cfg.pop("preprocess_cfg", None)
    if name != stem or preprocess_cfg is not None:  # open_clip names a config by its file stem
        folder = tempfile.mkdtemp(prefix="mmia-cfg-")
        config_path = os.path.join(folder, f"{name}.json")
        with open(config_path, "w") as f:
            json.dump(cfg, f)
    open_clip.add_model_config(config_path)
    PREPROCESS_OVERRIDES[name] = preprocess_cfg or {}
    return name


def quickgelu_name(name: str, pretrained: str | None) -> str:
    """The model name to build: `-quickgelu` when the tag was trained with QuickGELU."""
    import open_clip

    if not pretrained or name.endswith("-quickgelu") or os.path.exists(pretrained):
        return name
    cfg = open_clip.get_pretrained_cfg(name, pretrained) or {}
    if cfg.get("quick_gelu") and f"{name}-quickgelu" in open_clip.list_models():
        return f"{name}-quickgelu"
    return name


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read a checkpoint safely (`weights_only=True`); unwraps training checkpoints."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt files raise many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MmiaError(
            f"cannot load checkpoint {path!r} ({first}): it must be a state dict saved with "
            "torch.save or safetensors; pickled objects are refused (weights_only=True)"
        ) from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MmiaError(f"checkpoint {path!r} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def tag_cached_locally(name: str, tag: str) -> bool:
    """Whether open_clip's download of (name, tag) is already in the Hugging Face cache."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    repo = (open_clip.get_pretrained_cfg(name, tag) or {}).get("hf_hub", "").strip("/")
    files = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
    return bool(repo) and any(isinstance(try_to_load_from_cache(repo, f), str) for f in files)


def no_weights_error(name: str, tag: str, why: str) -> MmiaError:
    return MmiaError(
        f"could not fetch pretrained weights {tag!r} for {name!r} ({why}): download them "
        "where there is network and pass the local file with --pretrained /path/to/weights.bin"
    )


@contextlib.contextmanager
def _logging_above(level: int):
    """Silence log records at `level` and below for the duration."""
    logging.disable(level)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        t = tensor.detach().cpu().contiguous()
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def make_fingerprint(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def load_model(
    name: str,
    pretrained: str | None = None,
    model_config: str | None = None,
    device: str = "auto",
    precision: str = "fp32",
) -> LoadedModel:
    """Build an open_clip model in eval mode with its eval transform and tokenizer."""
    import open_clip

    dev = resolve_device(device)
    if model_config:
        name = register_model_config(model_config, name)
    build_name = quickgelu_name(name, pretrained)
    is_file = bool(pretrained) and (
        os.path.exists(pretrained) or pretrained.endswith(CHECKPOINT_SUFFIXES)
    )
    if build_name not in open_clip.list_models() and not name.startswith(("hf-hub:", "local-dir:")):
        raise MmiaError(
            f"unknown model {name!r}: use a name from open_clip.list_models() "
            "or pass --model-config FILE for a custom config"
        )
    if is_file and not os.path.isfile(pretrained):
        raise MmiaError(f"checkpoint {pretrained!r} does not exist: check the --pretrained path")
    if pretrained and not is_file and not pretrained.startswith(("hf-hub:", "local-dir:")):
        if not open_clip.get_pretrained_cfg(build_name, pretrained):
            raise MmiaError(
                f"unknown pretrained tag {pretrained!r} for {name!r}: see "
                "open_clip.list_pretrained(), or pass a local checkpoint path"
            )
        if not tag_cached_locally(build_name, pretrained) and not hub_reachable():
            raise no_weights_error(name, pretrained, "no network")
    torch.manual_seed(0)  # random-init models (no weights given) are reproducible
    try:
        # with a checkpoint file open_clip would warn "initialized randomly" before we load it
        quiet = _logging_above(logging.WARNING) if is_file else contextlib.nullcontext()
        with quiet:
            model, _, preprocess = open_clip.create_model_and_transforms(
                build_name,
                pretrained=None if is_file else pretrained,
                precision=precision,
                device="cpu",
                **{PREPROCESS_KEYS[k]: v for k, v in PREPROCESS_OVERRIDES.get(name, {}).items()
                   if k in PREPROCESS_KEYS},
            )
    except MmiaError:
        raise
    except Exception as exc:  # noqa: BLE001 - download failures surface as many types
        if pretrained and not is_file:
            raise no_weights_error(name, pretrained, type(exc).__name__) from None
        raise MmiaError(f"could not build model {name!r}: {exc}") from None
    if is_file:
        try:
            model.load_state_dict(load_state_dict(pretrained))
        except RuntimeError as exc:
            raise MmiaError(
                f"checkpoint {pretrained!r} does not fit model {build_name!r} "
                f"({str(exc).splitlines()[0]}): pass the matching --model/--model-config"
            ) from None
    model = model.to(dev).eval()
    tokenizer = open_clip.get_tokenizer(build_name)
    description = {
        "name": build_name,
        "pretrained": os.path.abspath(pretrained) if is_file else pretrained,
        "precision": precision,
        "open_clip": open_clip.__version__,
        "torch": torch.__version__,
        "preprocess": repr(preprocess),
        "weights": weights_digest(model),
    }
    fingerprint = make_fingerprint({k: v for k, v in description.items() if k != "pretrained"})
    return LoadedModel(
        model=model,
        preprocess=preprocess,
        tokenizer=tokenizer,
        fingerprint=fingerprint,
        name=build_name,
        pretrained=pretrained,
        precision=precision,
        device=dev,
        description=description,
    )
