"""Model families: what differs between stock VLMs and cannot be read from their processor or
config, behind one registry keyed by `config.model_type`.

A family says how path-1 position ids are made, which modules LoRA targets, which are trained
in full, and how the images' processor outputs become the model's forward keyword arguments
(see `base.Family`). `family_of(model_or_config)` returns the family of a model, or raises
`UnsupportedModel` naming the model type and what the dual path cannot do for it.

Any `AutoModelForImageTextToText` model not listed runs through the generic family (plain 1-D
positions) when its text decoder uses plain causal full attention on every layer; models that
need something the dual path does not do are refused (`REFUSED`, and the layer-type check).
"""

from __future__ import annotations

from crystal_ext.model.families.base import Family, UnsupportedModel
from crystal_ext.model.families.generic import GENERIC_MODEL_TYPES, GenericFamily
from crystal_ext.model.families.qwen_vl import QWEN_MODEL_TYPES, QwenVLFamily

# Model types the dual path cannot run, and why.
REFUSED = {
    "gemma3": "its text layers mix sliding-window and full attention, and image tokens attend to "
    "each other bidirectionally; the dual path runs plain causal full attention",
    "gemma3n": "its text layers mix sliding-window and full attention, and image tokens attend to "
    "each other bidirectionally; the dual path runs plain causal full attention",
    "paligemma": "its prefix (image and prompt) attends bidirectionally; the dual path runs plain "
    "causal attention",
    "mllama": "its text layers reach the image through cross-attention layers, not through image "
    "tokens in the sequence the dual path splits into two paths",
    "qwen3_5": "its text decoder has linear-attention (gated delta-net) layers, whose recurrent state "
    "cannot be split into the two paths",
    "qwen3_5_moe": "its text decoder has linear-attention (gated delta-net) layers, whose recurrent "
    "state cannot be split into the two paths",
    "qwen3_next": "its text decoder has linear-attention (gated delta-net) layers, whose recurrent "
    "state cannot be split into the two paths",
}

_FAMILIES = {t: QwenVLFamily(t) for t in QWEN_MODEL_TYPES} | {
    t: GenericFamily(t) for t in GENERIC_MODEL_TYPES
}


def _config_of(model_or_config):
    from crystal_ext.model.parts import unwrap_distributed, unwrap_peft

    if hasattr(model_or_config, "model_type") and not hasattr(model_or_config, "config"):
        return model_or_config
    return unwrap_peft(unwrap_distributed(model_or_config)).config


def _attention_problem(config) -> str | None:
    """Why the text decoder of an unlisted model is not plain causal full attention (None if it is)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    kinds = set(getattr(text, "layer_types", None) or ())
    if kinds - {"full_attention"}:
        return f"its text layers are of types {sorted(kinds)}; the dual path runs plain causal full attention"
    window = getattr(text, "sliding_window", None)
    if window is not None and getattr(text, "use_sliding_window", True) is not False and not kinds:
        return f"its text layers use a sliding window ({window}); the dual path runs full attention"
    if getattr(config, "cross_attention_layers", None) or getattr(text, "cross_attention_layers", None):
        return "its text layers reach the image through cross-attention"
    return None


def family_of(model_or_config) -> Family:
    """The family of a model (peft / DDP wrappers allowed) or of its config."""
    config = _config_of(model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type in REFUSED:
        raise UnsupportedModel(model_type, REFUSED[model_type])
    if model_type in _FAMILIES:
        family = _FAMILIES[model_type]
    else:
        problem = _attention_problem(config)
        if problem is not None:
            raise UnsupportedModel(model_type, problem)
        family = GenericFamily(model_type)
    family.logit_transform(
        config
    )  # a logit transform it cannot reproduce is refused here, before any weights load
    return family


__all__ = ["Family", "GenericFamily", "QwenVLFamily", "REFUSED", "UnsupportedModel", "family_of"]
