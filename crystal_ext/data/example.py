"""One training or evaluation example, as every data source yields it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Example:
    """An image question and its answer; `key` names the example in warnings, seeds its
    corruption, and identifies it in evaluation results."""

    key: str
    image: object  # PIL image or a path
    question: str
    answer: str | None


class SkipExample(ValueError):
    """Raised while packing an example that cannot be trained on; the message says why."""
