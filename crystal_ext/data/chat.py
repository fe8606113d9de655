"""The chat text around one image question: the one place the prompt format is written.

Qwen's chat format (ChatML with vision markers). The packer tokenises the pieces separately,
because it places the image tokens itself; evaluation joins them into one string with a single
image placeholder, which the processor expands to the image's tokens.
"""

from __future__ import annotations

VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"
TURN_END = "<|im_end|>"


def prompt_parts(system: str, question: str) -> tuple[str, str]:
    """(text before the image: segment A, text after the image up to the assistant's turn)."""
    before = f"<|im_start|>system\n{system}{TURN_END}\n<|im_start|>user\n"
    after = f"{question}{TURN_END}\n<|im_start|>assistant\n"
    return before, after


def prompt_text(system: str, question: str) -> str:
    """The whole prompt with one image placeholder (what inference feeds the processor)."""
    before, after = prompt_parts(system, question)
    return f"{before}{VISION_START}{IMAGE_PAD}{VISION_END}{after}"


def answer_text(answer: str, answer_open: str, answer_close: str) -> str:
    """The assistant's answer as trained (segment E): the answer between its markers, and the
    turn end."""
    return f"{answer_open}{answer}{answer_close}{TURN_END}"
