"""Tiny random models of every supported family, each with its own processor built in code (a
word-level tokenizer carrying a chat template): no downloads. Also the single-family tests' and
benchmarks' tiny Qwen2.5-VL and tokenizer. Built from the embedded default's pieces
(crystal_ext.training.tiny_model), smaller."""

from __future__ import annotations

import torch
import transformers

from crystal_ext.model.runtime_fusions import from_config
from crystal_ext.training import tiny_model

# ---- families added with the model-own-positions work (builders at the end of this file) ----
POSITIONS_BRANCH_FAMILIES = ("llava", "llava_next", "internvl", "mistral3", "glm4v")

FAMILIES = (
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "qwen3_vl_moe",
    "llava_onevision",
    "idefics3",
    "smolvlm",
    *POSITIONS_BRANCH_FAMILIES,
)

# Qwen's tokens (the embedded default's), then the other families' image tokens and turn end.
SPECIAL = [
    *tiny_model.SPECIAL,
    "<image>",
    "<video>",
    "<fake_token_around_image>",
    "<global-img>",
    "<end_of_utterance>",
]
# Idefics3's template writes the roles capitalised with a colon; the single-family tests' tokenizer
# (qwen_tokenizer) needs only the chat and task words.
CHAT_WORDS = "system user assistant".split()
TASK_WORDS = (
    "you are a helpful what is in the image ? shape colour red green blue circle square triangle yes no "
    "how many one two three"
).split()
WORDS = [*CHAT_WORDS, "System", "User", "Assistant", ":", *TASK_WORDS, "and", "which"]

# ChatML with Qwen's vision markers (the shape of Qwen2-VL / Qwen3-VL's own templates).
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ p['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# LLaVA-OneVision's: images of a turn first, then its text.
LLAVA_OV_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} "
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>{% endif %}{% endfor %}"
    "{% for p in m['content'] %}{% if p['type'] == 'text' %}\n{{ p['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Idefics3 / SmolVLM's.
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}"
    "{% if m['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for p in m['content'] %}{% if p['type'] == 'text' %}{{ p['text'] }}{% elif p['type'] == 'image' %}"
    "{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def tokenizer(template: str | None = None, extra_special=(), **extra):
    """The word-level tokenizer; `extra_special` tokens get ids after every other token's (so the
    other families' ids do not move), `extra` sets named special tokens (e.g. InternVL's)."""
    tok = tiny_model.word_level_tokenizer(WORDS, SPECIAL, template)
    if extra_special:
        tok.add_special_tokens(
            {"additional_special_tokens": list(extra_special)}, replace_extra_special_tokens=False
        )
    if extra:
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast(
            tokenizer_object=tok.backend_tokenizer,
            unk_token=tok.unk_token,
            pad_token=tok.pad_token,
            eos_token=tok.eos_token,
            extra_special_tokens=extra,
            chat_template=template,
        )
    return tok


def qwen_tokenizer():
    """The single-family tests' and benchmarks' tokenizer: Qwen's tokens, no chat template (the
    Qwen processor brings its own)."""
    return tiny_model.word_level_tokenizer([*CHAT_WORDS, *TASK_WORDS], tiny_model.SPECIAL)


def qwen2_5_vl_config(tok, hidden: int = 64, layers: int = 2):
    """The tests' tiny Qwen2.5-VL: `hidden` wide text, a one-block vision tower 64 wide."""
    text = tiny_model.tiny_text_config(tok, hidden, layers, 512, rope_parameters=tiny_model.mrope(hidden))
    return tiny_model.qwen2_5_vl_config(tok, text, vision_hidden=64, vision_depth=1, window_size=56)


def tiny_qwen25vl(tok, attn_implementation="eager", seed=0, hidden=64, layers=2):
    """A randomly initialised tiny Qwen2.5-VL (float32, eval) of a few hundred k params."""
    torch.manual_seed(seed)
    model = from_config(
        transformers.Qwen2_5_VLForConditionalGeneration,
        qwen2_5_vl_config(tok, hidden, layers),
        attn_implementation=attn_implementation,
        dtype=torch.float32,
    )
    return model.eval()


def _text(tok, hidden, **extra):
    return tiny_model.tiny_text_config(tok, hidden, 2, 512, **extra)


