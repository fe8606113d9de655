"""Packing one example into the six-segment dual-path sequence, through the model's own processor.

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

Path 1 is therefore the processor's own `apply_chat_template(messages, add_generation_prompt=True)`
followed by the trained block (D, E): nothing is injected into the prompt (crystal_ext.data.chat).
The prompt text comes from the processor's chat template (crystal_ext.data.chat), the image
tokens, their number and the pixel inputs from the processor itself; what differs between model
families (position ids, how image inputs are passed) comes from crystal_ext.model.families.

Targets are row-aligned: targets[r] is the token row r is trained to predict (-100: none),
so each path predicts its own next token although the paths are interleaved:
  row C.end-1 -> D[0]; D and E rows -> the next token of their segment, D's last row -> E[0];
  F rows -> F[j+1] (F[0] would be predicted by D's last row, which already predicts E[0]).
Position ids: path 1 = [A, C, D, E] numbered by the family (the model's own M-RoPE index for
Qwen-VL models, 0, 1, 2, ... elsewhere) as an ordinary sequence; B takes C's ids, F takes E's.
"""

from __future__ import annotations

import warnings

import torch
from PIL import Image

from crystal_ext.data.chat import answer_text, generation_prompt, opens_think_block, turn_end
from crystal_ext.data.corruption import CorruptionConfig, corrupt
from crystal_ext.data.example import Example, SkipExample
from crystal_ext.data.images import open_image
from crystal_ext.model.families import family_of
from crystal_ext.model.latent_tokens import ANSWER_CLOSE, ANSWER_OPEN, LatentTokens
from crystal_ext.model.parts import unwrap_distributed, unwrap_peft
from crystal_ext.ops.layout import IGNORE, segment_bounds


def corruption_key(key: str, index: int, count: int) -> str:
    """The seed key of image `index` of an example with `count` images."""
    return key if count == 1 else f"{key}#{index}"


class DualPathPacker:
    """Turns an `Example` into the tensors of one dual-path training sequence.

    processor: the model's processor (with a chat template); model: the model (its family and,
    for M-RoPE models, its rope-index function); image_size: resize every image to this square
    side first (None: the processor's own sizing); system: the system turn of records that have
    none (None: whatever the chat template writes by itself); template_kwargs: the chat template's
    variables (e.g. {"enable_thinking": False}), the same ones the model is to be served with."""

    def __init__(
        self,
        processor,
        latent: LatentTokens,
        model,
        corruption: CorruptionConfig = CorruptionConfig(),
        seed: int = 0,
        image_size: int | None = None,
        max_length: int = 2048,
        system: str | None = None,
        template_kwargs: dict | None = None,
    ):
        if image_size is not None and image_size <= 0:
            raise ValueError(f"DualPathPacker: image_size must be positive or None, got {image_size}")
        self.processor, self.tok = processor, getattr(processor, "tokenizer", processor)
        self.latent, self.family = latent, family_of(model)
        self.positions = self.family.position_ids_fn(model)
        self.media_tokens = self.family.media_token_ids(unwrap_peft(unwrap_distributed(model)).config)
        self.corruption, self.seed, self.image_size = corruption, seed, image_size
        self.max_length, self.system = max_length, system
        self.template_kwargs = dict(template_kwargs or {})
        if getattr(processor, "image_token", None) is None:
            raise ValueError(f"DualPathPacker: {type(processor).__name__} has no image_token")
        self.image_open = self.family.image_open(processor)
        self.turn_end = turn_end(processor, self.template_kwargs)

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def load_images(self, ex: Example) -> list[Image.Image]:
        if not ex.images:
            raise SkipExample("no image")
        images = []
        for source in ex.images:
            image = open_image(source)
            if self.image_size is not None:
                image = image.resize((self.image_size, self.image_size), Image.BICUBIC)
            images.append(image)
        return images

    def _load(self, ex: Example) -> Image.Image:
        """The first image, as packed (the pictures draw it)."""
        return self.load_images(ex)[0]

    def corrupted(self, ex: Example, images: list[Image.Image]) -> list[Image.Image]:
        n = len(images)
        return [
            corrupt(im, self.corruption, self.seed, corruption_key(ex.key, i, n))
            for i, im in enumerate(images)
        ]

    def _process(self, text: str, images: list[Image.Image]) -> dict:
        return self.processor(text=[text], images=[images], return_tensors="pt", add_special_tokens=False)

    def prompt(self, ex: Example) -> str:
        """The chat text up to the opening of the last assistant turn, with image placeholders:
        the chat template's generation prompt (crystal_ext.data.chat.generation_prompt)."""
        return generation_prompt(self.processor, ex, self.system, self.template_kwargs)

    def latent_block(self, prompt: str) -> list[int]:
        """Segment D: the think block, or its continuation when the prompt already opened it."""
        lt = self.latent
        opening = [] if opens_think_block(prompt) else [lt.think_open]
        return [*opening, *lt.latent_ids, lt.think_close]

    def pack(self, ex: Example) -> dict:
        if ex.answer is None or not str(ex.answer).strip():
            raise SkipExample("no answer")
        intact = self.load_images(ex)
        corrupted = self.corrupted(ex, intact)
        prompt = self.prompt(ex)
        if self.image_open not in prompt:
            raise SkipExample(f"the chat template wrote no image ({self.image_open!r})")
        kept, bad = self._process(prompt, intact), self._process(prompt, corrupted)
        ids = kept["input_ids"][0]
        if not torch.equal(ids, bad["input_ids"][0]):
            raise SkipExample("the corrupted images give a different number of image tokens")
        before = self._ids(prompt[: prompt.index(self.image_open)])
        if ids[: len(before)].tolist() != before:
            raise SkipExample("the text before the first image does not tokenise on its own")
        seg_a, prompt_ids = before, ids[len(before) :].tolist()
        seg_d = self.latent_block(prompt)
        seg_e = self._ids(answer_text(ex.answer, ANSWER_OPEN, ANSWER_CLOSE, self.turn_end))
        if self.media_tokens.intersection(seg_e):
            raise SkipExample("the answer holds an image or video placeholder token")
        segments = [seg_a, prompt_ids, prompt_ids, seg_d, seg_e, seg_e]
        length = sum(map(len, segments))
        if length > self.max_length:
            raise SkipExample(
                f"packed length {length} (answer of {len(seg_e)} tokens) exceeds max_length {self.max_length}"
            )
        bounds = segment_bounds(map(len, segments))
        (_, a1), (b0, b1), (c0, c1), (d0, d1), (e0, e1), (f0, f1) = bounds
        input_ids = torch.tensor([t for seg in segments for t in seg])

        targets = torch.full_like(input_ids, IGNORE)
        targets[c1 - 1 : e1 - 1] = input_ids[c1:e1]  # D and E, predicted along path 1
        targets[f0 : f1 - 1] = input_ids[f0 + 1 : f1]  # F[1:], predicted by F rows

        intact_inputs = self.family.image_inputs(kept)
        path1 = torch.cat([torch.arange(0, a1), torch.arange(c0, e1)])
        pos1 = self.positions(input_ids[path1], intact_inputs)
        position_ids = torch.zeros(pos1.shape[0], length, dtype=torch.long)
        position_ids[:, path1] = pos1
        position_ids[:, b0:b1] = position_ids[:, c0:c1]
        position_ids[:, f0:f1] = position_ids[:, e0:e1]
        return {
            "key": ex.key,
            "input_ids": input_ids,
            "targets": targets,
            "position_ids": position_ids,
            "layout": torch.tensor(bounds, dtype=torch.long),
            # In sequence order: the corrupted images (B) come before the intact ones (C).
            "image_groups": [self.family.image_inputs(bad), intact_inputs],
        }


