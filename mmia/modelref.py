"""A model named but not built yet: its fingerprint from a memo, the model only when needed.

A warm audit needs the model's fingerprint (to find its features in the cache) but no forward
pass. Building a model (and importing torch and open_clip) costs seconds; building ViT-L costs
more. `LazyModel` remembers, in the cache folder, the fingerprint and description that
`mmia.model.load_model` computed for a load request, keyed by everything that decides them:
model name, the custom config's content, the weights (a checkpoint file by real path, size and
modification time; a pretrained tag by name), precision, QuickGELU choice, device and the
versions of open_clip, torch, torchvision and Pillow. Requests whose weights cannot be
identified cheaply (`hf-hub:`, `local-dir:`) and `amp` on `--device auto` (whose autocast type
depends on the machine) are never memoised: they build the model. This module does not import
torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import asdict, dataclass
from importlib import metadata

log = logging.getLogger("mmia")
MEMO_FOLDER = "models"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")  # weights files
MEMO_FORMAT = 2  # bump when mmia.model changes what the fingerprint is made of
LIBRARIES = ("open_clip_torch", "torch", "torchvision", "pillow")


@dataclass(frozen=True)
class ModelRequest:
    """The arguments of `mmia.model.load_model`."""

    name: str
    pretrained: str | None = None
    model_config: str | None = None
    device: str = "auto"
    precision: str = "fp32"
    quick_gelu: bool | None = None

    def memo_key(self) -> str | None:
        """What decides this request's fingerprint, hashed; None where it cannot be told."""
        if self.precision == "amp" and self.device == "auto":
            return None
        parts: dict = {"format": MEMO_FORMAT, **asdict(self), "versions": _versions(),
                       "mmia": _mmia_version()}
        weights = self.pretrained
        if weights and weights.startswith(("hf-hub:", "local-dir:")):
            return None
        if weights and os.path.isfile(weights):
            st = os.stat(weights)
            parts["pretrained"] = [os.path.realpath(weights), st.st_size, st.st_mtime_ns]
        if self.model_config:
            try:
                with open(self.model_config, "rb") as f:
                    parts["model_config"] = hashlib.sha256(f.read()).hexdigest()
            except OSError:
                return None
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def make_fingerprint(parts: dict) -> str:
    """A model fingerprint: what computes the features, hashed (16 hex digits)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _mmia_version() -> str | None:
    """mmia's own version: how it builds a model and its fingerprint may change with it."""
    try:
        return metadata.version("mmia")
    except metadata.PackageNotFoundError:
        return None


def _versions() -> dict[str, str | None]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def built_model(model):
    """The `LoadedModel` behind a `LazyModel`, a model variant, or a `LoadedModel` itself."""
    return model.get() if hasattr(model, "get") else model


class LazyModel:
    """`fingerprint` and `description` of a request, from the memo in `cache_root` when there
    is one; `get()` builds the model (once) and records the memo."""

    def __init__(self, request: ModelRequest, cache_root: str | None = None):
        self.request, self.cache_root = request, cache_root
        self._loaded = None
        self._said = False
        self._memo = self._read_memo()

    @property
    def built(self) -> bool:
        return self._loaded is not None

    def _memo_path(self) -> str | None:
        key = self.request.memo_key() if self.cache_root else None
        return os.path.join(self.cache_root, MEMO_FOLDER, key + ".json") if key else None

    def _read_memo(self) -> dict | None:
        path = self._memo_path()
        if path is None:
            return None
        try:
            with open(path) as f:
                memo = json.load(f)
        except (OSError, ValueError):
            return None
        ok = isinstance(memo, dict) and isinstance(memo.get("fingerprint"), str) \
            and isinstance(memo.get("description"), dict)
        return memo if ok else None

    def _write_memo(self) -> None:
        path = self._memo_path()
        if path is None or self._loaded is None:
            return
        memo = {"fingerprint": self._loaded.fingerprint, "description": self._loaded.description,
                "request": asdict(self.request)}
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "w") as f:
                json.dump(memo, f, default=str)
            os.replace(tmp, path)
        except OSError as exc:  # a read-only cache: the next run builds the model again
            log.debug("cannot write the model memo %s (%s)", path, exc)

    def get(self):
        """The `LoadedModel`, built on first use."""
        if self._loaded is None:
            from mmia.model import load_model

            r = self.request
            self._loaded = load_model(r.name, r.pretrained, r.model_config, r.device,
                                      r.precision, quick_gelu=r.quick_gelu)
            log.info("model %s fingerprint %s on %s", self._loaded.name,
                     self._loaded.fingerprint, self._loaded.device)
            if self._memo and self._memo["fingerprint"] != self._loaded.fingerprint:
                log.warning("model memo %s was stale; replaced", self._memo_path())
            self._write_memo()
        return self._loaded

    @property
    def fingerprint(self) -> str:
        if self._memo and not self.built:
            if not self._said:
                log.info("model %s fingerprint %s (remembered: built only if something must "
                         "be embedded)", self.request.name, self._memo["fingerprint"])
                self._said = True
            return self._memo["fingerprint"]
        return self.get().fingerprint

    @property
    def description(self) -> dict:
        return self._memo["description"] if self._memo and not self.built \
            else self.get().description
