"""Model families: what differs between stock VLMs and cannot be read from their processor or
config, behind one registry keyed by `config.model_type`.

A family says how path-1 position ids are made, which modules LoRA targets, which are trained
in full, and how the images' processor outputs become the model's forward keyword arguments
(see `base.Family`). `family_of(model_or_config)` returns the family of a model, or raises
`UnsupportedModel` naming the model type and what the dual path cannot do for it; it reads the
config and the model's classes only, so a refused model stops before any weight is loaded.

Every model type is one of:
- tested: a family in `TESTED_MODEL_TYPES`, each proven equal to the stock model on a tiny model
  with its real processor (tests/test_families.py);
- generic: a plain causal decoder-only VLM with full attention and image tokens inline, by its
  config and modelling code (`GENERIC_BY_ARCHITECTURE`, and any type outside transformers' image-text-
  to-text mapping whose config passes every check), run through the generic family (1-D positions);
- refused, with the reason: by name (`REFUSED`, crystal_ext.model.families.refused) or by the
  config checks of crystal_ext.model.families.architecture (encoder-decoder, attention that is not
  plain causal full attention, an own position function without a tested adapter, a router loss
  the objective does not add), or by the family's logit transform (a transform of the LM head's
  output that it cannot reproduce, crystal_ext.model.families.logits).
"""

from __future__ import annotations

from crystal_ext.model.families.architecture import config_problem
from crystal_ext.model.families.aya_vision import AYA_VISION_MODEL_TYPES, AyaVisionFamily
from crystal_ext.model.families.base import Family, UnsupportedModel
from crystal_ext.model.families.gemma3 import GEMMA3_MODEL_TYPES, Gemma3Family
from crystal_ext.model.families.gemma4 import GEMMA4_MODEL_TYPES, Gemma4Family
from crystal_ext.model.families.generic import GENERIC_BY_ARCHITECTURE, GENERIC_MODEL_TYPES, GenericFamily
from crystal_ext.model.families.glm4v import GLM4V_MODEL_TYPES, Glm4vFamily
from crystal_ext.model.families.lfm2_vl import LFM2_VL_MODEL_TYPES, Lfm2VlFamily
from crystal_ext.model.families.own_positions import OwnPositionsFamily
from crystal_ext.model.families.qwen3_5 import QWEN3_5_MODEL_TYPES, Qwen3_5Family
from crystal_ext.model.families.qwen_vl import QWEN_MODEL_TYPES, QwenVLFamily
from crystal_ext.model.families.refused import REFUSED

_FAMILIES = (
    {t: QwenVLFamily(t) for t in QWEN_MODEL_TYPES}
    | {t: Qwen3_5Family(t) for t in QWEN3_5_MODEL_TYPES}
    | {t: Lfm2VlFamily(t) for t in LFM2_VL_MODEL_TYPES}
    | {t: Glm4vFamily(t) for t in GLM4V_MODEL_TYPES}
    | {t: Gemma3Family(t) for t in GEMMA3_MODEL_TYPES}
    | {t: Gemma4Family(t) for t in GEMMA4_MODEL_TYPES}
    | {t: AyaVisionFamily(t) for t in AYA_VISION_MODEL_TYPES}
    | {t: GenericFamily(t) for t in GENERIC_MODEL_TYPES}
)
TESTED_MODEL_TYPES = tuple(_FAMILIES)


def _config_of(model_or_config):
    from crystal_ext.model.parts import unwrap_distributed, unwrap_peft

    if hasattr(model_or_config, "model_type") and not hasattr(model_or_config, "config"):
        return model_or_config
    return unwrap_peft(unwrap_distributed(model_or_config)).config


def family_of(model_or_config) -> Family:
    """The family of a model (peft / DDP wrappers allowed) or of its config."""
    config = _config_of(model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type in REFUSED:
        raise UnsupportedModel(model_type, REFUSED[model_type])
    family = _FAMILIES.get(model_type) or GenericFamily(model_type)
    problem = family.problem(config) or config_problem(
        model_or_config,
        config,
        has_adapter=isinstance(family, OwnPositionsFamily),
        attention_kinds=family.attention_kinds,
    )
    if problem is not None:
        raise UnsupportedModel(model_type, problem)
    family.logit_transform(
        config
    )  # a logit transform it cannot reproduce is refused here, before any weights load
    return family


def classify(model_or_config) -> tuple[str, str]:
    """("tested" | "generic" | "refused", why) for a model or config, as family_of decides."""
    config = _config_of(model_or_config)
    try:
        family_of(config)
    except UnsupportedModel as exc:
        return "refused", exc.reason
    if config.model_type in _FAMILIES:
        family = _FAMILIES[config.model_type]
        where = family.tests or "tests/test_families.py"
        if not family.tests and "sliding_attention" in family.attention_kinds:
            where += ", tests/test_windowed_families.py"
        if {"linear_attention", "conv"} & family.attention_kinds:
            where = "tests/test_linear_families.py"
        return "tested", f"{type(family).__name__}, {where}"
    if config.model_type in GENERIC_BY_ARCHITECTURE:
        return "generic", GENERIC_BY_ARCHITECTURE[config.model_type]
    return "generic", "not listed; its config passes every check of crystal_ext.model.families.architecture"


__all__ = [
    "AyaVisionFamily",
    "Family",
    "Gemma3Family",
    "Gemma4Family",
    "GenericFamily",
    "Glm4vFamily",
    "Lfm2VlFamily",
    "Qwen3_5Family",
    "QwenVLFamily",
    "REFUSED",
    "TESTED_MODEL_TYPES",
    "UnsupportedModel",
    "classify",
    "family_of",
]
