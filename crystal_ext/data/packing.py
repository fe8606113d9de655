"""Packing one example into the six-segment dual-path sequence (crystal_ext.data.sequence), and
padding packed examples into a batch.

`DualPathPacker.pack` is a line of four steps, each named by what it returns: the example's intact
and corrupted images (crystal_ext.data.images); its prompt and answer text through the processor's
chat template (crystal_ext.data.chat: nothing is injected, so path 1 is the processor's own
`apply_chat_template(messages, add_generation_prompt=True)` followed by the trained block); the six
segments' token ids through the processor; the sequence's tensors: ids, targets, position ids,
layout, image inputs (crystal_ext.data.sequence).
"""

from __future__ import annotations

import warnings

import torch

from crystal_ext.data.chat import ChatFormat
from crystal_ext.data.corruption import CorruptionConfig
from crystal_ext.data.example import Example, SkipExample
from crystal_ext.data.images import ExampleImages
from crystal_ext.data.sequence import segment_tokens, sequence_tensors
from crystal_ext.model.families import family_of
from crystal_ext.model.latent_tokens import LatentTokens
from crystal_ext.model.parts import unwrap_distributed, unwrap_peft
from crystal_ext.ops.layout import IGNORE


class DualPathPacker:
    """Turns an `Example` into the tensors of one dual-path training sequence.

    processor: the model's processor (with a chat template); model: the model (its family and,
    for M-RoPE models, its rope-index function); image_size: resize every image to this square
    side first (None: the processor's own sizing); system: the system turn of records that have
    none (None: whatever the chat template writes by itself); template_kwargs: the chat template's
    variables (e.g. {"enable_thinking": False}), the same ones the model is to be served with.

    `images` (crystal_ext.data.images.ExampleImages) opens and corrupts an example's images, `chat`
    (crystal_ext.data.chat.ChatFormat) writes its text; both serve other readers of the run's
    examples (the run-time check, the pictures) as the packer uses them."""

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
        if getattr(processor, "image_token", None) is None:
            raise ValueError(f"DualPathPacker: {type(processor).__name__} has no image_token")
        self.image_open = self.family.image_open(processor)
        self.max_length = max_length
        self.images = ExampleImages(image_size, corruption, seed)
        self.chat = ChatFormat(processor, system, template_kwargs)

    def pack(self, ex: Example) -> dict:
        """The example's packed sequence (crystal_ext.data.sequence.sequence_tensors); SkipExample
        (saying why) when it cannot be trained on."""
        if ex.answer is None or not str(ex.answer).strip():
            raise SkipExample("no answer")
        images = self.images.intact_and_corrupted(ex)
        text = self.chat.text_of(ex)
        tokens = segment_tokens(self.processor, text, images, self.latent, self.media_tokens, self.image_open)
        return sequence_tensors(ex.key, tokens, self.family, self.positions, self.max_length)


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
