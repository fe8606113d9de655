"""Plugging dual-path attention into a stock transformers model through its public registries.

After `register_dual_path_attention()`, `model.set_attn_implementation("crystal_dual_path")`
(or `from_pretrained(..., attn_implementation="crystal_dual_path")`) switches the text decoder of
a stock model of any supported family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL and its MoE, LLaVA-OneVision,
Idefics3, SmolVLM, and the generic family: crystal_ext.model.families) to it. Per call, the
caller passes two forward kwargs:

  crystal_layout   int64 [batch, 6, 2] (crystal_ext.ops.layout)
  crystal_outputs  a fresh dict per forward; the last text decoder layer writes
                   "attention_alignment_loss" in it (the first one caches the layout's indices there).
                   A caller that has already checked the layout puts its CheckedLayout
                   (crystal_ext.ops.layout.check_layout) under "checked_layout": the layers then
                   take it as it is instead of reading and checking the layout again.
                   The caller puts the index of the layer whose attention the loss reads under
                   "alignment_layer" (crystal_ext.model.alignment_layer); without it, the last layer.

and, for a family whose image tokens attend to each other in both directions (Gemma 3, Gemma 4), a
third, and a fourth where only the sliding layers do so (Gemma 4):

  crystal_image_tokens               bool [batch, length], True on the image tokens (Family.dual_path_inputs)
  crystal_image_blocks_sliding_only  True: the image blocks are bidirectional on sliding layers only

A layer that reuses an earlier layer's keys and values (Gemma 4) receives them as `key` / `value`
of the whole packed sequence, and runs the dual path on them like a layer that computed its own.

A layer's sliding window comes with the call itself (the `sliding_window` keyword the stock
attention layers pass; crystal_ext.model.dual_path_attention counts it on path positions).

transformers forwards unknown model kwargs down to every attention call (the text layers
and, in some families such as the Qwen-VL ones, the vision tower's blocks), so no global state is
involved.

Which calls are ours: text decoder attention modules, recognised by structure (a `layer_idx`
and `is_causal=True`; the vision tower's attention has neither), with a layout present.
Everything else (the vision tower, or a text call without a layout, e.g. `generate`) runs
transformers' own SDPA attention, so the same model still works as a plain model.

Both registries need the name: the model asks the AttentionMaskInterface for a mask
function, and an unknown name makes the text layers receive attention_mask=None silently.
We register transformers' `sdpa_mask`: with no 2-D padding mask it returns None for a
causal model (no L x L mask is built); the dual-path calls ignore the mask anyway, since
the layout already says which positions are padding.
"""

from __future__ import annotations

import torch

from crystal_ext.model.dual_path_attention import DualPathPlan, dual_path_attention_planned
from crystal_ext.model.transformers_support import require_supported_transformers
from crystal_ext.ops import attention_alignment_loss
from crystal_ext.ops.layout import CheckedLayout, check_layout

ATTN_IMPLEMENTATION = "crystal_dual_path"
LAYOUT_KWARG = "crystal_layout"
OUTPUTS_KWARG = "crystal_outputs"
IMAGE_TOKENS_KWARG = "crystal_image_tokens"
IMAGE_BLOCKS_SLIDING_ONLY_KWARG = "crystal_image_blocks_sliding_only"
ALIGNMENT_LOSS_KEY = "attention_alignment_loss"
CHECKED_LAYOUT_KEY = "checked_layout"  # put in the per-call output slot by a caller that checked the layout
ALIGNMENT_LAYER_KEY = "alignment_layer"  # put in the per-call output slot: the loss's layer index
_PLAN_KEY = "_dual_path_plan"  # cached in the per-call output slot: built by the first text layer


def is_text_decoder_attention(module) -> bool:
    return getattr(module, "layer_idx", None) is not None and getattr(module, "is_causal", False) is True


def is_last_layer(module) -> bool:
    config = module.config
    return module.layer_idx == getattr(config, "num_hidden_layers", None) - 1


