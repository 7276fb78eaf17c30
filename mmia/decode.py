"""Image bytes → RGB, with bounds checked before any pixel is decoded (no torch here).

Images are refused before their pixels are decoded when they hold more than `MAX_IMAGE_PIXELS`
pixels, or when one side is more than `MAX_ASPECT_RATIO` times the other (the model's
shortest-side resize would blow a 1 × 1,000,000 strip up to gigabytes). Transparency is
composited on white; 16-bit greyscale is scaled to 8 bits, not clipped.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

MAX_IMAGE_PIXELS = 64_000_000
MAX_ASPECT_RATIO = 100  # the shortest-side resize then makes at most 100 × size² pixels
IMAGE_STATS_VERSION = 1  # bump when mmia.attacks.blind.image_stats_of changes its numbers


def decoder_version() -> dict:
    """What decides a sample's decode status and image statistics besides its bytes (the sample
    index records it, and is read again when it differs)."""
    import PIL

    return {"pillow": PIL.__version__, "max_pixels": MAX_IMAGE_PIXELS,
            "max_aspect": MAX_ASPECT_RATIO, "stats": IMAGE_STATS_VERSION}


class ExtremeAspectRatioError(ValueError):
    """An image so elongated that the model's shortest-side resize would explode it."""


def decode_image(data: bytes) -> Image.Image:
    """Decode to RGB, refusing decompression bombs and extreme strips before pixels are loaded."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise Image.DecompressionBombError(f"{width}x{height} pixels")
        if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            raise ExtremeAspectRatioError(
                f"{width}x{height} pixels: one side is over {MAX_ASPECT_RATIO} times the other")
        image.load()
    if image.mode.startswith("I"):  # 16/32-bit integer grey: scale to 8 bits, do not clip
        image = _integer_grey_to_8bit(image)
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def _integer_grey_to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit (or 32-bit integer) greyscale image as 8-bit "L": PIL's convert clips it."""
    values = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I;16") or values.max() <= 65535 else values.max()
    return Image.fromarray(np.clip(np.rint(values / top * 255.0), 0, 255).astype(np.uint8), "L")


