"""Greedy answers on the intact path, the way CrystaL is used at inference: the stock model, its
own attention, the prompt training packs (crystal_ext.data.chat.generation_prompt)."""

from __future__ import annotations

import torch

from crystal_ext.data.chat import generation_prompt
from crystal_ext.data.example import Example
from crystal_ext.training.answers import end_of_turn_id


@torch.no_grad()
def generate_answers(
    model,
    processor,
    images,
    questions,
    system: str | None,
    max_new_tokens: int,
    examples=None,
    template_kwargs: dict | None = None,
) -> list[list[int]]:
    """Greedy answers; `images[i]` is one image or the list of an example's images; the prompt is
    training's (crystal_ext.data.chat.generation_prompt) over `examples[i]`'s turns (default: one
    image, `questions[i]`)."""
    tok = processor.tokenizer
    if examples is None:
        examples = [Example(str(i), im, q, None) for i, (im, q) in enumerate(zip(images, questions))]
    side = tok.padding_side
    tok.padding_side = "left"  # batched greedy decoding continues every row at its real end
    try:
        inputs = processor(
            text=[generation_prompt(processor, e, system, template_kwargs) for e in examples],
            images=[im if isinstance(im, list) else [im] for im in images],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        )
    finally:
        tok.padding_side = side
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    out = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=tok.pad_token_id,
        eos_token_id=end_of_turn_id(processor),
    )
    return out[:, inputs["input_ids"].shape[1] :].tolist()
