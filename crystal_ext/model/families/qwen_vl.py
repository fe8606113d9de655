"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE.

Positions: path 1 is numbered by the model's own M-RoPE index function (`get_rope_index`: 3
rows, temporal / height / width), as the stock model numbers an ordinary sequence. Images:
`pixel_values` (patches of all images, concatenated) and `image_grid_thw`. Trained in full: the
vision-language merger (and Qwen3-VL's DeepStack mergers)."""

from __future__ import annotations

import inspect

import torch

from crystal_ext.model.families.base import Family

QWEN_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")


def model_rope_index(model):
    """fn(input_ids [1, L], mm_token_type_ids [1, L], image_grid_thw [n, 3]) -> position ids [3, L],
    from the model's own get_rope_index (5.x takes mm_token_type_ids, 4.x does not)."""
    from crystal_ext.model.parts import unwrap_distributed, unwrap_peft

    model = unwrap_peft(unwrap_distributed(model))
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


class QwenVLFamily(Family):
    language = ("language_model",)
    vision = ("visual",)
    projector = ("merger", "deepstack_merger_list")
    position_rows = 3

    def position_ids_fn(self, model):
        rope_index = model_rope_index(model)
        image_token = int(model.config.image_token_id)

        def positions(input_ids, image_inputs):
            ids = input_ids[None]
            return rope_index(ids, (ids == image_token).long(), image_inputs["image_grid_thw"])

        return positions

    def lora_targets(self, model):
        """The text decoder's linear layers and the vision tower's blocks (not the mergers)."""
        language, vision, _ = self.parts(model)
        inside = {id(m) for m in language.modules()} | {id(m) for m in vision.blocks.modules()}
        return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and id(m) in inside]

    def image_open(self, processor):
        return getattr(processor, "vision_start_token", None) or "<|vision_start|>"

    def image_inputs(self, processed):
        return {"pixel_values": processed["pixel_values"], "image_grid_thw": processed["image_grid_thw"]}

    def image_grid(self, config, group, n_tokens):
        _, h, w = group["image_grid_thw"][0].tolist()
        merge = config.vision_config.spatial_merge_size
        return h // merge, w // merge
