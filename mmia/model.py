"""Load any open_clip model for auditing: tag, local checkpoint, local-dir or custom config.

Always eval mode, weights loaded with `weights_only=True`, the QuickGELU trap guarded, and a
fingerprint built from plain values (resolved model config, weights, preprocessing settings,
precision, library versions) that changes whenever any of them changes.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import logging
import os
import re
import tempfile
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mmia.errors import MmiaError
from mmia.modelref import CHECKPOINT_SUFFIXES, make_fingerprint

PRECISIONS = ("fp32", "fp16", "bf16", "amp")
SCHEMAS = ("hf-hub:", "local-dir:")  # models whose config comes with their weights
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
    forward_seed: int | None = None  # stochastic forward passes (MC dropout): seeded per batch

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype image batches are fed in (fp16/bf16 for those precisions, else fp32)."""
        from open_clip import get_input_dtype

        return get_input_dtype(self.precision) or torch.float32

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context for forward passes: autocast under `amp`, nothing otherwise."""
        dtype = autocast_dtype(self.precision, self.device)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """`amp` computes in fp16 on CUDA and in bf16 elsewhere; other precisions do not autocast."""
    if precision != "amp":
        return None
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device to embed on: auto, cpu, cuda, cuda:N (an existing GPU), or mps where
    Apple's MPS backend is available; anything else (tpu, meta, ...) is refused."""
    text = str(device).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if mps_available():
            return torch.device("mps")
        raise MmiaError("--device mps was asked for but Apple's MPS backend is not available: "
                        f"use one of {', '.join(accepted_devices())}")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise MmiaError(f"--device {str(device)!r} is not supported: use one of "
                        f"{', '.join(accepted_devices())}")
    if not torch.cuda.is_available():
        raise MmiaError(f"--device {text} was asked for but no CUDA GPU is visible: "
                        "use --device cpu")
    count = torch.cuda.device_count()
    if match.group(1) is not None and int(match.group(1)) >= count:
        existing = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
        raise MmiaError(f"--device {text} does not exist: {count} CUDA GPU(s) are visible, "
                        f"use {existing}")
    return torch.device(text)


def mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def accepted_devices() -> list[str]:
    """The --device values this machine accepts (mps only where it is available)."""
    return ["auto", "cpu", "cuda", "cuda:N", *(["mps"] if mps_available() else [])]


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


def quickgelu_tags(name: str) -> list[str]:
    """The released open_clip tags of architecture `name` that were trained with QuickGELU."""
    import open_clip

    return [tag for tag in open_clip.list_pretrained_tags_by_model(name)
            if (open_clip.get_pretrained_cfg(name, tag) or {}).get("quick_gelu")]


def choose_quick_gelu(name: str, pretrained: str | None, is_file: bool,
                      quick_gelu: bool | None) -> bool | None:
    """QuickGELU or GELU: the caller's choice, else the model config's or the tag's.

    A checkpoint file says nothing about its activation: for an architecture with released
    QuickGELU weights the caller must choose. None: the config that comes with the weights
    (hf-hub:, local-dir:) decides.
    """
    import open_clip

    if quick_gelu is not None:
        return quick_gelu
    if name.startswith(SCHEMAS):
        return None
    if (open_clip.get_model_config(name) or {}).get("quick_gelu"):
        return True
    if pretrained and not is_file:
        return bool((open_clip.get_pretrained_cfg(name, pretrained) or {}).get("quick_gelu"))
    tags = quickgelu_tags(name) if is_file else []
    if tags:
        raise MmiaError(
            f"checkpoint {pretrained!r} does not say whether {name!r} runs QuickGELU or GELU: "
            f"the released {name} weights {', '.join(tags)} were trained with QuickGELU; pass "
            "--quick-gelu for those, --no-quick-gelu for weights trained with GELU (the other "
            "tags, open_clip's default)"
        )
    return False


def quick_gelu_override(name: str, choice: bool | None) -> dict[str, bool]:
    """Model kwargs that make open_clip build `name` with the chosen activation."""
    import open_clip

    if choice is None:
        return {}
    config = None if name.startswith(SCHEMAS) else open_clip.get_model_config(name)
    if config is not None and bool(config.get("quick_gelu")) == choice:
        return {}
    return {"quick_gelu": choice}


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


def first_nonfinite(state: dict[str, torch.Tensor]) -> tuple[str, int, int] | None:
    """(name, bad values, values) of the first floating tensor holding NaN or ±inf, or None."""
    for name, tensor in state.items():
        # one float64 sum per tensor: NaN or inf anywhere makes it non-finite, and no
        # finite float32/16 values can overflow it (2.5x faster than isfinite().all())
        if tensor.is_floating_point() and not torch.isfinite(tensor.sum(dtype=torch.float64)):
            finite = torch.isfinite(tensor)
            return name, int(finite.numel() - finite.sum()), finite.numel()
    return None


