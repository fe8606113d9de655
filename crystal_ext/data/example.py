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

    def prompt_messages(self, system: str | None) -> list[dict]:
        """The turns up to the last assistant turn, images as parts; the system message first."""
        head = [{"role": "system", "content": system}] if system else []
        if self.messages is not None:
            has_system = any(m["role"] == "system" for m in self.messages)
            return (head if not has_system else []) + list(self.messages)
        parts = [{"type": "image"} for _ in self.images] + [{"type": "text", "text": self.question}]
        return head + [{"role": "user", "content": parts}]


class SkipExample(ValueError):
    """Raised while packing an example that cannot be trained on; the message says why."""