class DualPathCollator:
    """Packs and pads a list of `Example`s into one batch; bad examples are skipped.

    A skipped example is reported with a warning naming its key and the reason, once per
    example over the collator's life; `self.skipped` counts skips and each batch carries
    `skipped` (this batch's count). Returns None when every example of the list was skipped.

    Batch keys: input_ids, targets, attention_mask, position_ids ([rows, batch, length] for M-RoPE
    models, [batch, length] otherwise), layout, images (the model's image keyword arguments,
    corrupted and intact images in sequence order), intact_images (the intact images alone, for
    the single path), keys, skipped.
    """

    def __init__(self, packer: DualPathPacker, pad_token_id: int):
        self.packer, self.pad_token_id, self.skipped = packer, pad_token_id, 0
        self.warned: set = set()

    def __call__(self, examples: list[Example]) -> dict | None:
        packed, skipped = [], 0
        for ex in examples:
            try:
                packed.append(self.packer.pack(ex))
            except SkipExample as exc:
                skipped += 1
                key = getattr(ex, "key", ex)
                if key not in self.warned:
                    self.warned.add(key)
                    where = f" ({ex.where})" if getattr(ex, "where", None) else ""
                    warnings.warn(f"crystal_ext: skipping example {key!r}{where}: {exc}", stacklevel=2)
        self.skipped += skipped
        return self.batch_of(packed, skipped)

    def batch_of(self, packed: list[dict], skipped: int = 0) -> dict | None:
        """One padded batch of `DualPathPacker.pack` results (None for none)."""
        if not packed:
            return None
        length = max(p["input_ids"].numel() for p in packed)

        def pad(name, value):
            return torch.stack(
                [
                    torch.nn.functional.pad(p[name], (0, length - p[name].shape[-1]), value=value)
                    for p in packed
                ]
            )

        positions = pad("position_ids", 0).permute(1, 0, 2).contiguous()  # [rows, batch, length]
        family = self.packer.family
        return {
            "keys": [p["key"] for p in packed],
            "input_ids": pad("input_ids", self.pad_token_id),
            "targets": pad("targets", IGNORE),
            "attention_mask": torch.stack(
                [(torch.arange(length) < p["input_ids"].numel()).long() for p in packed]
            ),
            "position_ids": positions if family.position_rows > 1 else positions[0],
            "layout": torch.stack([p["layout"] for p in packed]),
            "images": family.collate_images([g for p in packed for g in p["image_groups"]]),
            "intact_images": family.collate_images([p["image_groups"][1] for p in packed]),
            "skipped": skipped,
        }