def _qwen_processor(tok, family: str, side: int):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    patch = 16 if family.startswith("qwen3") else 14
    unit = patch * 2
    size = {"shortest_edge": unit * unit, "longest_edge": side * side}
    kw = dict(size=size, patch_size=patch, merge_size=2, temporal_patch_size=2)
    if patch == 16:
        kw.update(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    cls = {"qwen2_vl": Qwen2VLProcessor, "qwen2_5_vl": Qwen2_5_VLProcessor}.get(family, Qwen3VLProcessor)
    if cls is Qwen3VLProcessor:
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

        video = Qwen3VLVideoProcessor(**kw)
    else:
        video = Qwen2VLVideoProcessor(**kw)
    return cls(image_processor=Qwen2VLImageProcessor(**kw), tokenizer=tok, video_processor=video)


def _qwen_model(tok, family: str, hidden: int):
    if family == "qwen2_5_vl":
        return transformers.Qwen2_5_VLForConditionalGeneration, qwen2_5_vl_config(tok, hidden)
    common = dict(tie_word_embeddings=False, **tiny_model.qwen_vision_token_ids(tok))
    if family == "qwen2_vl":
        text = _text(tok, hidden, rope_parameters=tiny_model.mrope(hidden))
        vision = dict(depth=1, embed_dim=64, hidden_size=hidden, num_heads=4, mlp_ratio=2, patch_size=14)
        return transformers.Qwen2VLForConditionalGeneration, transformers.Qwen2VLConfig(
            text_config=text, vision_config=vision, **common
        )
    rope = {**tiny_model.mrope(hidden), "mrope_interleaved": True}
    vision = dict(
        depth=2,
        hidden_size=64,
        intermediate_size=128,
        num_heads=4,
        out_hidden_size=hidden,
        patch_size=16,
        num_position_embeddings=64,
        deepstack_visual_indexes=[0],
    )
    if family == "qwen3_vl":
        text = _text(tok, hidden, head_dim=hidden // 4, rope_parameters=rope)
        return transformers.Qwen3VLForConditionalGeneration, transformers.Qwen3VLConfig(
            text_config=text, vision_config=vision, **common
        )
    text = _text(
        tok,
        hidden,
        head_dim=hidden // 4,
        rope_parameters=rope,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=hidden,
        decoder_sparse_step=1,
    )
    return transformers.Qwen3VLMoeForConditionalGeneration, transformers.Qwen3VLMoeConfig(
        text_config=text, vision_config=vision, **common
    )


def _vision_encoder(side: int, patch: int) -> dict:
    """A one-layer vision encoder 32 wide (SigLIP's config keys) for `side` square images."""
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": side,
        "patch_size": patch,
    }


def _llava_onevision(tok, hidden: int):
    from transformers.models.llava_onevision.image_processing_llava_onevision import (
        LlavaOnevisionImageProcessor,
    )
    from transformers.models.llava_onevision.video_processing_llava_onevision import (
        LlavaOnevisionVideoProcessor,
    )

    side, patch = 28, 14
    pinpoints = [[28, 28], [28, 56], [56, 28], [56, 56]]
    config = transformers.LlavaOnevisionConfig(
        text_config={"model_type": "qwen2", **_text(tok, hidden)},
        vision_config={"model_type": "siglip_vision_model", **_vision_encoder(side, patch)},
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=pinpoints,
        tie_word_embeddings=False,
    )
    kw = dict(size={"height": side, "width": side}, image_grid_pinpoints=pinpoints, crop_size=side)
    processor = transformers.LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(**kw),
        tokenizer=tok,
        video_processor=LlavaOnevisionVideoProcessor(size={"height": side, "width": side}),
        num_image_tokens=(side // patch) ** 2,
        vision_feature_select_strategy="full",
    )
    return transformers.LlavaOnevisionForConditionalGeneration, config, processor


def _idefics3(tok, hidden: int, smol: bool):
    side, patch = 32, 8
    ids = tok.convert_tokens_to_ids
    cfg_cls = transformers.SmolVLMConfig if smol else transformers.Idefics3Config
    config = cfg_cls(
        vision_config=_vision_encoder(side, patch),
        text_config={"model_type": "llama", **_text(tok, hidden)},
        scale_factor=2,
        image_token_id=ids("<image>"),
        tie_word_embeddings=False,
    )
    kw = dict(
        do_image_splitting=False,
        size={"longest_edge": side},
        max_image_size={"longest_edge": side},
    )
    seq = (side // patch) ** 2 // 4
    if smol:
        from transformers.models.smolvlm.image_processing_smolvlm import SmolVLMImageProcessor
        from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

        processor = transformers.SmolVLMProcessor(
            image_processor=SmolVLMImageProcessor(**kw),
            tokenizer=tok,
            video_processor=SmolVLMVideoProcessor(**kw),
            image_seq_len=seq,
        )
        return transformers.SmolVLMForConditionalGeneration, config, processor
    from transformers.models.idefics3.image_processing_idefics3 import Idefics3ImageProcessor

    processor = transformers.Idefics3Processor(
        image_processor=Idefics3ImageProcessor(**kw), tokenizer=tok, image_seq_len=seq
    )
    return transformers.Idefics3ForConditionalGeneration, config, processor


def _instantiate(cls, config, tok, processor, seed: int, attn_implementation: str, **kwargs):
    """The random float32 model of `config`, drawn from `seed`, built as crystal_ext builds and loads
    models (crystal_ext.model.runtime_fusions); the processor takes the tokenizer's chat template."""
    processor.chat_template = tok.chat_template
    torch.manual_seed(seed)
    return from_config(cls, config, attn_implementation=attn_implementation, dtype=torch.float32, **kwargs)


def build(
    family: str,
    attn_implementation: str = "eager",
    seed: int = 0,
    hidden: int = 64,
    k: int = 4,
    side: int = 56,
):
    """(model [float32, eval], processor, latent tokens) of a tiny random `family` model; the
    latent tokens are added before the model is built, so its vocabulary fits them."""
    from crystal_ext.model.latent_tokens import add_latent_tokens

    if family in SCALED_HEAD_FAMILIES:
        return build_scaled_head(family, attn_implementation, seed, hidden, k)
    if family in WINDOWED_FAMILIES:
        return build_windowed(family, attn_implementation, seed, hidden, k)
    if family.startswith("qwen"):
        tok = tokenizer(QWEN_TEMPLATE)
        latent = add_latent_tokens(tok, None, k=k)
        cls, config = _qwen_model(tok, family, hidden)
        processor = _qwen_processor(tok, family, side)
    elif family == "llava_onevision":
        tok = tokenizer(LLAVA_OV_TEMPLATE)
        latent = add_latent_tokens(tok, None, k=k)
        cls, config, processor = _llava_onevision(tok, hidden)
    elif family in ("idefics3", "smolvlm"):
        tok = tokenizer(IDEFICS3_TEMPLATE)
        latent = add_latent_tokens(tok, None, k=k)
        cls, config, processor = _idefics3(tok, hidden, smol=family == "smolvlm")
    elif family in POSITIONS_BRANCH_FAMILIES:
        tok, cls, config, processor, latent = _POSITIONS_BRANCH_BUILDERS[family](hidden, k)
    else:
        raise ValueError(f"unknown family {family!r}")
    model = _instantiate(cls, config, tok, processor, seed, attn_implementation)
    if family == "qwen3_vl_moe":
        model.set_experts_implementation("eager")  # the grouped-GEMM kernel has no float64
    return model.eval(), processor, latent


# ---- llava, llava_next, internvl, mistral3, glm4v --------------------------------------------
# Templates written here from the models' chat formats (facts, not their text): LLaVA-1.5's
# "USER: <image>\n... ASSISTANT:" turns; InternVL's ChatML with <img><IMG_CONTEXT></img>; Mistral's
# [INST] ... [/INST] with [IMG]; GLM-4.1V's [gMASK]<sop><|role|>\n turns with
# <|begin_of_image|><|image|><|end_of_image|>.

LLAVA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'][0]['text'] }} "
    "{% elif m['role'] == 'user' %}USER: {% for p in m['content'] %}{% if p['type'] == 'image' %}<image>\n"
    "{% else %}{{ p['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for p in m['content'] %}{{ p['text'] }}{% endfor %}<|im_end|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
INTERNVL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}<IMG_CONTEXT>\n{% else %}{{ p['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MISTRAL3_TEMPLATE = (
    "<s>{% for m in messages %}{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ m['content'][0]['text'] }}"
    "[/SYSTEM_PROMPT]{% elif m['role'] == 'user' %}[INST]{% for p in m['content'] %}{% if p['type'] == 'image' %}"
    "[IMG]{% else %}{{ p['text'] }}{% endif %}{% endfor %}[/INST]"
    "{% else %}{% for p in m['content'] %}{{ p['text'] }}{% endfor %}</s>{% endif %}{% endfor %}"
)
GLM4V_TEMPLATE = (
    "[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}<|begin_of_image|><|image|><|end_of_image|>"
    "{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
GLM4V_SPECIAL = [
    "[gMASK]",
    "<sop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|begin_of_image|>",
    "<|image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|video|>",
    "<|end_of_video|>",
]


def _llama_text(tok, hidden):
    return {"model_type": "llama", **_text(tok, hidden)}


def _clip_encoder(side, patch):
    return {"model_type": "clip_vision_model", **_vision_encoder(side, patch), "projection_dim": 32}


def _llava(hidden, k):
    """LLaVA-1.5: CLIP tower (class token dropped: 'default' features), Llama text."""
    from transformers import CLIPImageProcessor

    tok = tokenizer(LLAVA_TEMPLATE)
    latent = _latent(tok, k)
    side, patch = 28, 14
    config = transformers.LlavaConfig(
        vision_config=_clip_encoder(side, patch),
        text_config=_llama_text(tok, hidden),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    image = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    processor = transformers.LlavaProcessor(
        image_processor=image,
        tokenizer=tok,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return tok, transformers.LlavaForConditionalGeneration, config, processor, latent


def _llava_next(hidden, k):
    """LLaVA-NeXT: any-resolution tiles of a CLIP tower, Llama text."""
    from transformers.models.llava_next.image_processing_llava_next import LlavaNextImageProcessor

    tok = tokenizer(LLAVA_TEMPLATE)
    latent = _latent(tok, k)
    side, patch = 28, 14
    pinpoints = [[28, 28], [28, 56], [56, 28], [56, 56]]
    config = transformers.LlavaNextConfig(
        vision_config=_clip_encoder(side, patch),
        text_config=_llama_text(tok, hidden),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_grid_pinpoints=pinpoints,
        tie_word_embeddings=False,
    )
    image = LlavaNextImageProcessor(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        image_grid_pinpoints=pinpoints,
    )
    processor = transformers.LlavaNextProcessor(
        image_processor=image,
        tokenizer=tok,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return tok, transformers.LlavaNextForConditionalGeneration, config, processor, latent


def _internvl(hidden, k):
    """InternVL: InternViT tower, pixel shuffle 0.5, Qwen2 text; <img><IMG_CONTEXT>...</img>."""
    from transformers.models.got_ocr2.image_processing_got_ocr2 import GotOcr2ImageProcessor
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    names = {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    }
    tok = tokenizer(INTERNVL_TEMPLATE, ["<img>", "</img>", "<IMG_CONTEXT>"], **names)
    latent = _latent(tok, k)
    side, patch = 28, 7
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=[side, side],
        patch_size=[patch, patch],
    )
    config = transformers.InternVLConfig(
        vision_config=vision,
        text_config={"model_type": "qwen2", **_text(tok, hidden)},
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=(side // patch) ** 2 // 4,
        tie_word_embeddings=False,
    )
    size = {"height": side, "width": side}
    processor = transformers.InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=size, crop_to_patches=False),
        tokenizer=tok,
        video_processor=InternVLVideoProcessor(size=size),
        image_seq_length=(side // patch) ** 2 // 4,
    )
    return tok, transformers.InternVLForConditionalGeneration, config, processor, latent


def _mistral3(hidden, k):
    """Mistral3: Pixtral tower (2-D rope, [IMG_BREAK] per row, [IMG_END]), 2x2 patch merger,
    Mistral text."""
    from transformers.models.pixtral.image_processing_pixtral import PixtralImageProcessor

    tok = tokenizer(MISTRAL3_TEMPLATE, ["<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                                        "[IMG]", "[IMG_BREAK]", "[IMG_END]"])  # fmt: skip
    latent = _latent(tok, k)
    patch = 8
    vision = dict(
        model_type="pixtral",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        head_dim=16,
        image_size=64,
        patch_size=patch,
    )
    config = transformers.Mistral3Config(
        vision_config=vision,
        text_config={
            "model_type": "mistral",
            **_text(tok, hidden, head_dim=hidden // 4, sliding_window=None),
        },
        image_token_index=tok.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
        tie_word_embeddings=False,
    )
    image = PixtralImageProcessor(size={"longest_edge": 48}, patch_size=patch)
    processor = transformers.PixtralProcessor(
        image_processor=image, tokenizer=tok, patch_size=patch, spatial_merge_size=2
    )
    return tok, transformers.Mistral3ForConditionalGeneration, config, processor, latent


def _glm4v(hidden, k):
    """GLM-4.1V: its own 3-row M-RoPE (partial rotary, interleaved halves), patch 14, merge 2."""
    from transformers.models.glm4v.image_processing_glm4v import Glm4vImageProcessor
    from transformers.models.glm4v.video_processing_glm4v import Glm4vVideoProcessor

    tok = tokenizer(GLM4V_TEMPLATE, GLM4V_SPECIAL)
    latent = _latent(tok, k)
    ids = tok.convert_tokens_to_ids
    rope = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
        "mrope_section": [2, 1, 1],
    }
    text = _text(tok, hidden, rope_parameters=rope)
    vision = dict(
        depth=1,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=hidden,
        patch_size=14,
        image_size=56,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    config = transformers.Glm4vConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids("<|image|>"),
        video_token_id=ids("<|video|>"),
        image_start_token_id=ids("<|begin_of_image|>"),
        image_end_token_id=ids("<|end_of_image|>"),
        video_start_token_id=ids("<|begin_of_video|>"),
        video_end_token_id=ids("<|end_of_video|>"),
        tie_word_embeddings=False,
    )
    kw = dict(size={"shortest_edge": 28 * 28, "longest_edge": 2 * 56 * 56}, patch_size=14, merge_size=2)
    processor = transformers.Glm4vProcessor(
        image_processor=Glm4vImageProcessor(**kw), tokenizer=tok, video_processor=Glm4vVideoProcessor(**kw)
    )
    return tok, transformers.Glm4vForConditionalGeneration, config, processor, latent


def _latent(tok, k):
    from crystal_ext.model.latent_tokens import add_latent_tokens

    return add_latent_tokens(tok, None, k=k)


_POSITIONS_BRANCH_BUILDERS = {
    "llava": _llava,
    "llava_next": _llava_next,
    "internvl": _internvl,
    "mistral3": _mistral3,
    "glm4v": _glm4v,
}


# ---- models whose forward transforms the LM head's output (crystal_ext.model.families.logits) ----

SCALED_HEAD_FAMILIES = ("aya_vision", "granite_docling")

# Aya Vision's image tokens (AyaVisionProcessor's defaults).
AYA_SPECIAL = [
    "<|START_OF_IMG|>",
    "<|END_OF_IMG|>",
    "<|IMG_PATCH|>",
    "<|IMG_LINE_BREAK|>",
    "TILE",
    "TILE_GLOBAL",
]
# ChatML-shaped, images of a turn written where they stand, as the other test templates.
AYA_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _aya_vision(tok, hidden: int, logit_scale: float, text: dict | None = None):
    """Aya Vision with a Cohere text model (full attention on every layer; `text`: another text
    config, e.g. Cohere2's) and its real processor."""
    from transformers.models.got_ocr2.image_processing_got_ocr2 import GotOcr2ImageProcessor

    side, patch = 56, 14
    config = transformers.AyaVisionConfig(
        vision_config={"model_type": "siglip_vision_model", **_vision_encoder(side, patch)},
        text_config=text or {"model_type": "cohere", **_text(tok, hidden), "logit_scale": logit_scale},
        downsample_factor=2,
        image_token_index=tok.convert_tokens_to_ids("<|IMG_PATCH|>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    image_processor = GotOcr2ImageProcessor(
        size={"height": side, "width": side}, max_patches=1, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    processor = transformers.AyaVisionProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=patch, img_size=side, downsample_factor=2
    )
    return transformers.AyaVisionForConditionalGeneration, config, processor


def _granite_docling(tok, hidden: int, logits_scaling: float):
    """Granite-Docling (Idefics3-shaped, with a Granite text model: embedding, residual, attention
    and logit multipliers) with its real processor; the coarse connector path only."""
    from transformers.models.granite_docling.image_processing_granite_docling import (
        GraniteDoclingImageProcessor,
    )

    side, patch = 32, 8
    text = {
        **_text(tok, hidden),
        "logits_scaling": logits_scaling,
        "embedding_multiplier": 2.0,
        "residual_multiplier": 0.5,
        "attention_multiplier": 0.125,
    }
    config = transformers.GraniteDoclingConfig(
        vision_config={
            **_vision_encoder(side, patch),
            "scale_factor": 2,
            "out_hidden_size": hidden,
            "use_fine_route": False,
        },
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
    )
    image_processor = GraniteDoclingImageProcessor(
        size={"height": side, "width": side}, crop_to_patches=False
    )
    processor = transformers.GraniteDoclingProcessor(
        image_processor=image_processor, tokenizer=tok, image_seq_len=(side // patch) ** 2 // 4
    )
    return transformers.GraniteDoclingForConditionalGeneration, config, processor


def build_scaled_head(
    family: str, attn_implementation: str = "eager", seed: int = 0, hidden: int = 64, k: int = 4
):
    """(model [float32, eval], processor, latent tokens) of a tiny random model of a
    SCALED_HEAD_FAMILIES type, whose forward rescales its LM head's output. The scales enlarge the
    logits (real checkpoints shrink them: Aya's 0.0625, Granite's division by 4 or more) so that
    the 20-step training test learns as fast as the other families'; any scale but 1 tells the
    bare head from the model's logits."""
    from crystal_ext.model.latent_tokens import add_latent_tokens

    if family == "aya_vision":
        tok = tiny_model.word_level_tokenizer(WORDS, [*SPECIAL, *AYA_SPECIAL], AYA_TEMPLATE)
        latent = add_latent_tokens(tok, None, k=k)
        cls, config, processor = _aya_vision(tok, hidden, logit_scale=4.0)
    elif family == "granite_docling":
        tok = tokenizer(IDEFICS3_TEMPLATE)
        latent = add_latent_tokens(tok, None, k=k)
        cls, config, processor = _granite_docling(tok, hidden, logits_scaling=0.5)
    else:
        raise ValueError(f"unknown family {family!r}")
    model = _instantiate(cls, config, tok, processor, seed, attn_implementation)
    with torch.no_grad():  # slow decay (A in [0.01, 0.1]): the state remembers across segments
        for module in model.modules():
            if hasattr(module, "A_log"):
                module.A_log.uniform_(-4.6, -2.3)
    if family == "qwen3_5_moe":
        model.set_experts_implementation("eager")  # the grouped-GEMM kernel has no float64
    return model.eval(), processor, latent


# ---- sliding-window layers and bidirectional image blocks (crystal_ext.model.families.gemma3) ----

WINDOWED_FAMILIES = ("gemma3", "aya_vision_cohere2")
# The model type of each test family (the same name unless listed).
MODEL_TYPE = {"aya_vision_cohere2": "aya_vision"}

GEMMA3_SPECIAL = [
    "<bos>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]
# Gemma's chat format (facts, not its text): <bos>, turns "<start_of_turn>ROLE\n ... <end_of_turn>\n"
# with the assistant named "model", a system prompt written at the head of the first user turn, an
# image written as <start_of_image> (the processor expands it into the image's tokens).
GEMMA3_TEMPLATE = (
    "{% macro body(c) %}{% if c is string %}{{ c }}{% else %}{% for p in c %}"
    "{% if p['type'] == 'image' %}<start_of_image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% endmacro %}<bos>{% for m in messages %}{% if m['role'] == 'system' %}<start_of_turn>user\n"
    "{{ body(m['content']) }}\n\n{% else %}{% if not (loop.index0 == 1 and messages[0]['role'] == 'system') %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{% endif %}"
    "{{ body(m['content']) }}<end_of_turn>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def gemma3_text_config(tok, hidden: int, layer_types, window: int) -> dict:
    """A tiny Gemma 3 text config: query scale and soft-cap fields set to values that change the
    result wherever they are (wrongly) applied."""
    return {
        "model_type": "gemma3_text",
        "vocab_size": len(tok),
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": len(layer_types),
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": hidden // 4,
        "query_pre_attn_scalar": 24,
        "layer_types": list(layer_types),
        "sliding_window": window,
        "attn_logit_softcapping": 2.0,  # not applied by Gemma 3's attention layer
        "final_logit_softcapping": 3.0,  # not applied by the VLM's forward
        "max_position_embeddings": 512,
        "pad_token_id": tok.pad_token_id,
        "attention_dropout": 0.0,
    }


def _gemma3(hidden: int, k: int, layer_types, window: int):
    """Gemma 3: a SigLIP tower 32 px / patch 8 (16 patches), pooled to 4 tokens an image; the real
    Gemma3Processor around a word-level tokenizer holding Gemma's image and turn tokens."""
    from transformers import PreTrainedTokenizerFast
    from transformers.models.gemma3.image_processing_gemma3 import Gemma3ImageProcessor

    base = tiny_model.word_level_tokenizer([*WORDS, "model"], [*SPECIAL, *GEMMA3_SPECIAL], GEMMA3_TEMPLATE)
    named = {
        "boi_token": "<start_of_image>",
        "eoi_token": "<end_of_image>",
        "image_token": "<image_soft_token>",
    }
    tok = PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer,
        unk_token=base.unk_token,
        pad_token=base.pad_token,
        eos_token="<end_of_turn>",
        extra_special_tokens=named,
        chat_template=GEMMA3_TEMPLATE,
    )
    latent = _latent(tok, k)
    side, patch, tokens = 32, 8, 4
    ids = tok.convert_tokens_to_ids
    config = transformers.Gemma3Config(
        text_config=gemma3_text_config(tok, hidden, layer_types, window),
        vision_config={"model_type": "siglip_vision_model", **_vision_encoder(side, patch)},
        mm_tokens_per_image=tokens,
        boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"),
        tie_word_embeddings=False,
    )
    image = Gemma3ImageProcessor(
        size={"height": side, "width": side}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    processor = transformers.Gemma3Processor(image_processor=image, tokenizer=tok, image_seq_length=tokens)
    return tok, transformers.Gemma3ForConditionalGeneration, config, processor, latent


# Sliding layers first and in the middle, a full last layer (the alignment loss's layer); a window
# of 3 positions cuts inside every image block (4 tokens) and every path.
GEMMA3_LAYERS = ("sliding_attention", "full_attention", "sliding_attention", "full_attention")
GEMMA3_WINDOW = 3


def build_windowed(
    family: str,
    attn_implementation: str = "eager",
    seed: int = 0,
    hidden: int = 64,
    k: int = 4,
    layer_types=GEMMA3_LAYERS,
    window: int = GEMMA3_WINDOW,
):
    """(model [float32, eval], processor, latent tokens) of a tiny random WINDOWED_FAMILIES model."""
    if family == "gemma3":
        tok, cls, config, processor, latent = _gemma3(hidden, k, layer_types, window)
    elif family == "aya_vision_cohere2":
        tok = tiny_model.word_level_tokenizer(WORDS, [*SPECIAL, *AYA_SPECIAL], AYA_TEMPLATE)
        latent = _latent(tok, k)
        # Aya Vision 8B's text: Cohere2, sliding layers with rotary positions, full ones without.
        text = {
            "model_type": "cohere2",
            **tiny_model.tiny_text_config(tok, hidden, len(layer_types), 512),
            "layer_types": list(layer_types),
            "sliding_window": window,
            "logit_scale": 4.0,
        }
        cls, config, processor = _aya_vision(tok, hidden, logit_scale=4.0, text=text)
    else:
        raise ValueError(f"unknown family {family!r}")
    model = _instantiate(cls, config, tok, processor, seed, attn_implementation)
    if family == "gemma3":
        with torch.no_grad():  # Gemma 3 initialises its projection to zeros: images would be invisible
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.2)
    return model.eval(), processor, latent


# ---- linear-attention and convolution layers (crystal_ext.model.path_scan) ----

LINEAR_FAMILIES = ("qwen3_5", "qwen3_5_moe", "lfm2_vl")

# Linear layers first and between the attention layers, so a linear layer reads D's hidden states
# after an attention layer has computed them on path 1; a full-attention last layer (the alignment
# loss's layer).
QWEN3_5_LAYERS = ("linear_attention", "full_attention", "linear_attention", "full_attention")


def qwen3_5_text_config(tok, hidden: int, layer_types=QWEN3_5_LAYERS) -> dict:
    """A tiny Qwen3.5 text config: grouped value heads (2 key heads, 4 value heads) and a conv
    kernel of 4 taps, so the short convolution reaches across segment boundaries."""
    rope = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
        "mrope_section": [2, 1, 1],
        "mrope_interleaved": True,
    }
    return {
        "model_type": "qwen3_5_text",
        **tiny_model.tiny_text_config(tok, hidden, len(layer_types), 512),
        "head_dim": hidden // 4,
        "rope_parameters": rope,
        "layer_types": list(layer_types),
        "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
    }


def qwen3_5_moe_text_config(tok, hidden: int, layer_types=QWEN3_5_LAYERS) -> dict:
    """Qwen3.5-MoE's: the same layers with 4 experts (top 2) and a shared expert in every MLP."""
    return {
        **qwen3_5_text_config(tok, hidden, layer_types),
        "model_type": "qwen3_5_moe_text",
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": hidden,
        "shared_expert_intermediate_size": hidden,
    }


def _qwen3_5(hidden: int, k: int, layer_types, moe: bool = False):
    """Qwen3.5 (-MoE): its Qwen3VLProcessor (patch 16, merge 2) and a two-block vision tower."""
    tok = tokenizer(QWEN_TEMPLATE)
    latent = _latent(tok, k)
    vision = dict(
        depth=2,
        hidden_size=64,
        intermediate_size=128,
        num_heads=4,
        out_hidden_size=hidden,
        patch_size=16,
        num_position_embeddings=64,
    )
    config_class = transformers.Qwen3_5MoeConfig if moe else transformers.Qwen3_5Config
    text = (qwen3_5_moe_text_config if moe else qwen3_5_text_config)(tok, hidden, layer_types)
    config = config_class(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=False,
        **tiny_model.qwen_vision_token_ids(tok),
    )
    processor = _qwen_processor(tok, "qwen3_5", 56)
    cls = (
        transformers.Qwen3_5MoeForConditionalGeneration
        if moe
        else transformers.Qwen3_5ForConditionalGeneration
    )
    return tok, cls, config, processor, latent


def build_linear(
    family: str,
    attn_implementation: str = "eager",
    seed: int = 0,
    hidden: int = 64,
    k: int = 4,
    layer_types=None,
):
    """(model [float32, eval], processor, latent tokens) of a tiny random LINEAR_FAMILIES model."""
    if family in ("qwen3_5", "qwen3_5_moe"):
        moe = family == "qwen3_5_moe"
        tok, cls, config, processor, latent = _qwen3_5(hidden, k, layer_types or QWEN3_5_LAYERS, moe)
    elif family == "lfm2_vl":
        tok, cls, config, processor, latent = _lfm2_vl(hidden, k, layer_types or LFM2_LAYERS)
    else:
        raise ValueError(f"unknown family {family!r}")
    model = _instantiate(cls, config, tok, processor, seed, attn_implementation)
    with torch.no_grad():  # slow decay (A in [0.01, 0.1]): the state remembers across segments
        for module in model.modules():
            if hasattr(module, "A_log"):
                module.A_log.uniform_(-4.6, -2.3)
    if family == "qwen3_5_moe":
        model.set_experts_implementation("eager")  # the grouped-GEMM kernel has no float64
    return model.eval(), processor, latent


# LFM2-VL's chat format (facts, not its text): ChatML turns after a <|startoftext|> bos, an image
# written as <image> (the processor expands it into <|image_start|>, the image's tokens, <|image_end|>).
LFM2_VL_TEMPLATE = (
    "<|startoftext|>{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LFM2_VL_SPECIAL = ["<|startoftext|>", "<|image_start|>", "<|image_end|>", "<|img_thumbnail|>"]
LFM2_LAYERS = ("conv", "full_attention", "conv", "full_attention")


def _lfm2_vl(hidden: int, k: int, layer_types):
    """LFM2-VL: a one-layer SigLIP2 (NaFlex) tower with patch 8, 2 x 2 pixel unshuffle, 4 to 16
    tokens an image (no tiling); a text decoder of short-convolution and attention layers."""
    from transformers.models.lfm2_vl.image_processing_lfm2_vl import Lfm2VlImageProcessor

    tok = tokenizer(LFM2_VL_TEMPLATE, LFM2_VL_SPECIAL)
    latent = _latent(tok, k)
    text = {
        "model_type": "lfm2",
        **tiny_model.tiny_text_config(tok, hidden, len(layer_types), 512),
        "layer_types": list(layer_types),
        "conv_L_cache": 3,
        "block_auto_adjust_ff_dim": False,
        "block_ff_dim": 2 * hidden,
    }
    vision = {
        "model_type": "siglip2_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "patch_size": 8,
        "num_patches": 16,
    }
    config = transformers.Lfm2VlConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        projector_hidden_size=2 * hidden,
        downsample_factor=2,
        tie_word_embeddings=False,
    )
    image = Lfm2VlImageProcessor(
        encoder_patch_size=8,
        downsample_factor=2,
        min_image_tokens=4,
        max_image_tokens=16,
        do_image_splitting=False,
        use_thumbnail=False,
    )
    processor = transformers.Lfm2VlProcessor(image_processor=image, tokenizer=tok)
    return tok, transformers.Lfm2VlForConditionalGeneration, config, processor, latent


# ---- Gemma 4: KV-shared layers, per-layer inputs, image blocks on sliding layers (families/gemma4.py) ----

GEMMA4_SPECIAL = [
    "<bos>",
    "<|turn>",
    "<turn|>",
    "<|image>",
    "<image|>",
    "<|image|>",
    "<|audio>",
    "<audio|>",
    "<|audio|>",
]
# Gemma 4's chat format (facts, not its text): <bos>, turns "<|turn>ROLE\n ... <turn|>\n" with the
# assistant named "model" and the system prompt a turn of its own, an image written as one image
# placeholder (the processor expands it into <|image> image tokens <image|>).
GEMMA4_TEMPLATE = (
    "<bos>{% for m in messages %}<|turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<|image|>{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<turn|>\n{% endfor %}{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)
# Three layers of their own, then the KV-shared ones: a sliding one reading layer 1's keys and values
# and the full last layer (the alignment loss's) reading layer 2's, which depend on layer 0's image
# rows through a full layer (a window of 3 positions keeps image rows away from the answer rows).
GEMMA4_LAYERS = (
    "full_attention",
    "sliding_attention",
    "full_attention",
    "sliding_attention",
    "full_attention",
)
GEMMA4_KV_SHARED = 2


def gemma4_text_config(tok, hidden: int, layer_types, window: int, kv_shared: int, moe: bool = False) -> dict:
    """A tiny Gemma 4 text config with every feature the dual path must carry: KV-shared layers, full
    layers of their own head size whose values are their keys, per-layer inputs, image blocks on
    the sliding layers, a logit soft-cap; with `moe`, a mixture-of-experts block beside each MLP
    (4 experts, 2 per token: Gemma 4 26B-A4B's shape of layer)."""
    experts = {
        "enable_moe_block": True,
        "num_experts": 4,
        "top_k_experts": 2,
        "moe_intermediate_size": hidden,
    }
    return {
        **(experts if moe else {}),
        "model_type": "gemma4_text",
        "vocab_size": len(tok),
        "vocab_size_per_layer_input": len(tok),
        "hidden_size_per_layer_input": 8,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": len(layer_types),
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": hidden // 4,
        "global_head_dim": hidden // 2,
        "num_global_key_value_heads": 1,
        "attention_k_eq_v": True,
        "num_kv_shared_layers": kv_shared,
        "layer_types": list(layer_types),
        "sliding_window": window,
        "use_bidirectional_attention": "vision",
        "final_logit_softcapping": 3.0,
        "max_position_embeddings": 512,
        "pad_token_id": tok.pad_token_id,
        "attention_dropout": 0.0,
    }


def _gemma4(hidden: int, k: int, layer_types, window: int, kv_shared: int, moe: bool):
    """Gemma 4: a one-layer vision tower 32 wide, patch 4, pooled 2 x 2 (up to 70 image tokens an
    image after the processor's aspect-preserving resize); the real Gemma4Processor (its image, video
    and audio processors) around a word-level tokenizer holding Gemma 4's turn and media tokens."""
    from transformers import PreTrainedTokenizerFast
    from transformers.models.gemma4 import (
        Gemma4AudioFeatureExtractor,
        Gemma4ImageProcessor,
        Gemma4Processor,
        Gemma4VideoProcessor,
    )

    base = tiny_model.word_level_tokenizer([*WORDS, "model"], [*SPECIAL, *GEMMA4_SPECIAL], GEMMA4_TEMPLATE)
    named = {
        "image_token": "<|image|>",
        "boi_token": "<|image>",
        "eoi_token": "<image|>",
        "audio_token": "<|audio|>",
        "boa_token": "<|audio>",
        "eoa_token": "<audio|>",
    }
    tok = PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer,
        unk_token=base.unk_token,
        pad_token=base.pad_token,
        eos_token="<turn|>",
        extra_special_tokens=named,
        chat_template=GEMMA4_TEMPLATE,
    )
    patch, pooling = 4, 2
    media = {"patch_size": patch, "pooling_kernel_size": pooling, "max_soft_tokens": 70}
    processor = Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=Gemma4ImageProcessor(**media),
        tokenizer=tok,
        video_processor=Gemma4VideoProcessor(**media),
        image_seq_length=70,
    )
    latent = _latent(tok, k)  # after the processor, which adds its video token
    ids = tok.convert_tokens_to_ids
    config = transformers.Gemma4Config(
        text_config=gemma4_text_config(tok, hidden, layer_types, window, kv_shared, moe),
        vision_config={
            "model_type": "gemma4_vision",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "patch_size": patch,
            "pooling_kernel_size": pooling,
            "position_embedding_size": 64,
        },
        audio_config=None,
        boi_token_id=ids("<|image>"),
        eoi_token_id=ids("<image|>"),
        image_token_id=ids("<|image|>"),
        video_token_id=ids("<|video|>"),
        boa_token_id=ids("<|audio>"),
        eoa_token_index=ids("<audio|>"),
        audio_token_id=ids("<|audio|>"),
        tie_word_embeddings=True,
    )
    return tok, transformers.Gemma4ForConditionalGeneration, config, processor, latent


def build_gemma4(
    attn_implementation: str = "eager",
    seed: int = 0,
    hidden: int = 64,
    k: int = 4,
    layer_types=GEMMA4_LAYERS,
    window: int = GEMMA3_WINDOW,
    kv_shared: int = GEMMA4_KV_SHARED,
    moe: bool = False,
):
    """(model [float32, eval], processor, latent tokens) of a tiny random Gemma 4 (`moe`: with
    mixture-of-experts blocks)."""
    tok, cls, config, processor, latent = _gemma4(hidden, k, layer_types, window, kv_shared, moe)
    # The experts' loop in plain PyTorch: the default grouped matmul takes no float64.
    experts = {"experts_implementation": "eager"} if moe else {}
    model = _instantiate(cls, config, tok, processor, seed, attn_implementation, **experts)
    with torch.no_grad():
        # At the default initialisation the logits are so small that every token is about equally
        # likely, and the image features small beside the text: a wrong mask would hardly show.
        model.model.language_model.embed_tokens.weight.normal_(0.0, 0.3)  # tied to the LM head
        model.model.embed_vision.embedding_projection.weight.normal_(0.0, 0.5)
    return model.eval(), processor, latent
