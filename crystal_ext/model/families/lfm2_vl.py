"""LFM2-VL (`lfm2_vl`, Lfm2VlForConditionalGeneration). Facts from transformers 5.25's modelling code:

- Text layers (LFM2) by `text_config.layer_types`: `conv` (Lfm2ShortConv: in_proj to three
  streams B, C, x; a short causal depthwise convolution of B * x; C times its output; out_proj) and
  `full_attention` (causal attention with q/k layer norms). The conv layers run the dual path as
  two scans of the stock module (crystal_ext.model.path_scan), the attention layers through the
  dual-path attention. A configuration whose last layer is a conv layer is refused (the alignment
  loss reads the last layer's attention); the released LFM2 text configurations (350M, 1.2B,
  2.6B) end on a conv layer, so their checkpoints are refused with that reason, and only
  configurations ending on full attention train.
- Positions: plain 1-D 0, 1, 2, ... Logits: the LM head's output as it is.
- Images: a SigLIP2 (NaFlex) tower, `pixel_values` [images, patches, 3 * p * p] padded to the image
  processor's most patches, `pixel_attention_mask`, `spatial_shapes`; the chat template writes an
  image as <image>, which the processor expands into <|image_start|>, its tokens, <|image_end|>. Trained in
  full: the multi-modal projector (2 x 2 pixel unshuffle, layer norm, two linear layers).
"""

from __future__ import annotations

from crystal_ext.model.families.generic import GenericFamily
from crystal_ext.model.families.qwen3_5 import last_layer_problem

LFM2_VL_MODEL_TYPES = ("lfm2_vl",)


class Lfm2VlFamily(GenericFamily):
    language = ("language_model",)
    vision = ("vision_tower",)
    projector = ("multi_modal_projector",)
    attention_kinds = frozenset({"full_attention", "conv"})

    def problem(self, config):
        return last_layer_problem(config)


__all__ = ["LFM2_VL_MODEL_TYPES", "Lfm2VlFamily"]
