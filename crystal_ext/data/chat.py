"""The chat text of a conversation, from the processor's own chat template: the one place the
prompt format is made.

Messages are in the processor's multimodal form: {"role": ..., "content": [{"type": "image"},
{"type": "text", "text": ...}]}; string contents are turned into one text part. The processor
(or its tokenizer) must carry a chat template.

The prompt is exactly what the fine-tuned model is served with:
`processor.apply_chat_template(messages, add_generation_prompt=True, **template_kwargs)`, with
nothing injected. A system turn comes from the record or from an explicit `system` (used only
when the record has none); a template that writes a default one (Qwen2/2.5-VL's) writes it here
as it does when served.
"""

from __future__ import annotations

from dataclasses import dataclass

from crystal_ext.data.example import Example, SkipExample
from crystal_ext.model.latent_tokens import ANSWER_CLOSE, ANSWER_OPEN, THINK_OPEN

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


def render(
    processor, messages: list[dict], add_generation_prompt: bool = True, template_kwargs: dict | None = None
) -> str:
    """The conversation as text through the processor's chat template; image parts become the
    processor's image placeholder, which the processor expands to the image's tokens.
    `template_kwargs` are the template's own variables (e.g. {"enable_thinking": False})."""
    messages = [{"role": m["role"], "content": as_parts(m["content"])} for m in messages]
    return _template_owner(processor).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **(template_kwargs or {})
    )


def parse_template_kwargs(text: str | None) -> dict:
    """The chat template's variables from their JSON text (None: none), e.g.
    '{"enable_thinking": false}'; ValueError when it is not a JSON object."""
    import json

    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--chat_template_kwargs must be a JSON object, got {text!r}: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"--chat_template_kwargs must be a JSON object, got {text!r}")
    return value


def prompt_messages(example: Example, system: str | None) -> list[dict]:
    """The example's turns up to its last assistant turn, images as parts; `system` first when
    the record has no system turn of its own."""
    head = [{"role": "system", "content": system}] if system else []
    if example.messages is not None:
        has_system = any(m["role"] == "system" for m in example.messages)
        return (head if not has_system else []) + list(example.messages)
    parts = [{"type": "image"} for _ in example.images] + [{"type": "text", "text": example.question}]
    return head + [{"role": "user", "content": parts}]


def generation_prompt(
    processor, example: Example, system: str | None = None, template_kwargs: dict | None = None
) -> str:
    """The chat text up to where the model writes its last assistant turn, with image
    placeholders: what training packs before the latent block and what evaluation (and serving)
    generates from. One function for both, so they cannot drift apart."""
    messages = prompt_messages(example, system)
    n_parts = sum(
        1
        for m in messages
        if not isinstance(m["content"], str)
        for p in m["content"]
        if p.get("type") == "image"
    )
    if n_parts != len(example.images):
        raise SkipExample(f"{n_parts} image places in the conversation but {len(example.images)} images")
    return render(processor, messages, add_generation_prompt=True, template_kwargs=template_kwargs)


def opens_think_block(prompt: str) -> bool:
    """Whether the generation prompt ends inside an open think block (Qwen3-VL-Thinking's writes
    "<think>\n"): the latent block then continues it instead of opening a second one. A prompt
    ending with a closed, empty think block (a template with thinking off) does not."""
    return prompt.rstrip().endswith(THINK_OPEN)


def turn_end(processor, template_kwargs: dict | None = None) -> str:
    """The text the chat template closes an assistant turn with (trailing whitespace dropped),
    e.g. "<|im_end|>" or "<end_of_utterance>"."""
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": ANSWER_SENTINEL},
    ]
    text = render(processor, messages, add_generation_prompt=False, template_kwargs=template_kwargs)
    if ANSWER_SENTINEL not in text:
        raise ValueError(f"{type(processor).__name__}: the chat template drops the assistant's answer")
    return text.split(ANSWER_SENTINEL, 1)[1].rstrip()


def answer_text(answer: str, answer_open: str, answer_close: str, end: str) -> str:
    """The assistant's answer as trained (segment E): the answer between its markers, and the
    turn end."""
    return f"{answer_open}{answer}{answer_close}{end}"


@dataclass(frozen=True)
class ChatText:
    """An example's text as trained: `prompt`, the chat text up to the opening of the last
    assistant turn with image placeholders (segments A..C); `answer`, the answer between its
    markers and the turn end (segment E); `continues_think_block`, whether the prompt already
    opened the think block that the latent block (segment D) then continues."""

    prompt: str
    answer: str
    continues_think_block: bool


class ChatFormat:
    """The chat template's way of writing a run's examples: the processor's template with the
    run's `system` turn (for records without one) and `template_kwargs` (its variables)."""

    def __init__(self, processor, system: str | None = None, template_kwargs: dict | None = None):
        self.processor, self.system = processor, system
        self.template_kwargs = dict(template_kwargs or {})
        self.turn_end = turn_end(processor, self.template_kwargs)

    def prompt(self, example: Example) -> str:
        """The chat text up to the opening of the last assistant turn (`generation_prompt`)."""
        return generation_prompt(self.processor, example, self.system, self.template_kwargs)

    def text_of(self, example: Example) -> ChatText:
        prompt = self.prompt(example)
        answer = answer_text(example.answer, ANSWER_OPEN, ANSWER_CLOSE, self.turn_end)
        return ChatText(prompt, answer, opens_think_block(prompt))
