"""Image corruptions for the corrupted path (segment B), on PIL images, seeded per example.

Published defaults (docs/method.md): Gaussian blur with radius uniform in [2, 5] (the
default); random erasing of 10-30% of the area filled with 0; colour jitter with
brightness 0.4, contrast 0.4, saturation 0.4, hue 0.1. Every random draw comes from a
`random.Random` seeded from (seed, example key), so an example gets the same corruption in
every epoch, process and worker, which makes runs and failures reproducible.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

KINDS = ("blur", "erase", "jitter")


@dataclass(frozen=True)
class CorruptionConfig:
    kind: str = "blur"
    blur_radius: tuple[float, float] = (2.0, 5.0)
    erase_area: tuple[float, float] = (0.10, 0.30)
    erase_aspect: tuple[float, float] = (0.3, 3.3)  # log-uniform, like torchvision's RandomErasing
    erase_value: int = 0
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"CorruptionConfig: kind must be one of {KINDS}, got {self.kind!r}")
        if not 0.0 < self.blur_radius[0] <= self.blur_radius[1]:  # radius 0 would leave the image intact
            raise ValueError(
                f"CorruptionConfig: blur_radius must satisfy 0 < lo <= hi, got {self.blur_radius}"
            )
        lo, hi = self.erase_area
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(
                f"CorruptionConfig: erase_area must satisfy 0 < lo <= hi <= 1, got {self.erase_area}"
            )
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"CorruptionConfig: hue must be in [0, 0.5], got {self.hue}")


def example_rng(seed: int, key) -> random.Random:
    """A generator for one example, stable across processes (hashlib, not Python's salted hash)."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def gaussian_blur(image: Image.Image, rng: random.Random, radius=(2.0, 5.0)) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(*radius)))


def random_erase(
    image: Image.Image, rng: random.Random, area=(0.1, 0.3), aspect=(0.3, 3.3), value=0
) -> Image.Image:
    """Fill one axis-aligned rectangle covering a fraction in `area` of the image with `value`."""
    width, height = image.size
    target = rng.uniform(*area) * width * height
    ratio = math.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1])))
    h = min(height, max(1, round(math.sqrt(target * ratio))))
    w = min(width, max(1, round(target / h)))  # re-derived from h so clipping keeps the area
    top, left = rng.randint(0, height - h), rng.randint(0, width - w)
    out = image.copy()
    fill = value if out.mode in ("L", "I", "F") else (value,) * len(out.getbands())
    out.paste(fill, (left, top, left + w, top + h))
    return out


def _shift_hue(image: Image.Image, shift: float) -> Image.Image:
    hsv = np.asarray(image.convert("HSV"), dtype=np.int16).copy()
    hsv[..., 0] = (hsv[..., 0] + round(shift * 255)) % 256  # PIL's hue channel is 0..255
    return Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")


def colour_jitter(
    image: Image.Image, rng: random.Random, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1
):
    """Brightness, contrast, saturation factors uniform in [1 - x, 1 + x], hue shift uniform
    in [-hue, hue] (fraction of the colour wheel), applied in a random order."""
    steps = [
        lambda im, f=rng.uniform(1 - brightness, 1 + brightness): ImageEnhance.Brightness(im).enhance(f),
        lambda im, f=rng.uniform(1 - contrast, 1 + contrast): ImageEnhance.Contrast(im).enhance(f),
        lambda im, f=rng.uniform(1 - saturation, 1 + saturation): ImageEnhance.Color(im).enhance(f),
        lambda im, s=rng.uniform(-hue, hue): _shift_hue(im, s),
    ]
    rng.shuffle(steps)
    for step in steps:
        image = step(image)
    return image


def corrupt(image: Image.Image, config: CorruptionConfig, seed: int, key) -> Image.Image:
    """The corrupted copy of `image` for the example `key` (any str()-able id) under `seed`.

    The input is converted to RGB (the processor's input) and left unchanged.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"corrupt: image must be a PIL.Image.Image, got {type(image).__name__}")
    image = image.convert("RGB")
    rng = example_rng(seed, key)
    if config.kind == "blur":
        return gaussian_blur(image, rng, config.blur_radius)
    if config.kind == "erase":
        return random_erase(image, rng, config.erase_area, config.erase_aspect, config.erase_value)
    return colour_jitter(image, rng, config.brightness, config.contrast, config.saturation, config.hue)
