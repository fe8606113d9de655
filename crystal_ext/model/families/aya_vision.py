"""Aya Vision: LLaVA-shaped (image features in place of the image tokens, 1-D positions, the projector
trained in full), its logits multiplied by the text config's logit_scale (crystal_ext.model.families.logits).

Its text model is Cohere (full attention on every layer) or, in Aya Vision 8B, Cohere2: sliding-window
layers (with rotary positions) and full-attention layers (without positions) by `layer_types`, the
last layer full in the released configuration. Facts from transformers 5.25's modelling code: a
Cohere2 sliding layer passes its window to the attention function and its stock mask is the causal
window on the sequence's indices; the dual path counts it on path positions
(crystal_ext.model.dual_path_attention). No image tokens attend bidirectionally."""

from __future__ import annotations

from crystal_ext.model.families.generic import GenericFamily
from crystal_ext.model.parts import text_config_of

AYA_VISION_MODEL_TYPES = ("aya_vision",)


class AyaVisionFamily(GenericFamily):
    attention_kinds = frozenset({"full_attention", "sliding_attention"})

    def dual_path_inputs(self, config, input_ids):
        text = text_config_of(config)
        kinds = set(getattr(text, "layer_types", None) or ())
        if "sliding_attention" not in kinds:
            return {}  # Cohere: no sliding layer, and its model takes no dict of masks
        # Cohere2 builds no masks when handed a dict of them (a sliding layer's would be L x L);
        # the dual-path attention ignores masks.
        return {"attention_mask": {kind: None for kind in kinds}}


__all__ = ["AYA_VISION_MODEL_TYPES", "AyaVisionFamily"]
