"""Gemma 3 (Gemma3ForConditionalGeneration). Facts from transformers 5.25's modelling code:

- Text layers: `sliding_attention` and `full_attention` by `config.text_config.layer_types` (5 : 1 by
  default); a sliding layer's key j is visible from row i when i - j < sliding_window, on the
  sequence's indices, which are the positions of an ordinary sequence. The dual path counts the
  window on path positions (crystal_ext.model.dual_path_attention).
- Image tokens: with `token_type_ids` (1 on the image tokens) the stock forward makes each run of
  consecutive image tokens (one image) attend to itself in both directions, within the sliding
  window on sliding layers. The dual path gets the same facts as `crystal_image_tokens` (below), and
  the single path the processor's `token_type_ids`.
- Positions: plain 1-D 0, 1, 2, ... (the text model's rotary embedding of `position_ids`).
- Query scale: `query_pre_attn_scalar ** -0.5`, passed to the attention function as `scaling`.
  `attn_logit_softcapping` is not passed to the attention function by Gemma 3's attention layer,
  and `final_logit_softcapping` is applied by Gemma3ForCausalLM only, not by the VLM's forward:
  neither changes what the VLM computes, so neither is reproduced.
- Refused: `use_bidirectional_attention` text configs (every text token bidirectional).
- Images: `pixel_values` [images, 3, H, W], one fixed-size image per <start_of_image> sequence.
  Trained in full: the multi-modal projector.
"""

from __future__ import annotations

from crystal_ext.model.families.base import Family
from crystal_ext.model.parts import text_config_of

GEMMA3_MODEL_TYPES = ("gemma3",)


class Gemma3Family(Family):
    attention_kinds = frozenset({"full_attention", "sliding_attention"})

    def problem(self, config):
        text = text_config_of(config)
        if getattr(text, "use_bidirectional_attention", False):
            return (
                "its text config sets use_bidirectional_attention (every text token attends in both "
                "directions); the dual path runs causal text attention"
            )
        return None

    def _image_tokens(self, config, input_ids):
        return input_ids == int(config.image_token_id)

    def dual_path_inputs(self, config, input_ids):
        from crystal_ext.model.attention_registration import IMAGE_TOKENS_KWARG

        # A dict of masks tells the stock forward its masks are made: the dual-path attention
        # ignores them, so none is built (a sliding layer's would be L x L).
        no_masks = {kind: None for kind in self.attention_kinds}
        return {IMAGE_TOKENS_KWARG: self._image_tokens(config, input_ids), "attention_mask": no_masks}

    def single_path_inputs(self, config, input_ids):
        return {"token_type_ids": self._image_tokens(config, input_ids).long()}

    def image_inputs(self, processed):
        return {"pixel_values": processed["pixel_values"]}


__all__ = ["GEMMA3_MODEL_TYPES", "Gemma3Family"]
