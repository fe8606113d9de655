"""LFM2-VL (`lfm2_vl`, Lfm2VlForConditionalGeneration). Facts from transformers 5.25's modelling code:

- Text layers (LFM2) by `text_config.layer_types`: `conv` (Lfm2ShortConv: in_proj to three
  streams B, C, x; a short causal depthwise convolution of B * x; C times its output; out_proj) and
  `full_attention` (causal attention with q/k layer norms). The conv layers run the dual path as
  one convolution per path, the projections once per packed row (crystal_ext.model.path_scan
  short_conv_paths), the attention layers through the
  dual-path attention. The alignment loss reads the last layer's attention; the released LFM2 text
  configurations (350M, 1.2B, 2.6B) end on a conv layer, so their checkpoints train with
  `--alignment_layer last_attention` (the loss read at the last full-attention layer,
  crystal_ext.model.alignment_layer) and are refused without it, the message naming the flag.
- Positions: plain 1-D 0, 1, 2, ... Logits: the LM head's output as it is.
- Images: a SigLIP2 (NaFlex) tower, `pixel_values` [images, patches, 3 * p * p] padded to the image
  processor's most patches, `pixel_attention_mask`, `spatial_shapes`; the chat template writes an
  image as <image>, which the processor expands into <|image_start|>, its tokens, <|image_end|>. Trained in
  full: the multi-modal projector (2 x 2 pixel unshuffle, layer norm, two linear layers).
"""

from __future__ import annotations

from crystal_ext.model.alignment_layer import alignment_layer_problem
from crystal_ext.model.families.generic import GenericFamily

LFM2_VL_MODEL_TYPES = ("lfm2_vl",)


class Lfm2VlFamily(GenericFamily):
    language = ("language_model",)
    vision = ("vision_tower",)
    projector = ("multi_modal_projector",)
    attention_kinds = frozenset({"full_attention", "conv"})

    def problem(self, config):
        return alignment_layer_problem(config, "last_attention")  # as Qwen3_5Family.problem


__all__ = ["LFM2_VL_MODEL_TYPES", "Lfm2VlFamily"]
