"""Models that number their positions themselves (multimodal RoPE, 3 rows: temporal, height,
width), through a position function of their own (`get_rope_index`): Qwen2/2.5/3-VL, GLM-4V and
others. Their path 1 is numbered by that very function, as the stock model numbers an ordinary
sequence; B then copies C's ids and F copies E's (crystal_ext.data.packing).

`own_position_function(config or model)` says whether a model has such a function, from its
classes and its rope parameters (not from a list of names), so that an adapter-less model of
that kind is refused instead of trained on 0, 1, 2, ... (crystal_ext.model.families.family_of).
"""

from __future__ import annotations

import inspect
import sys

import torch

from crystal_ext.model.families.base import Family
from crystal_ext.model.parts import text_config_of

POSITION_FUNCTIONS = ("get_rope_index",)
# rope_parameters keys that only multimodal (several-row) RoPE reads.
MULTIMODAL_ROPE_KEYS = ("mrope_section", "mrope_interleaved")


def model_class_of(config):
    """The transformers class a config builds (its `architectures`, else the image-text-to-text
    auto mapping), or None; importing it loads no weights."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    names = list(getattr(config, "architectures", None) or ())
    names.append(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(getattr(config, "model_type", None)))
    for name in filter(None, names):
        cls = getattr(transformers, name, None)
        if isinstance(cls, type):
            return cls
    return None


def _classes_of(model_or_config) -> list[type]:
    """The classes whose methods say how the model numbers positions: the model's own class and
    its backbone's, or, for a config, every class of the modelling module its model class lives in
    (the backbone's class among them)."""
    if hasattr(model_or_config, "config"):
        backbone = getattr(model_or_config, getattr(model_or_config, "base_model_prefix", ""), None)
        return [type(model_or_config)] + ([type(backbone)] if backbone is not None else [])
    cls = model_class_of(model_or_config)
    if cls is None:
        return []
    module = sys.modules.get(cls.__module__)
    return [cls] + [
        c for _, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == cls.__module__
    ]


def own_position_function(model_or_config) -> str | None:
    """What makes the model number its own positions (a class's method, or a multimodal rope
    parameter), or None when it takes the plain 0, 1, 2, ... numbering."""
    from crystal_ext.model.parts import unwrap_distributed, unwrap_peft

    if hasattr(model_or_config, "config"):
        model_or_config = unwrap_peft(unwrap_distributed(model_or_config))
        config = model_or_config.config
    else:
        config = model_or_config
    for cls in _classes_of(model_or_config):
        for name in POSITION_FUNCTIONS:
            if callable(getattr(cls, name, None)):
                return f"{cls.__name__}.{name}"
    text = text_config_of(config)
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    for key in MULTIMODAL_ROPE_KEYS:
        if isinstance(rope, dict) and rope.get(key) is not None:
            return f"multimodal rope parameters ({key})"
    return None


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


class OwnPositionsFamily(Family):
    """A model numbered by its own `get_rope_index(input_ids, mm_token_type_ids, image_grid_thw)`,
    whose images come as `pixel_values` (patches of all images, concatenated) and
    `image_grid_thw` ([images, 3]: temporal, height, width in patches)."""

    position_rows = 3

    def position_ids_fn(self, model):
        rope_index = model_rope_index(model)
        image_token = int(model.config.image_token_id)

        def positions(input_ids, image_inputs):
            ids = input_ids[None]
            # The processors' text types: 1 on the image tokens, 0 on text (no videos here).
            return rope_index(ids, (ids == image_token).long(), image_inputs["image_grid_thw"])

        return positions

    def image_inputs(self, processed):
        return {"pixel_values": processed["pixel_values"], "image_grid_thw": processed["image_grid_thw"]}

    def image_grid(self, config, group, n_tokens):
        _, h, w = group["image_grid_thw"][0].tolist()
        merge = config.vision_config.spatial_merge_size
        return h // merge, w // merge
