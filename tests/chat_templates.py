"""Chat templates written for the tests, each reproducing one behaviour of the templates that real
checkpoints ship (facts, not their text), in the tiny tokenizers' words (tests/family_models.py):

- Qwen2-VL / Qwen2.5-VL: a default system turn when the conversation has none;
- Qwen3-VL, LLaVA-OneVision, SmolVLM2, Idefics3: no system turn of their own
  (family_models.QWEN_TEMPLATE, LLAVA_OV_TEMPLATE, IDEFICS3_TEMPLATE); nor do the LLaVA, InternVL,
  Mistral3 and GLM-4V templates of family_models;
- Qwen3-VL-Thinking: the generation prompt opens a think block, "<think>\\n";
- a hybrid thinking template: with enable_thinking=False the generation prompt writes an empty,
  closed think block, "<think>\\n\\n</think>\\n\\n"; otherwise nothing.
"""

from __future__ import annotations

from family_models import (
    GLM4V_TEMPLATE,
    IDEFICS3_TEMPLATE,
    INTERNVL_TEMPLATE,
    LLAVA_OV_TEMPLATE,
    LLAVA_TEMPLATE,
    MISTRAL3_TEMPLATE,
    QWEN_TEMPLATE,
)

DEFAULT_SYSTEM = "you are a helpful assistant"

_CHATML_TURNS = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ p['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
)

QWEN2_VL_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\n"
    + DEFAULT_SYSTEM
    + "<|im_end|>\n{% endif %}"
    + _CHATML_TURNS
    + "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN3_VL_THINKING_TEMPLATE = (
    _CHATML_TURNS + "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)
HYBRID_THINKING_TEMPLATE = (
    _CHATML_TURNS + "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)

# The template each tested family's checkpoints behave like, and the text it ends an assistant turn with.
FAMILY_TEMPLATES = {
    "qwen2_vl": QWEN2_VL_TEMPLATE,
    "qwen2_5_vl": QWEN2_VL_TEMPLATE,
    "qwen3_vl": QWEN_TEMPLATE,
    "qwen3_vl_moe": QWEN_TEMPLATE,
    "llava_onevision": LLAVA_OV_TEMPLATE,
    "idefics3": IDEFICS3_TEMPLATE,
    "smolvlm": IDEFICS3_TEMPLATE,
    "llava": LLAVA_TEMPLATE,
    "llava_next": LLAVA_TEMPLATE,
    "internvl": INTERNVL_TEMPLATE,
    "mistral3": MISTRAL3_TEMPLATE,
    "glm4v": GLM4V_TEMPLATE,
}
TURN_END = {
    "idefics3": "<end_of_utterance>",
    "smolvlm": "<end_of_utterance>",
    "mistral3": "</s>",
    "glm4v": "",
}


def turn_end_of(family: str) -> str:
    return TURN_END.get(family, "<|im_end|>")


def use_template(processor, template: str) -> None:
    """Make `template` the processor's (and its tokenizer's) chat template."""
    processor.chat_template = template
    processor.tokenizer.chat_template = template
