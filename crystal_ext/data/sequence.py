"""An example's text and images as the six-segment dual-path sequence, through the model's own
processor.

Segments (docs/method.md):
  A  the chat text before the first image (system message, the start of the user turn)
  B  every corrupted image of the sample, and all the text that follows up to and including the
     opening of the last assistant turn (earlier turns of a multi-turn record included)
  C  the same with the intact images (|C| = |B|: a corruption keeps the image size)
  D  the latent block <think>{K latent tokens}</think>; when the chat template's generation prompt
     already opens a think block (Qwen3-VL-Thinking's "<think>\n"), that opening stays in the
     prompt (B, C) and D continues it: {K latent tokens}</think>
  E  <answer>{answer}</answer>{the chat template's end of turn}
  F  a copy of E

The image tokens, their number and the pixel inputs come from the processor itself; what differs
between model families (position ids, how image inputs are passed) from crystal_ext.model.families.

Targets are row-aligned: targets[r] is the token row r is trained to predict (-100: none),
so each path predicts its own next token although the paths are interleaved:
  row C.end-1 -> D[0]; D and E rows -> the next token of their segment, D's last row -> E[0];
  F rows -> F[j+1] (F[0] would be predicted by D's last row, which already predicts E[0]).
Position ids: path 1 = [A, C, D, E] numbered by the family (the model's own M-RoPE index for
Qwen-VL models, 0, 1, 2, ... elsewhere) as an ordinary sequence; B takes C's ids, F takes E's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crystal_ext.data.chat import ChatText
from crystal_ext.data.example import SkipExample
from crystal_ext.data.images import ImagePair
from crystal_ext.model.latent_tokens import LatentTokens
from crystal_ext.ops.layout import IGNORE, segment_bounds


@dataclass
class SegmentTokens:
    """The token ids of the segments A..F, and the processor's outputs on the intact and on the
    corrupted images (their image inputs)."""

    segments: list[list[int]]
    intact: dict
    corrupted: dict


def latent_block(latent: LatentTokens, continues_think_block: bool) -> list[int]:
    """Segment D: the think block, or its continuation when the prompt already opened it."""
    opening = [] if continues_think_block else [latent.think_open]
    return [*opening, *latent.latent_ids, latent.think_close]


def segment_tokens(
    processor, text: ChatText, images: ImagePair, latent: LatentTokens, media_tokens: set, image_open: str
) -> SegmentTokens:
    """The six segments' ids of one example: the prompt with either image set through the
    processor, the latent block, the answer; SkipExample when they cannot be packed as one
    sequence. `media_tokens`: the model's image and video placeholder ids; `image_open`: the text
    a prompt's first image starts with."""
    tok = getattr(processor, "tokenizer", processor)
    prompt = text.prompt
    if image_open not in prompt:
        raise SkipExample(f"the chat template wrote no image ({image_open!r})")
    intact, corrupted = (
        processor(text=[prompt], images=[imgs], return_tensors="pt", add_special_tokens=False)
        for imgs in (images.intact, images.corrupted)
    )
    ids = intact["input_ids"][0]
    if not torch.equal(ids, corrupted["input_ids"][0]):
        raise SkipExample("the corrupted images give a different number of image tokens")
    seg_a = tok(prompt[: prompt.index(image_open)], add_special_tokens=False).input_ids
    if ids[: len(seg_a)].tolist() != seg_a:
        raise SkipExample("the text before the first image does not tokenise on its own")
    prompt_ids = ids[len(seg_a) :].tolist()
    seg_e = tok(text.answer, add_special_tokens=False).input_ids
    if media_tokens.intersection(seg_e):
        raise SkipExample("the answer holds an image or video placeholder token")
    seg_d = latent_block(latent, text.continues_think_block)
    return SegmentTokens([seg_a, prompt_ids, prompt_ids, seg_d, seg_e, seg_e], intact, corrupted)


def sequence_tensors(key: str, tokens: SegmentTokens, family, positions, max_length: int) -> dict:
    """One packed sequence (DualPathPacker.pack's result) from its segments' tokens; `family`:
    the model's family (its image inputs), `positions`: its position-id function of path 1;
    SkipExample when the sequence is longer than `max_length`."""
    segments = tokens.segments
    length = sum(map(len, segments))
    if length > max_length:
        raise SkipExample(
            f"packed length {length} (answer of {len(segments[4])} tokens) exceeds max_length {max_length}"
        )
    bounds = segment_bounds(map(len, segments))
    (_, a1), (b0, b1), (c0, c1), (d0, d1), (e0, e1), (f0, f1) = bounds
    input_ids = torch.tensor([t for seg in segments for t in seg])

    targets = torch.full_like(input_ids, IGNORE)
    targets[c1 - 1 : e1 - 1] = input_ids[c1:e1]  # D and E, predicted along path 1
    targets[f0 : f1 - 1] = input_ids[f0 + 1 : f1]  # F[1:], predicted by F rows

    intact_inputs = family.image_inputs(tokens.intact)
    path1 = torch.cat([torch.arange(0, a1), torch.arange(c0, e1)])
    pos1 = positions(input_ids[path1], intact_inputs)
    position_ids = torch.zeros(pos1.shape[0], length, dtype=torch.long)
    position_ids[:, path1] = pos1
    position_ids[:, b0:b1] = position_ids[:, c0:c1]
    position_ids[:, f0:f1] = position_ids[:, e0:e1]
    return {
        "key": key,
        "input_ids": input_ids,
        "targets": targets,
        "position_ids": position_ids,
        "layout": torch.tensor(bounds, dtype=torch.long),
        # In sequence order: the corrupted images (B) come before the intact ones (C).
        "image_groups": [family.image_inputs(tokens.corrupted), intact_inputs],
    }
