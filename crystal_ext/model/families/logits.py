"""The model's own logits: what a VLM's forward does to its LM head's output, read from its config.

Facts from transformers 5.25's modelling code (the *ForConditionalGeneration forward of each
model type; the value always comes from the config field named here):

- aya_vision, cohere_compass: logits * text_config.logit_scale (cohere_compass: when not None);
- granite_docling, granite4_vision: logits / text_config.logits_scaling;
- hyperclovax_vision_v2: logits * text_config.logits_scaling (a multiplier there);
- muse_glimmer, muse_spark: logits * text_config.output_multiplier, then the soft-cap
  text_config.final_logit_softcapping;
- paligemma, gemma3n, gemma4, gemma4_unified: the soft-cap text_config.final_logit_softcapping
  when it is not None.

What matters is the VLM's own forward, not its text model's: LLaVA-NeXT with a Granite text model
(Granite-Vision) and Idefics3 with one return the head's output as it is, although their text
config holds `logits_scaling`; so do the other types in `PLAIN`. A model type in neither table whose
config sets one of these fields to something other than the identity is refused: whether its
forward applies it is not known here, and guessing would train on the wrong objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crystal_ext.model.parts import text_config_of
from crystal_ext.ops.model_logits import check_logit_transform, model_logits

# The config fields through which the models above transform their logits, with the value that
# leaves the logits as they are.
TRANSFORM_FIELDS = {
    "logit_scale": 1.0,
    "logits_scaling": 1.0,
    "output_multiplier": 1.0,
    "final_logit_softcapping": None,
}


@dataclass(frozen=True)
class LogitTransform:
    """z = softcap(scale * (h W^T + b)); softcap None: no cap (crystal_ext.ops.model_logits)."""

    scale: float = 1.0
    softcap: float | None = None

    def apply(self, raw: torch.Tensor) -> torch.Tensor:
        """The model's logits from the head's output."""
        return model_logits(raw, self.scale, self.softcap)

    def op_kwargs(self) -> dict:
        """The LM-head ops' keyword arguments (crystal_ext.lm_head_losses and its reference)."""
        return {"logit_scale": self.scale, "logit_softcap": self.softcap}


@dataclass(frozen=True)
class LogitRule:
    """How one model type's forward transforms its logits: multiplied by `multiply`, divided by
    `divide`, then soft-capped with `softcap` (each a config field name, or None)."""

    multiply: str | None = None
    divide: str | None = None
    softcap: str | None = None


LOGIT_RULES = {
    "aya_vision": LogitRule(multiply="logit_scale"),
    "cohere_compass": LogitRule(multiply="logit_scale"),
    "granite_docling": LogitRule(divide="logits_scaling"),
    "granite4_vision": LogitRule(divide="logits_scaling"),
    "hyperclovax_vision_v2": LogitRule(multiply="logits_scaling"),
    "muse_glimmer": LogitRule(multiply="output_multiplier", softcap="final_logit_softcapping"),
    "muse_spark": LogitRule(multiply="output_multiplier", softcap="final_logit_softcapping"),
    "paligemma": LogitRule(softcap="final_logit_softcapping"),
    "gemma3n": LogitRule(softcap="final_logit_softcapping"),
    "gemma4": LogitRule(softcap="final_logit_softcapping"),
    "gemma4_unified": LogitRule(softcap="final_logit_softcapping"),
}

# Model types whose forward returns the head's output as it is, whatever their text config holds.
PLAIN = frozenset(
    {
        "qwen2_vl",
        "qwen2_5_vl",
        "qwen3_vl",
        "qwen3_vl_moe",
        "llava",
        "llava_next",
        "llava_onevision",
        "idefics3",
        "smolvlm",
        "internvl",
        "mistral3",
        "glm4v",
        "qwen3_5",
        "qwen3_5_moe",
        "lfm2_vl",
        "gemma3",  # Gemma3ForConditionalGeneration does not cap (only the text-only Gemma3ForCausalLM does)
    }
)


def _field(config, name: str):
    """`name` from the text config, else from the top-level config (None when neither has it)."""
    text = text_config_of(config)
    for source in (text, config):
        value = getattr(source, name, None)
        if value is not None:
            return value
    return None


def unknown_transform(config) -> str | None:
    """Why the logits of a model type in neither table cannot be reproduced (None if they can)."""
    model_type = getattr(config, "model_type", None)
    if model_type in LOGIT_RULES or model_type in PLAIN:
        return None
    for name, identity in TRANSFORM_FIELDS.items():
        value = _field(config, name)
        if value is not None and value != identity:
            return (
                f"its config sets {name} = {value}, and whether its forward applies that to the logits "
                f"is not known (crystal_ext.model.families.logits lists the model types it has read)"
            )
    return None


def logit_transform(config) -> LogitTransform:
    """The transform a model's forward applies to its LM head's output, from its config."""
    model_type = getattr(config, "model_type", None)
    rule = LOGIT_RULES.get(model_type)
    if rule is None:
        return LogitTransform()
    scale = 1.0
    if rule.multiply is not None and _field(config, rule.multiply) is not None:
        scale *= float(_field(config, rule.multiply))
    if rule.divide is not None:
        divisor = _field(config, rule.divide)
        if divisor is None or float(divisor) == 0.0:
            raise ValueError(
                f"{model_type}: its forward divides the logits by {rule.divide}, which is {divisor}"
            )
        scale /= float(divisor)
    softcap = None if rule.softcap is None else _field(config, rule.softcap)
    where = f"the logit transform of {model_type} (from its config)"
    scale, cap = check_logit_transform(scale, None if softcap is None else float(softcap), where)
    return LogitTransform(scale, cap or None)
