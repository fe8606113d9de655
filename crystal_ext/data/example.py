"""One training or evaluation example, as every data source yields it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Example:
    """A conversation about one or more images and the answer of its last assistant turn; `key`
    names the example in warnings, seeds its corruption, and identifies it in evaluation results.

    The simple form is one image and one question. A multi-turn or multi-image record also gives
    `messages`: every turn before the trained answer (earlier answers included, as context),
    with {"type": "image"} parts where its images go, in the order of `image` (then a list).
    `where` names the record of a data file (`file:line`, `file[i]`) in warnings.
    """

    key: str
    image: object  # PIL image or a path, or a list of them (with `messages`)
    question: str
    answer: str | None
    messages: list[dict] | None = None
    where: str | None = None  # the record it came from (file:line), for messages about it

    @property
    def images(self) -> list:
        if self.image is None:
            return []
        return list(self.image) if isinstance(self.image, (list, tuple)) else [self.image]


class SkipExample(ValueError):
    """Raised while packing an example that cannot be trained on; the message says why."""
