"""Opening one image of an example, for training (the packer) and evaluation alike, so a damaged
file is skipped with its name the same way on both sides instead of crashing one of them."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from crystal_ext.data.example import SkipExample


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
