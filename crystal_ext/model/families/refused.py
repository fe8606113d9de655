"""Model types refused by name, each with its reason: what their modelling code does that the
dual path cannot reproduce, when the config alone does not show it (the config checks are in
crystal_ext.model.families.architecture), and the types whose architecture nobody here has
checked yet. Facts from transformers 5.25's modelling code."""

from __future__ import annotations

_SLIDING_AND_BIDIRECTIONAL = (
    "its text layers mix sliding-window and full attention, and image tokens attend to each other "
    "bidirectionally; the dual path runs plain causal full attention"
)
_LINEAR_ATTENTION = (
    "its text decoder has linear-attention (gated delta-net) layers of its own class, which the dual path's "
    "two scans (crystal_ext.model.path_scan) have not been checked on"
)
_PREFIX = "its prefix (image and prompt) attends bidirectionally; the dual path runs plain causal attention"
_DISCRETE = (
    "it generates images as discrete tokens of a VQ image tokenizer; the dual path needs image features "
    "in the sequence that a corrupted copy can replace, and is not checked on such models"
)
_CROSS = (
    "its text layers reach the image through cross-attention layers, not through image tokens in the "
    "sequence the dual path splits into two paths"
)


def _not_checked(what: str) -> str:
    return (
        f"{what}; its architecture has not been checked against the dual path (a family test in "
        "tests/test_families.py is what accepts a model type)"
    )


REFUSED = {
    # Attention the dual path does not run.
    "gemma3n": _SLIDING_AND_BIDIRECTIONAL,
    "shieldgemma2": _SLIDING_AND_BIDIRECTIONAL,
    "paligemma": _PREFIX,
    "pi0": _PREFIX + " (an action expert attends to it)",
    "pi05": _PREFIX + " (an action expert attends to it)",
    "git": "its image tokens attend to each other bidirectionally ahead of the causal text",
    "molmo2": "its image tokens attend to each other bidirectionally (token_type_ids)",
    "qwen3_next": _LINEAR_ATTENTION,
    # The image reached otherwise than through image tokens of the one sequence.
    "mllama": _CROSS,
    "idefics": _CROSS,
    "evolla": _CROSS + " (protein encoder)",
    "blip": "its text decoder cross-attends to the image (BLIP captioning head)",
    "kosmos-2": _not_checked("it places image features by an image_embeds_position_mask, not image tokens"),
    "kosmos-2.5": _not_checked("it places image features by an image_embeds_position_mask, not image tokens"),
    # Discrete image tokens.
    "chameleon": _DISCRETE,
    "emu3": _DISCRETE,
    "janus": _DISCRETE,
    # Decoders nobody here has compared with the dual path.
    "apertus1p5": _not_checked("its own text decoder (apertus1p5_text)"),
    "aria": _not_checked("a mixture-of-experts text decoder (aria_text)"),
    "blip-2": _not_checked("an OPT text decoder (learned absolute positions) after a Q-Former"),
    "instructblip": _not_checked("an OPT text decoder (learned absolute positions) after a Q-Former"),
    "instructblipvideo": _not_checked("an OPT text decoder (learned absolute positions) after a Q-Former"),
    "deepseek_ocr2": _not_checked("its own text decoder (deepseek_ocr2_text)"),
    "deepseek_vl": _not_checked("a Janus-derived model"),
    "deepseek_vl_hybrid": _not_checked("a Janus-derived model with a second, high-resolution tower"),
    "fuyu": _not_checked("image patches fed to a Persimmon decoder without a vision tower"),
    "granite4_vision": _not_checked("its own Granite 4 text decoder (granite4_vision_text)"),
    "hyperclovax_vision_v2": _not_checked("its own HyperCLOVA X text decoder (hyperclovax)"),
    "kimi_k25": _not_checked("a DeepSeek-V3 text decoder (latent attention, mixture of experts)"),
    "llava_onevision1_5": _not_checked("a Qwen3 text decoder with its own vision merger code"),
    "minimax_m3_vl": _not_checked("its own mixture-of-experts text decoder (minimax_m3_vl_text)"),
    "mistral4": _not_checked("its own text decoder (mistral4)"),
    "ovis2": _not_checked("visual tokens drawn from a probabilistic visual embedding table"),
    "ovis2_5": _not_checked("visual tokens drawn from a probabilistic visual embedding table"),
    "step3p7": _not_checked("its own text decoder (step3p5) with multi-token prediction"),
    "video_llama_3": _not_checked("a video model with its own token compression"),
}

__all__ = ["REFUSED"]
