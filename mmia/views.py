"""Deterministic augmented image views for AEA.

View 0 is the model's own preprocessing. View v ≥ 1 applies a random augmentation whose
randomness is seeded by (image digest, v, augmentation config), so any rerun — on any
machine, in any worker, in any order — reproduces it exactly.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class AugmentConfig:
    """The augmentations AEA applies; every field is part of the cache identity of a view."""

    crop_scale: tuple[float, float] = (0.5, 1.0)
    rotation_degrees: float = 15.0
    flip_p: float = 0.5
    jitter: float = 0.3
    blur_sigma: tuple[float, float] = (0.1, 1.5)
    version: int = 2  # 2: images are first shrunk to the model's input size (`input_side`)

    def digest(self) -> str:
        payload = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:12]

    def apply(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        """One random augmentation: resized crop, rotation, flip, colour jitter, blur."""
        w, h = image.size
        area = w * h * rng.uniform(*self.crop_scale)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw = round(min(w, max(1, np.sqrt(area * aspect))))
        ch = round(min(h, max(1, np.sqrt(area / aspect))))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        out = image.resize((w, h), Image.BICUBIC, box=(left, top, left + cw, top + ch))
        out = out.rotate(float(rng.uniform(-1, 1) * self.rotation_degrees), Image.BILINEAR)
        if rng.random() < self.flip_p:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            out = enhance(out).enhance(float(rng.uniform(1 - self.jitter, 1 + self.jitter)))
        return out.filter(ImageFilter.GaussianBlur(float(rng.uniform(*self.blur_sigma))))


def input_side(preprocess: Callable) -> int | None:
    """The side the model's preprocessing resizes the shortest image side to (None: unknown)."""
    for step in getattr(preprocess, "transforms", ()):
        size = getattr(step, "size", None)
        if type(step).__name__ == "Resize" and size is not None:
            return int(size if isinstance(size, int) else min(size))
    return None


def shrunk(image: Image.Image, side: int | None) -> Image.Image:
    """`image` with its shortest side reduced to `side` (never enlarged): augmenting at the
    model's input size costs the same whatever the original resolution."""
    w, h = image.size
    if not side or min(w, h) <= side:
        return image
    scale = side / min(w, h)
    return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)


def view_seed(image_digest: str, view: int, config: AugmentConfig) -> int:
    h = hashlib.sha256(f"{image_digest}:{view}:{config.digest()}".encode()).digest()
    return int.from_bytes(h[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def make_view(
    image: Image.Image,
    image_digest: str,
    view: int,
    preprocess: Callable,
    config: AugmentConfig,
) -> torch.Tensor:
    """The model input tensor of one view of an image (view 0 = plain preprocessing)."""
    if view == 0:
        return preprocess(image)
    rng = np.random.default_rng(view_seed(image_digest, view, config))
    return preprocess(config.apply(image, rng))


def make_views(
    image: Image.Image,
    image_digest: str,
    views: Sequence[int],
    preprocess: Callable,
    config: AugmentConfig,
) -> torch.Tensor | None:
    """The model inputs of several views of an image as ONE (len(views), C, H, W) tensor (None
    for no views): one tensor crosses a process boundary as one shared-memory descriptor.
    Augmented views (v ≥ 1) are made from the image shrunk to the model's input size."""
    import torch

    if not views:
        return None
    small = shrunk(image, input_side(preprocess)) if any(v >= 1 for v in views) else image
    return torch.stack([make_view(image if v == 0 else small, image_digest, v, preprocess, config)
                        for v in views])
