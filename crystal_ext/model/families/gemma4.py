"""Gemma 4 (Gemma4ForConditionalGeneration). Facts from transformers 5.25's modelling code:

- Text layers: `sliding_attention` and `full_attention` by `config.text_config.layer_types`; the
  config forces the last layer to full attention. A sliding layer's key j is visible from row i when
  i - j < sliding_window on the sequence's indices; the dual path counts it on path positions
  (crystal_ext.model.dual_path_attention). Full layers may have their own head size and kv heads,
  and with `attention_k_eq_v` their values are their keys (before the value norm): all inside the
  stock layer, before the attention function.
- Image tokens: with `use_bidirectional_attention == "vision"` and `mm_token_type_ids` (1 on image
  tokens) the stock forward makes each run of consecutive image tokens attend to itself in both
  directions on the SLIDING layers only (AND(window, OR(causal, same block))); full layers stay
  causal. The dual path gets the same facts as `crystal_image_tokens` with
  `crystal_image_blocks_sliding_only`, the single path `mm_token_type_ids`. With
  `use_bidirectional_attention` None (the smaller checkpoints) every layer is causal. "all" (every
  text token bidirectional) is refused.
- Layers sharing keys and values: the last `num_kv_shared_layers` layers compute no keys or values;
  each reads those of the last earlier layer of its own type ("store"), through the
  `shared_kv_states` dict the text model fills during the forward (not the cache, also with
  use_cache=False): the whole sequence's k/v after norm and rotary. The dual path gets them as the
  attention call's k/v of the packed sequence, so path 2 reads the storing layer's A, B, D, F keys.
  `_maybe_slice_kv_shared_inputs` keeps every row (logits_to_keep is 0 in the backbone call).
- Per-layer inputs: each layer adds a gated projection of a per-layer input computed per token,
  from the token id (image tokens read as padding) and from the token's input embedding after the
  image features are written in. Per token, so each packed row gets its own path's value (B rows
  from the corrupted features, D rows from the latent ids): nothing to reproduce.
- Positions: plain 1-D 0, 1, 2, ... (rotary per layer type; the full layers' proportional rotary
  on part of the head). Attention scaling 1.0 (q and k are RMS-normed), passed as `scaling`; no
  attention soft-cap is passed. `final_logit_softcapping` soft-caps the logits
  (crystal_ext.model.families.logits).
- Images: `pixel_values` [images, max patches, patch pixels] with `image_position_ids`
  [images, max patches, 2] (padding patches at -1); each image becomes <boi> image tokens <eoi>.
  Trained in full: the vision embedder (`embed_vision`). The audio tower and its embedder are left
  as they are (never fed).
- Mixture-of-experts blocks (`enable_moe_block`, Gemma 4 26B-A4B): a router and experts beside each
  layer's MLP, per token; the stock forward adds no router loss, so nothing to reproduce. Its
  expert weights are 3-D parameters, not linear layers: LoRA leaves them frozen (the router's
  projection and the rest of the layer get adapters).
"""

from __future__ import annotations

from crystal_ext.model.families.base import Family
from crystal_ext.model.parts import text_config_of

GEMMA4_MODEL_TYPES = ("gemma4",)


class Gemma4Family(Family):
    attention_kinds = frozenset({"full_attention", "sliding_attention"})
    projector = ("embed_vision",)
    tests = "tests/test_gemma4.py"

    def problem(self, config):
        text = text_config_of(config)
        if getattr(text, "use_bidirectional_attention", None) == "all":
            return (
                "its text config sets use_bidirectional_attention='all' (every text token attends in both "
                "directions); the dual path runs causal text attention"
            )
        return None

    def _image_tokens(self, config, input_ids):
        return input_ids == int(config.image_token_id)

    def _bidirectional_images(self, config) -> bool:
        return getattr(text_config_of(config), "use_bidirectional_attention", None) == "vision"

    def dual_path_inputs(self, config, input_ids):
        from crystal_ext.model.attention_registration import (
            IMAGE_BLOCKS_SLIDING_ONLY_KWARG,
            IMAGE_TOKENS_KWARG,
        )

        # A dict of masks tells the stock forward its masks are made: the dual-path attention
        # ignores them, so none is built (a sliding layer's would be L x L).
        inputs = {"attention_mask": {kind: None for kind in self.attention_kinds}}
        if self._bidirectional_images(config):
            inputs[IMAGE_TOKENS_KWARG] = self._image_tokens(config, input_ids)
            inputs[IMAGE_BLOCKS_SLIDING_ONLY_KWARG] = True
        return inputs

    def single_path_inputs(self, config, input_ids):
        return {"mm_token_type_ids": self._image_tokens(config, input_ids).long()}

    def image_inputs(self, processed):
        return {k: processed[k] for k in ("pixel_values", "image_position_ids")}


__all__ = ["GEMMA4_MODEL_TYPES", "Gemma4Family"]
