"""An example's images made ready for both paths: opened (an unreadable one is skipped by name),
resized, and their corrupted copies. One place for training (the packer) and evaluation alike, so
both open, resize and corrupt an image the same way."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from crystal_ext.data.corruption import CorruptionConfig, corrupt
from crystal_ext.data.example import Example, SkipExample


def open_image(source) -> Image.Image:
    """`source` (a path, a file object or a PIL image) as a fully decoded RGB image; raises
    SkipExample naming the image when it cannot be read."""
    name = _name(source)
    try:
        if not isinstance(source, Image.Image):
            source = Image.open(Path(source) if isinstance(source, str) else source)
        return source.convert("RGB")  # forces the decode, so a truncated file fails here
    except Exception as exc:  # PIL's decoders raise OSError, SyntaxError, struct.error, EOFError, ...
        raise SkipExample(f"unreadable image {name!r}: {type(exc).__name__}: {exc}") from exc


def _name(source) -> str:
    return source if isinstance(source, str) else getattr(source, "name", type(source).__name__)


def corruption_key(key: str, index: int, count: int) -> str:
    """The seed key of image `index` of an example with `count` images."""
    return key if count == 1 else f"{key}#{index}"


@dataclass(frozen=True)
class ImagePair:
    """An example's images as packed: `intact` for the intact path (segment C), `corrupted` for
    the corrupted path (segment B), in the same order."""

    intact: list[Image.Image]
    corrupted: list[Image.Image]


@dataclass(frozen=True)
class ExampleImages:
    """How an example's images are made ready: each resized to a `size` square (None: as they
    are) and corrupted under `corruption`, seeded by (`seed`, the example's key and the image's
    place)."""

    size: int | None = None
    corruption: CorruptionConfig = field(default_factory=CorruptionConfig)
    seed: int = 0

    def __post_init__(self):
        if self.size is not None and self.size <= 0:
            raise ValueError(f"ExampleImages: size must be positive or None, got {self.size}")

    def intact(self, example: Example) -> list[Image.Image]:
        """The example's images, opened and resized; SkipExample when it has none or one is
        unreadable."""
        if not example.images:
            raise SkipExample("no image")
        images = [open_image(source) for source in example.images]
        if self.size is None:
            return images
        return [image.resize((self.size, self.size), Image.BICUBIC) for image in images]

    def corrupted(self, example: Example, intact: list[Image.Image]) -> list[Image.Image]:
        """The corrupted copy of each of `intact` (the example's images), each with its own draw."""
        n = len(intact)
        return [
            corrupt(image, self.corruption, self.seed, corruption_key(example.key, i, n))
            for i, image in enumerate(intact)
        ]

    def intact_and_corrupted(self, example: Example) -> ImagePair:
        intact = self.intact(example)
        return ImagePair(intact, self.corrupted(example, intact))
