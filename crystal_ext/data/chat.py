"""The chat text of a conversation, from the processor's own chat template: the one place the
prompt format is made.

Messages are in the processor's multimodal form: {"role": ..., "content": [{"type": "image"},
{"type": "text", "text": ...}]}; string contents are turned into one text part. The processor
(or its tokenizer) must carry a chat template.
"""

from __future__ import annotations

ANSWER_SENTINEL = "\x00ANSWER\x00"


def as_parts(content) -> list[dict]:
    """A message content as a list of parts (a string becomes one text part)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [dict(part) for part in content]


def _template_owner(processor):
    for owner in (processor, getattr(processor, "tokenizer", None)):
        if owner is not None and getattr(owner, "chat_template", None):
            return owner
    raise ValueError(
        f"{type(processor).__name__}: no chat template (neither the processor nor its tokenizer has "
        "one); save the model's processor with its chat_template, or set processor.chat_template"
    )


def render(processor, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The conversation as text through the processor's chat template; image parts become the
    processor's image placeholder, which the processor expands to the image's tokens."""
    messages = [{"role": m["role"], "content": as_parts(m["content"])} for m in messages]
    return _template_owner(processor).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def turn_end(processor) -> str:
    """The text the chat template closes an assistant turn with (trailing whitespace dropped),
    e.g. "<|im_end|>" or "<end_of_utterance>"."""
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": ANSWER_SENTINEL},
    ]
    text = render(processor, messages, add_generation_prompt=False)
    if ANSWER_SENTINEL not in text:
        raise ValueError(f"{type(processor).__name__}: the chat template drops the assistant's answer")
    return text.split(ANSWER_SENTINEL, 1)[1].rstrip()


def answer_text(answer: str, answer_open: str, answer_close: str, end: str) -> str:
    """The assistant's answer as trained (segment E): the answer between its markers, and the
    turn end."""
    return f"{answer_open}{answer}{answer_close}{end}"