def refuse_nonfinite_weights(model: torch.nn.Module, pretrained: str) -> None:
    """NaN or inf weights would make every score NaN or meaningless: refuse them, naming one."""
    bad = first_nonfinite(model.state_dict())
    if bad is not None:
        name, count, total = bad
        raise MmiaError(
            f"weights {pretrained!r} hold non-finite values (tensor {name!r}: {count} of "
            f"{total} NaN or inf): the checkpoint is corrupt or its training diverged; pass "
            "other weights with --pretrained")


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


def plain(value: Any, depth: int = 0) -> Any:
    """JSON values describing `value`: numbers, strings, lists, dicts; never a repr."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return plain(value.value, depth)
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        return value.tolist()
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [plain(v, depth) for v in value]
        return sorted(items, key=json.dumps) if isinstance(value, (set, frozenset)) else items
    if isinstance(value, dict):
        return {str(k): plain(v, depth) for k, v in value.items()}
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, types.MethodType, type)):
        return {"function": f"{value.__module__}.{value.__qualname__}"}
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    if depth >= 4:
        return {"type": kind}
    settings = {k: plain(v, depth + 1) for k, v in sorted(vars(value).items())
                if not k.startswith("_") and k != "training"} if hasattr(value, "__dict__") else {}
    return {"type": kind, **settings}


def library_versions() -> dict[str, str]:
    """Versions of the libraries that compute features: open_clip, torch, torchvision, Pillow."""
    import open_clip
    import PIL
    import torchvision

    return {"open_clip": open_clip.__version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "pillow": PIL.__version__}


def resolved_config(build_name: str, choice: bool | None, preprocess_cfg: dict) -> dict:
    """The open_clip model config as built: QuickGELU choice and preprocessing override in."""
    import open_clip

    config = open_clip.get_model_config(build_name) or {}
    config["quick_gelu"] = bool(config.get("quick_gelu")) if choice is None else choice
    if preprocess_cfg:
        config["preprocess_cfg"] = preprocess_cfg
    return plain(config)


def load_model(
    name: str,
    pretrained: str | None = None,
    model_config: str | None = None,
    device: str = "auto",
    precision: str = "fp32",
    quick_gelu: bool | None = None,
) -> LoadedModel:
    """Build an open_clip model in eval mode with its eval transform and tokenizer.

    quick_gelu: build with QuickGELU (True) or GELU (False); None decides from the config or
    the pretrained tag, and refuses a checkpoint file of an architecture with QuickGELU tags.
    """
    import open_clip

    if precision not in PRECISIONS:
        raise MmiaError(
            f"precision {precision!r} is not supported: use one of {', '.join(PRECISIONS)}"
        )
    dev = resolve_device(device)
    if model_config:
        name = register_model_config(model_config, name)
    build_name = quickgelu_name(name, pretrained)
    is_file = bool(pretrained) and (
        os.path.exists(pretrained) or pretrained.endswith(CHECKPOINT_SUFFIXES)
    )
    if build_name not in open_clip.list_models() and not name.startswith(SCHEMAS):
        raise MmiaError(
            f"unknown model {name!r}: use a name from open_clip.list_models() "
            "or pass --model-config FILE for a custom config"
        )
    if is_file and not os.path.isfile(pretrained):
        raise MmiaError(f"checkpoint {pretrained!r} does not exist: check the --pretrained path")
    if pretrained and not is_file and not pretrained.startswith(SCHEMAS):
        if not open_clip.get_pretrained_cfg(build_name, pretrained):
            raise MmiaError(
                f"unknown pretrained tag {pretrained!r} for {name!r}: see "
                "open_clip.list_pretrained(), or pass a local checkpoint path"
            )
        if not tag_cached_locally(build_name, pretrained) and not hub_reachable():
            raise no_weights_error(name, pretrained, "no network")
    choice = choose_quick_gelu(build_name, pretrained, is_file, quick_gelu)
    preprocess_cfg = PREPROCESS_OVERRIDES.get(name, {})
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
                **{PREPROCESS_KEYS[k]: v for k, v in preprocess_cfg.items()
                   if k in PREPROCESS_KEYS},
                **quick_gelu_override(build_name, choice),
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
    if pretrained:
        refuse_nonfinite_weights(model, pretrained)
    model = model.to(dev).eval()
    tokenizer = open_clip.get_tokenizer(build_name)
    amp_dtype = autocast_dtype(precision, dev)
    description = {
        "name": build_name,
        "pretrained": os.path.abspath(pretrained) if is_file else pretrained,
        "model_config": resolved_config(build_name, choice, preprocess_cfg),
        "weights": weights_digest(model),
        "preprocess": plain(preprocess),
        "precision": precision,
        "autocast": str(amp_dtype).removeprefix("torch.") if amp_dtype else None,
        "versions": library_versions(),
    }
    # what computes the features, not what it is called or where the weights lay
    fingerprint = make_fingerprint(
        {k: v for k, v in description.items() if k not in ("name", "pretrained")}
    )
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
