"""Qwen3.5 and Qwen3.5-MoE (`qwen3_5`, `qwen3_5_moe`: Qwen3_5ForConditionalGeneration,
Qwen3_5MoeForConditionalGeneration). Facts from transformers 5.25's modelling code:

- Text layers by `text_config.layer_types`: `linear_attention` (Qwen3_5GatedDeltaNet: in_proj_qkv,
  a short causal depthwise conv1d over q/k/v, the gated delta-rule recurrence, a gated RMS norm,
  out_proj) and `full_attention` (causal attention with a gated output). The linear layers run
  the dual path as two scans built from the layer's own modules and kernels, A's whole chunks
  scanned once for both (crystal_ext.model.path_scan), the attention layers through the
  dual-path attention.
- The alignment loss reads the last layer's attention (the published configurations end on a
  full-attention layer); a configuration ending on a linear layer is refused unless the run reads
  the last full-attention layer (`--alignment_layer last_attention`,
  crystal_ext.model.alignment_layer), and one without any full-attention layer is refused.
- Padding: the stock forward zeroes padded rows before a linear layer's projections (its 2-D
  mask); the dual path pads each gathered path at its end, which a causal scan never reads back.
- Positions: 3-row M-RoPE (interleaved) from the model's own `get_rope_index`, as Qwen3-VL
  (crystal_ext.model.families.own_positions). Images: `pixel_values` and `image_grid_thw` from
  Qwen3VLProcessor. Logits: the LM head's output as it is.
- Qwen3.5-MoE: the same layers (Qwen3_5MoeGatedDeltaNet is the dense layer's code) with a sparse
  MoE block (top-k router, experts, a gated shared expert); with `output_router_logits` its forward
  adds `router_aux_loss_coef` x the load-balancing loss, which the objective adds on path 1's
  routing (crystal_ext.model.families.router_loss).
- Trained in full: the vision tower's merger. LoRA: every linear layer of the text decoder (the
  linear layers' in_proj_qkv / in_proj_z / in_proj_b / in_proj_a / out_proj included) and of the
  vision blocks.
"""

from __future__ import annotations

from crystal_ext.model.alignment_layer import alignment_layer_problem
from crystal_ext.model.families.qwen_vl import QwenVLFamily

QWEN3_5_MODEL_TYPES = ("qwen3_5", "qwen3_5_moe")


class Qwen3_5Family(QwenVLFamily):
    projector = ("merger",)
    attention_kinds = frozenset({"full_attention", "linear_attention"})

    def problem(self, config):
        # Refused here only when no choice of --alignment_layer names a layer; the choice itself is
        # checked where the run knows it (crystal_ext.model.alignment_layer.alignment_layer_index).
        return alignment_layer_problem(config, "last_attention")


__all__ = ["QWEN3_5_MODEL_TYPES", "Qwen3_5Family"]