def is_alignment_layer(module, outputs: dict) -> bool:
    """The layer whose attention the alignment loss reads: the caller's index in the output slot
    (ALIGNMENT_LAYER_KEY), else the last layer."""
    index = outputs.get(ALIGNMENT_LAYER_KEY)
    return is_last_layer(module) if index is None else module.layer_idx == index


def crystal_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """An AttentionInterface function: q [B, H, L, d], k/v [B, Hkv, L, d] -> ([B, L, H, d], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layout = kwargs.pop(LAYOUT_KWARG, None)
    outputs = kwargs.pop(OUTPUTS_KWARG, None)
    image_tokens = kwargs.pop(IMAGE_TOKENS_KWARG, None)
    sliding_only = kwargs.pop(IMAGE_BLOCKS_SLIDING_ONLY_KWARG, False)
    if layout is None or not is_text_decoder_attention(module):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if dropout:
        raise NotImplementedError(
            f"{ATTN_IMPLEMENTATION}: attention dropout ({dropout}) is not supported; set the config's "
            "attention_dropout to 0"
        )
    window = kwargs.get("sliding_window")
    if query.shape[2] != key.shape[2]:
        raise ValueError(
            f"{ATTN_IMPLEMENTATION}: a dual-path layout needs the whole packed sequence in one call "
            f"(queries {query.shape[2]} != keys {key.shape[2]}); do not pass a cache when training"
        )
    # The layout is checked and turned into indices once per forward, not in every layer.
    plan = outputs.get(_PLAN_KEY) if outputs is not None else None
    if plan is None or not plan.matches(query):
        plan = DualPathPlan(_checked_layout(layout, outputs, query), query.device, image_tokens)
        if outputs is not None:
            outputs[_PLAN_KEY] = plan
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        # Under autocast q and k leave the rotary embedding in fp32 while v comes from a
        # low-precision matmul; SDPA (and so the stock attention) runs in the autocast dtype.
        dtype = torch.get_autocast_dtype(device_type)
        query, key, value = (t.to(dtype) for t in (query, key, value))
    last = outputs is not None and is_alignment_layer(module, outputs)
    if last and window is not None and window < plan.longest_path:
        raise NotImplementedError(
            f"{ATTN_IMPLEMENTATION}: the last text layer is a sliding-window layer (window {window}) and "
            f"this batch has a path of {plan.longest_path} tokens, so the window hides early keys from "
            "some E/F rows; the attention-alignment loss assumes each row sees its whole causal "
            f"dual-path key set. Keep every path (|A|+|C|+|D|+|E| tokens) within {window} tokens "
            "(--max_length), or use a model whose last layer is full attention"
        )
    # The layer's own window decides, not the plan's clamp of it: a sliding layer whose window
    # covers the paths still has its bidirectional image blocks.
    image_blocks = window is not None or not sliding_only
    out = dual_path_attention_planned(
        query, key, value, plan, scale=scaling, window=window, image_blocks=image_blocks
    )
    if last:
        # The fused op takes q and k in one dtype and its kernels' own GEMMs must not be
        # re-cast by autocast (which stays active inside a custom op).
        with torch.autocast(device_type, enabled=False):
            outputs[ALIGNMENT_LOSS_KEY] = attention_alignment_loss(query, key, plan.alignment, scaling)
    return out.transpose(1, 2).contiguous(), None


def _checked_layout(layout, outputs: dict | None, query: torch.Tensor) -> CheckedLayout:
    """The caller's check of this layout (CHECKED_LAYOUT_KEY in the output slot), or a check made here."""
    batch, length = query.shape[0], query.shape[2]
    checked = outputs.get(CHECKED_LAYOUT_KEY) if outputs is not None else None
    if isinstance(checked, CheckedLayout) and checked.describes(layout, batch, length):
        return checked
    return check_layout(layout, batch, length, "dual_path_attention")


def register_dual_path_attention(name: str = ATTN_IMPLEMENTATION) -> str:
    """Register the attention function and its mask function under `name` (idempotent).
    RuntimeError where the installed transformers is older than crystal_ext's models run on
    (crystal_ext.model.transformers_support)."""
    require_supported_transformers()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, crystal_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
