"""Tiny random models of every supported family, each with its own processor built in code (a
word-level tokenizer carrying a chat template): no downloads."""

from __future__ import annotations

import torch

FAMILIES = (
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "qwen3_vl_moe",
    "llava_onevision",
    "idefics3",
    "smolvlm",
)

SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<image>",
    "<video>",
    "<fake_token_around_image>",
    "<global-img>",
    "<end_of_utterance>",
]
WORDS = (
    "system user assistant System User Assistant : you are a helpful what is in the image ? shape "
    "colour red green blue circle square triangle yes no how many one two three and which"
).split()

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


def tokenizer(template: str | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + ["<unk>"] + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", pad_token="<|endoftext|>", eos_token="<|im_end|>"
    )
    tok.add_special_tokens({"additional_special_tokens": SPECIAL[1:]})
    if template:
        tok.chat_template = template
    return tok


def _text(tok, hidden=64, layers=2, **extra):
    ids = tok.convert_tokens_to_ids
    return dict(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
        **extra,
    )


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
    import transformers

    ids = tok.convert_tokens_to_ids
    common = dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    mrope = [hidden // 16, hidden // 32, hidden // 32]
    if family == "qwen2_vl":
        text = _text(
            tok, hidden, rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": mrope}
        )
        vision = dict(depth=1, embed_dim=64, hidden_size=hidden, num_heads=4, mlp_ratio=2, patch_size=14)
        return transformers.Qwen2VLForConditionalGeneration, transformers.Qwen2VLConfig(
            text_config=text, vision_config=vision, **common
        )
    if family == "qwen2_5_vl":
        text = _text(
            tok, hidden, rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": mrope}
        )
        vision = dict(
            depth=1,
            hidden_size=64,
            intermediate_size=128,
            num_heads=4,
            out_hidden_size=hidden,
            patch_size=14,
            fullatt_block_indexes=[0],
            window_size=56,
        )
        return transformers.Qwen2_5_VLForConditionalGeneration, transformers.Qwen2_5_VLConfig(
            text_config=text, vision_config=vision, **common
        )
    rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": mrope, "mrope_interleaved": True}
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


def _llava_onevision(tok, hidden: int):
    import transformers
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
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": side,
            "patch_size": patch,
        },
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
    import transformers

    side, patch = 32, 8
    ids = tok.convert_tokens_to_ids
    cfg_cls = transformers.SmolVLMConfig if smol else transformers.Idefics3Config
    config = cfg_cls(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": side,
            "patch_size": patch,
        },
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
    else:
        raise ValueError(f"unknown family {family!r}")
    processor.chat_template = tok.chat_template
    torch.manual_seed(seed)
    model = cls._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    if family == "qwen3_vl_moe":
        model.set_experts_implementation("eager")  # the grouped-GEMM kernel has no float64
    return model.eval(), processor, latent
