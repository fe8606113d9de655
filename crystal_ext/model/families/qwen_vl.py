"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE.

Positions: path 1 is numbered by the model's own M-RoPE index function (`get_rope_index`,
crystal_ext.model.families.own_positions). Images: `pixel_values` (patches of all images,
concatenated) and `image_grid_thw`. Trained in full: the vision-language merger (and Qwen3-VL's
DeepStack mergers)."""

from __future__ import annotations

import torch

from crystal_ext.model.families.own_positions import OwnPositionsFamily, model_rope_index

QWEN_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")


class QwenVLFamily(OwnPositionsFamily):
    language = ("language_model",)
    vision = ("visual",)
    projector = ("merger", "deepstack_merger_list")

    def lora_targets(self, model):
        """The text decoder's linear layers and the vision tower's blocks (not the mergers)."""
        language, vision, _ = self.parts(model)
        inside = {id(m) for m in language.modules()} | {id(m) for m in vision.blocks.modules()}
        return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and id(m) in inside]

    def image_open(self, processor):
        return getattr(processor, "vision_start_token", None) or "<|vision_start|>"


__all__ = ["QWEN_MODEL_TYPES", "QwenVLFamily", "model_rope_index"]
