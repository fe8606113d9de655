"""Shared helpers of the dual-path tests: random layouts obeying the rules of docs/method.md."""

from __future__ import annotations

import random

import torch

from crystal_ext.ops.layout import segment_bounds


def random_layout(batch: int, rng: random.Random, max_seg: int = 6, pad: int = 3):
    """A random valid layout [batch, 6, 2] and the padded length it needs.

    Sizes: |A| >= 0, |B| = |C| >= 0, |D| >= 1, |E| = |F| >= 1; each sample padded by up to
    `pad` positions beyond the longest sample.
    """
    rows, ends = [], []
    for _ in range(batch):
        a, bc, d, e = (
            rng.randint(0, max_seg),
            rng.randint(0, max_seg),
            rng.randint(1, 4),
            rng.randint(1, max_seg),
        )
        row = segment_bounds([a, bc, bc, d, e, e])
        rows.append(row)
        ends.append(row[-1][1])
    length = max(ends) + rng.randint(0, pad)
    return torch.tensor(rows, dtype=torch.long), length


# ---- tiny offline models and tokenizers --------------------------------------------------

WORDS = [
    "system",
    "user",
    "assistant",
    "you",
    "are",
    "a",
    "helpful",
    "what",
    "is",
    "in",
    "the",
    "image",
    "?",
    "shape",
    "colour",
    "red",
    "green",
    "blue",
    "circle",
    "square",
    "triangle",
    "yes",
    "no",
    "how",
    "many",
    "one",
    "two",
    "three",
]
SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def tiny_tokenizer():
    """A word-level fast tokenizer with Qwen's chat and vision special tokens, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + ["<unk>"] + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()  # words, and "?" on its own
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", pad_token="<|endoftext|>", eos_token="<|im_end|>"
    )
    tok.add_special_tokens({"additional_special_tokens": SPECIAL[1:]})
    return tok


def tiny_qwen25vl(tokenizer, attn_implementation="eager", seed=0, hidden=64, layers=2, cls=None):
    """A randomly initialised Qwen2.5-VL (or Qwen2-VL with cls=...) of a few hundred k params."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    cls = cls or Qwen2_5_VLForConditionalGeneration
    config_cls = cls.config_class
    vocab = len(tokenizer)
    text = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [hidden // 16, hidden // 32, hidden // 32],
        },
        tie_word_embeddings=False,
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
    )
    vision = dict(
        depth=1,
        hidden_size=64,
        intermediate_size=128,
        num_heads=4,
        out_hidden_size=hidden,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
    )
    if config_cls is Qwen2_5_VLConfig:
        vision.update(fullatt_block_indexes=[0], window_size=56)
    else:  # Qwen2-VL's vision config names differ
        vision = dict(
            depth=1,
            embed_dim=64,
            hidden_size=hidden,
            num_heads=4,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
        )
    config = config_cls(
        text_config=text,
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = cls._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    return model.eval()
