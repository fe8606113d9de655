"""What the latents carry: the corrupted path answering from the intact path's latent block.

At inference only path 1 runs, so intact-image accuracy cannot tell whether the latent block
carries the image's detail: the answer rows also see the intact image directly. Path 2 can: its
answer rows F see the prefix A, the corrupted image and prompt B, and path 1's latent block D,
never the intact image. So, per held-out example:

- **latent-carried accuracy**: the F rows answer greedily, one token at a time, through the
  dual-path attention (each step a dual-path forward of the packed sequence whose F holds the
  answer decoded so far; E mirrors F and is not read by F). A model whose latents carry nothing
  can only answer from the corrupted image; on a task whose answer the corruption removes it
  scores at chance.
- **held-out attention KL**: the attention-alignment loss (the answer rows' attention over the
  latent block, intact path vs corrupted path, at the run's --alignment_layer) with the gold
  answer teacher-forced.

The think block is the one the packer writes (`<think>`, the K latent tokens, `</think>`, or its
continuation after a generation prompt that opened it): what the model is trained to write.

An answer the packer cannot use (a partial answer that decodes to whitespace has "no answer")
ends that example's decoding with the answer None; the other examples of the batch go on.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from crystal_ext.data.example import Example, SkipExample
from crystal_ext.data.packing import DualPathCollator, DualPathPacker
from crystal_ext.model.attention_registration import ATTN_IMPLEMENTATION, register_dual_path_attention
from crystal_ext.model.families import family_of
from crystal_ext.model.objective import dual_path_hidden
from crystal_ext.model.parts import backbone_and_head, text_config
from crystal_ext.ops.layout import segments_of


class DualPathAttentionOn:
    """Switches the text layers to the dual-path attention for the duration of a block."""

    def __init__(self, model):
        self.base = backbone_and_head(model)[0]

    def __enter__(self):
        register_dual_path_attention()
        self.previous = text_config(self.base)._attn_implementation
        self.base.set_attn_implementation(ATTN_IMPLEMENTATION)
        return self

    def __exit__(self, *exc):
        self.base.set_attn_implementation(self.previous)


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def dual_path_forward(model, batch: dict, alignment_layer: str = "last") -> tuple[torch.Tensor, torch.Tensor]:
    """(last hidden states, attention-alignment loss at `alignment_layer`) of a collated dual-path
    batch, without gradients; the model's text layers must run the dual-path attention."""
    return dual_path_hidden(backbone_and_head(model)[1], batch, alignment_layer=alignment_layer)


def next_token_rows(batch: dict, answer_close: int, decoded: list[list[int]]) -> list[int]:
    """Per sample, the F row whose logits predict the next answer token: F's first row (the
    answer-open marker) when nothing is decoded yet, else the row of the last decoded token (the
    one right before the answer-close marker)."""
    rows = []
    for b, seg in enumerate(segments_of(batch["layout"])):
        if not decoded[b]:
            rows.append(seg.f[0])
            continue
        f_tokens = batch["input_ids"][b, seg.f[0] : seg.f[1]].tolist()
        rows.append(seg.f[0] + f_tokens.index(answer_close) - 1)
    return rows


@torch.no_grad()
def latent_carried_answers(
    model,
    packer,
    examples: list[Example],
    tokenizer,
    max_answer_tokens: int = 32,
    alignment_layer: str = "last",
) -> list[str | None]:
    """The corrupted path's greedy answer for each example, normalised like the intact-path
    evaluation (decoded, stripped, lower case); None for an example the packer could not pack at
    some step (its answer so far unusable), which leaves the other examples' decoding as it is."""
    latent = packer.latent
    # An image or video placeholder ends the answer too: it is no text, and packed back into the
    # answer it would ask the model for an image that is not there.
    stop = {latent.answer_close, tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    stop |= packer.media_tokens
    device = next(model.parameters()).device
    collate = DualPathCollator(packer, tokenizer.pad_token_id)
    decoded: list[list[int]] = [[] for _ in examples]
    done = [False] * len(examples)
    unpacked = [False] * len(examples)
    was_training = model.training
    model.eval()
    try:
        with DualPathAttentionOn(model):
            for _ in range(max_answer_tokens):
                live, packed = _pack_live(packer, examples, decoded, done, unpacked, tokenizer)
                if not live:
                    break
                batch = _to(collate.batch_of(packed), device)
                hidden, _ = dual_path_forward(model, batch, alignment_layer)
                rows = next_token_rows(batch, latent.answer_close, [decoded[i] for i in live])
                base, _, head = backbone_and_head(model)
                picked = hidden[torch.arange(len(live), device=device), torch.tensor(rows, device=device)]
                # The model's own logits, as its forward (and so generate) computes them.
                logits = family_of(base).logit_transform(base.config).apply(head(picked))
                tokens = logits.argmax(-1).tolist()
                for i, token in zip(live, tokens):
                    if token in stop:
                        done[i] = True
                    else:
                        decoded[i].append(token)
    finally:
        model.train(was_training)
    return [
        None if bad else tokenizer.decode(ids, skip_special_tokens=False).strip().lower()
        for ids, bad in zip(decoded, unpacked)
    ]


def _pack_live(
    packer: DualPathPacker,
    examples: list[Example],
    decoded,
    done: list[bool],
    unpacked: list[bool],
    tokenizer,
) -> tuple[list[int], list[dict]]:
    """(indices, packed sequences) of the examples still decoding, each packed with the answer
    decoded so far; an example the packer refuses is marked done and unpacked, alone."""
    live, packed = [], []
    for i, example in enumerate(examples):
        if done[i]:
            continue
        # With nothing decoded yet any answer does, since only F's first row (before it) is read.
        answer = tokenizer.decode(decoded[i], skip_special_tokens=False) or str(example.answer)
        try:
            packed.append(packer.pack(replace(example, answer=answer)))
        except SkipExample:
            done[i] = unpacked[i] = True
            continue
        live.append(i)
    return live, packed


@torch.no_grad()
def held_out_attention_kl(
    model, packer, examples: list[Example], tokenizer, alignment_layer: str = "last"
) -> float:
    """Mean attention-alignment loss (KL_attn, at `alignment_layer`) over `examples`, gold answers
    teacher-forced."""
    collate = DualPathCollator(packer, tokenizer.pad_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with DualPathAttentionOn(model):
            for example in examples:
                batch = collate([example])
                if batch is None:
                    continue
                _, kl_attn = dual_path_forward(model, _to(batch, device), alignment_layer)
                total += float(kl_attn)
                count += 1
    finally:
        model.train(was_training)
    return total / count if count else float("nan")
