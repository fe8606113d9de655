"""Packing one (image, question, answer) example into the six-segment dual-path sequence.

Segments (docs/method.md), Qwen chat format:
  A  <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n
  B  <|vision_start|>{corrupted image pads}<|vision_end|>{question}<|im_end|>\\n<|im_start|>assistant\\n
  C  the same with the intact image (|C| = |B|: both images are resized to the same size)
  D  <think>{K latent tokens}</think>
  E  <answer>{answer}</answer><|im_end|>
  F  a copy of E

Targets are row-aligned: targets[r] is the token row r is trained to predict (-100: none),
so each path predicts its own next token although the paths are interleaved:
  row C.end-1 -> D[0]; D and E rows -> the next token of their segment, D's last row -> E[0];
  F rows -> F[j+1] (F[0] would be predicted by D's last row, which already predicts E[0]).
Position ids: path 1 = [A, C, D, E] numbered by the model's own rope-index function as an
ordinary sequence; B takes C's ids and F takes E's ids.
Pixel inputs: per sample the corrupted image then the intact one (their order in the
sequence), as Qwen2-VL patches; `image_is_intact` marks which is which.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from crystal_ext.data.chat import IMAGE_PAD, VISION_END, VISION_START, answer_text, prompt_parts
from crystal_ext.data.corruption import CorruptionConfig, corrupt
from crystal_ext.data.example import Example, SkipExample
from crystal_ext.model.latent_tokens import ANSWER_CLOSE, ANSWER_OPEN, LatentTokens
from crystal_ext.model.parts import unwrap_peft
from crystal_ext.ops.layout import IGNORE, segment_bounds

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def qwen_pixel_values(image: Image.Image, patch: int = 14, merge: int = 2, temporal: int = 2):
    """Patches of an RGB image whose sides are multiples of patch * merge, laid out as
    Qwen2VLImageProcessor does (rescale, CLIP normalisation, the frame repeated `temporal`
    times, merge-window order). Returns (pixel_values [h*w, 3*temporal*patch*patch], grid_thw [3])."""
    width, height = image.size
    if width % (patch * merge) or height % (patch * merge):
        raise ValueError(f"qwen_pixel_values: image size {image.size} is not a multiple of {patch * merge}")
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    x = (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    gh, gw = height // patch, width // patch
    x = x[None].expand(temporal, -1, -1, -1)  # [T, C, H, W]
    x = x.reshape(1, temporal, 3, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(gh * gw, 3 * temporal * patch * patch)
    return x.contiguous(), torch.tensor([1, gh, gw])


def model_rope_index(model):
    """fn(input_ids [1, L], mm_token_type_ids [1, L], image_grid_thw [n, 3]) -> position ids [3, L],
    from the model's own get_rope_index (its signature differs between transformers releases:
    5.x needs mm_token_type_ids, 4.x does not take it)."""
    model = unwrap_peft(model)
    owner = model if hasattr(model, "get_rope_index") else getattr(model, "model", None)
    if owner is None or not hasattr(owner, "get_rope_index"):
        raise ValueError(f"model_rope_index: {type(model).__name__} has no get_rope_index")
    takes_types = "mm_token_type_ids" in inspect.signature(owner.get_rope_index).parameters

    def rope_index(input_ids, mm_token_type_ids, image_grid_thw):
        kwargs = {"image_grid_thw": image_grid_thw}
        if takes_types:
            kwargs["mm_token_type_ids"] = mm_token_type_ids
        with torch.no_grad():
            return owner.get_rope_index(input_ids, **kwargs)[0][:, 0]

    return rope_index


class DualPathPacker:
    """Turns an `Example` into the tensors of one dual-path training sequence."""

    def __init__(
        self,
        tokenizer,
        latent: LatentTokens,
        rope_index,
        corruption: CorruptionConfig = CorruptionConfig(),
        seed: int = 0,
        image_size: int = 448,
        max_length: int = 2048,
        merge: int = 2,
        patch: int = 14,
        system: str = "You are a helpful assistant.",
    ):
        if image_size % (patch * merge):
            raise ValueError(
                f"DualPathPacker: image_size must be a multiple of {patch * merge}, got {image_size}"
            )
        self.tok, self.latent, self.rope_index = tokenizer, latent, rope_index
        self.corruption, self.seed, self.image_size, self.max_length = (
            corruption,
            seed,
            image_size,
            max_length,
        )
        self.merge, self.patch, self.system = merge, patch, system
        self.image_pad = tokenizer.convert_tokens_to_ids(IMAGE_PAD)

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def _load(self, ex: Example) -> Image.Image:
        if ex.image is None:
            raise SkipExample("no image")
        try:
            image = ex.image if isinstance(ex.image, Image.Image) else Image.open(Path(ex.image))
            image = image.convert("RGB")  # forces the decode, so a truncated file fails here
        except (OSError, ValueError) as exc:
            raise SkipExample(f"unreadable image {ex.image!r}: {exc}") from exc
        return image.resize((self.image_size, self.image_size), Image.BICUBIC)

    def pack(self, ex: Example) -> dict:
        if ex.answer is None or not str(ex.answer).strip():
            raise SkipExample("no answer")
        intact = self._load(ex)
        corrupted = corrupt(intact, self.corruption, self.seed, ex.key)
        pv_c, grid = qwen_pixel_values(corrupted, self.patch, self.merge)
        pv_i, _ = qwen_pixel_values(intact, self.patch, self.merge)
        n_img = int(grid.prod()) // self.merge**2
        lt = self.latent
        before, after = prompt_parts(self.system, ex.question)
        seg_a = self._ids(before)
        prompt = self._ids(VISION_START) + [self.image_pad] * n_img + self._ids(VISION_END) + self._ids(after)
        seg_d = [lt.think_open, *lt.latent_ids, lt.think_close]
        seg_e = self._ids(answer_text(ex.answer, ANSWER_OPEN, ANSWER_CLOSE))
        segments = [seg_a, prompt, prompt, seg_d, seg_e, seg_e]
        length = sum(map(len, segments))
        if length > self.max_length:
            raise SkipExample(
                f"packed length {length} (answer of {len(seg_e)} tokens) exceeds max_length {self.max_length}"
            )
        bounds = segment_bounds(map(len, segments))
        (_, a1), (b0, b1), (c0, c1), (d0, d1), (e0, e1), (f0, f1) = bounds
        input_ids = torch.tensor([t for seg in segments for t in seg])
        mm_types = (input_ids == self.image_pad).long()

        targets = torch.full_like(input_ids, IGNORE)
        targets[c1 - 1 : e1 - 1] = input_ids[c1:e1]  # D and E, predicted along path 1
        targets[f0 : f1 - 1] = input_ids[f0 + 1 : f1]  # F[1:], predicted by F rows

        path1 = torch.cat([torch.arange(0, a1), torch.arange(c0, e1)])
        pos1 = self.rope_index(input_ids[path1][None], mm_types[path1][None], grid[None])
        position_ids = torch.zeros(3, length, dtype=torch.long)
        position_ids[:, path1] = pos1
        position_ids[:, b0:b1] = position_ids[:, c0:c1]
        position_ids[:, f0:f1] = position_ids[:, e0:e1]
        return {
            "key": ex.key,
            "input_ids": input_ids,
            "targets": targets,
            "position_ids": position_ids,
            "mm_token_type_ids": mm_types,
            "layout": torch.tensor(bounds, dtype=torch.long),
            "pixel_values": torch.cat([pv_c, pv_i]),
            "image_grid_thw": torch.stack([grid, grid]),
            "image_is_intact": torch.tensor([False, True]),
        }


class DualPathCollator:
    """Packs and pads a list of `Example`s into one batch; bad examples are skipped.

    A skipped example is reported with a warning naming its key and the reason;
    `self.skipped` counts them over the collator's life and each batch carries `skipped`
    (this batch's count). Returns None when every example of the list was skipped.
    """

    def __init__(self, packer: DualPathPacker, pad_token_id: int):
        self.packer, self.pad_token_id, self.skipped = packer, pad_token_id, 0

    def __call__(self, examples: list[Example]) -> dict | None:
        packed, skipped = [], 0
        for ex in examples:
            try:
                packed.append(self.packer.pack(ex))
            except SkipExample as exc:
                skipped += 1
                warnings.warn(
                    f"crystal_ext: skipping example {getattr(ex, 'key', ex)!r}: {exc}", stacklevel=2
                )
        self.skipped += skipped
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

        return {
            "keys": [p["key"] for p in packed],
            "input_ids": pad("input_ids", self.pad_token_id),
            "targets": pad("targets", IGNORE),
            "attention_mask": torch.stack(
                [(torch.arange(length) < p["input_ids"].numel()).long() for p in packed]
            ),
            "position_ids": pad("position_ids", 0).permute(1, 0, 2).contiguous(),  # [3, B, L]
            "mm_token_type_ids": pad("mm_token_type_ids", 0),
            "layout": torch.stack([p["layout"] for p in packed]),
            "pixel_values": torch.cat([p["pixel_values"] for p in packed]),
            "image_grid_thw": torch.cat([p["image_grid_thw"] for p in packed]),
            "image_is_intact": torch.cat([p["image_is_intact"] for p in packed]),
            "skipped": skipped,
        }
