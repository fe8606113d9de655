"""One whole CrystaL training step on models with linear-attention layers (Qwen3.5, Qwen3.5-MoE)
and with short-convolution layers (LFM2-VL): the dual-path step (each linear layer scanned once per
path, A's whole 64-token chunks once for both; each convolution layer run on each whole path:
crystal_ext.model.path_scan; attention layers through the dual-path attention) against the
single-path SFT step, measured in the same run.

Run: pytest benchmarks/test_linear_family_step.py --benchmark-only -s
(on a shared CPU, OMP_NUM_THREADS=1 keeps other work from stretching the steps' parallel regions).
Shape: a small Qwen3.5 (hidden 1024; 3 Gated DeltaNet layers with 8 key / 16 value heads of 64
and a 4-tap convolution, then 1 full-attention layer with 8 heads / 2 kv heads of 128; vocabulary
32,768, embedding and LM head frozen), one 448 x 448 image (196 visual tokens after the 2 x 2
merge), |E| = |F| = 45: L = 556 with no system prompt (|A| = 2: nothing of A is shared), L = 759
with a 200-word one (|A| = 205: 192 tokens scanned once). LFM2-VL and Qwen3.5-MoE: the tests' tiny
models (tests/family_models.py build_linear) at hidden 512 (LFM2-VL: conv, conv, attention twice,
3-tap convolutions; Qwen3.5-MoE: 3 linear + 1 attention layers with the tests' experts), a 64 x 64
image, 180 question and 90 answer words (L about 600). On CPUs transformers runs its torch
fallbacks of the linear layer's kernels (the `fla` / `causal_conv1d` packages are not installed),
in both steps alike. Target: the dual-path step at most 2.0x the time of the single-path step, the
median of the ratios of interleaved rounds (asserted only when benchmarking is enabled).
"""

from __future__ import annotations

import functools
import statistics

import numpy as np
import pytest
import step_models
import torch
from bench_utils import median_seconds, require_fused_ops
from family_models import QWEN_TEMPLATE, TASK_WORDS, _qwen_processor, build_linear, tokenizer
from step_models import peak_step_bytes, run_step

import crystal_ext
from crystal_ext.data.packing import DualPathCollator, DualPathPacker, Example
from crystal_ext.model.latent_tokens import add_latent_tokens
from crystal_ext.model.objective import ObjectiveConfig, crystal_objective
from crystal_ext.training import tiny_model

ROUNDS = 5
DUAL_PATH_PRICE = 2.0
IMAGE, QUESTION, ANSWER = 448, 25, 42


def small_qwen3_5(tok, hidden=1024, vocab=32768):
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    rope = {
        "rope_type": "default",
        "rope_theta": 1e7,
        "partial_rotary_factor": 0.25,
        "mrope_section": [6, 5, 5],
        "mrope_interleaved": True,
    }
    text = {
        **tiny_model.tiny_text_config(tok, hidden, 4, 32768, vocab_size=vocab, intermediate_size=2 * hidden),
        "model_type": "qwen3_5_text",
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 128,
        "rope_parameters": rope,
        "layer_types": ["linear_attention"] * 3 + ["full_attention"],
        "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 64,
        "linear_value_head_dim": 64,
        "linear_num_key_heads": 8,
        "linear_num_value_heads": 16,
    }
    vision = dict(
        depth=1,
        hidden_size=64,
        intermediate_size=128,
        num_heads=4,
        out_hidden_size=hidden,
        patch_size=16,
        num_position_embeddings=64,
    )
    config = Qwen3_5Config(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=False,
        **tiny_model.qwen_vision_token_ids(tok),
    )
    torch.manual_seed(0)
    model = Qwen3_5ForConditionalGeneration._from_config(
        config, attn_implementation=crystal_ext.ATTN_IMPLEMENTATION, dtype=torch.float32
    )
    model.get_input_embeddings().weight.requires_grad_(False)
    model.get_output_embeddings().weight.requires_grad_(False)
    return model.train()


@functools.cache
def prepared(system_words=0):
    crystal_ext.register_dual_path_attention()
    tok = tokenizer(QWEN_TEMPLATE)
    latent = add_latent_tokens(tok, None, k=10)
    model = small_qwen3_5(tok)
    processor = _qwen_processor(tok, "qwen3_5", IMAGE)
    processor.chat_template = tok.chat_template
    system = step_models._words(system_words, 7) if system_words else None
    packer = DualPathPacker(processor, latent, model, image_size=IMAGE, max_length=4096, system=system)
    example = Example(
        "ex0", step_models._image(0, IMAGE), step_models._words(QUESTION, 0), step_models._words(ANSWER, 100)
    )
    return model, DualPathCollator(packer, tok.pad_token_id)([example])


LFM2_LAYERS = ("conv", "conv", "full_attention") * 2


@functools.cache
def prepared_tiny(family):
    """The tests' tiny model of `family` at hidden 512 (LFM2-VL: LFM2_LAYERS; Qwen3.5-MoE: its
    3 linear + 1 attention layers with the tests' experts) with a 64 x 64 image."""
    crystal_ext.register_dual_path_attention()
    layers = LFM2_LAYERS if family == "lfm2_vl" else None
    model, processor, latent = build_linear(
        family, crystal_ext.ATTN_IMPLEMENTATION, hidden=512, k=8, layer_types=layers
    )
    for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
        emb.weight.requires_grad_(False)
    words = lambda n, seed: " ".join(np.random.default_rng(seed).choice(TASK_WORDS[4:], size=n))  # noqa: E731
    packer = DualPathPacker(processor, latent, model, max_length=4096)
    example = Example("ex0", step_models._image(0, 64), words(180, 0), words(90, 100))
    return model.train(), DualPathCollator(packer, processor.tokenizer.pad_token_id)([example])


def dual(model, batch):
    return crystal_objective(model, batch)


def single(model, batch):
    return crystal_objective(model, batch, ObjectiveConfig(crystal=False))


CASES = {
    "short_a": "qwen3_5 small, 0-word system prompt",
    "long_a": "qwen3_5 small, 200-word system prompt",
    "lfm2_vl": "lfm2_vl small",
    "qwen3_5_moe": "qwen3_5_moe tiny",
}


@pytest.mark.parametrize("case", list(CASES))
def test_linear_family_dual_path_vs_single_path(benchmark, case):
    require_fused_ops()
    if case in ("lfm2_vl", "qwen3_5_moe"):
        model, batch = prepared_tiny(case)
    else:
        model, batch = prepared(200 if case == "long_a" else 0)
    run_dual = lambda: run_step(dual, model, batch)  # noqa: E731
    run_single = lambda: run_step(single, model, batch)  # noqa: E731
    benchmark.group = f"crystal step {CASES[case]}"
    benchmark.pedantic(run_dual, rounds=2, warmup_rounds=1)
    if benchmark.disabled:
        return
    # Interleaved rounds, the ratio taken within each round: a shared machine's load changes
    # between rounds, and a round's two steps see about the same load.
    run_single()
    pairs = [(median_seconds(run_dual, 1), median_seconds(run_single, 1)) for _ in range(ROUNDS)]
    dual_s = statistics.median(d for d, _ in pairs)
    single_s = statistics.median(s for _, s in pairs)
    ratio = statistics.median(d / s for d, s in pairs)
    dual_peak, single_peak = peak_step_bytes(dual, model, batch), peak_step_bytes(single, model, batch)
    info = {
        "length": batch["input_ids"].shape[1],
        "a_tokens": int(batch["layout"][0, 0, 1]),
        "dual_s": round(dual_s, 3),
        "single_s": round(single_s, 3),
        "time_ratio": round(ratio, 2),
        "dual_peak_MB": round(dual_peak / 2**20, 1),
        "single_peak_MB": round(single_peak / 2**20, 1),
    }
    benchmark.extra_info.update(info)
    print(f"\ndual vs single path {CASES[case]}: {info}")
    assert info["time_ratio"] <= DUAL_PATH_PRICE, info


if __name__ == "__main__":
    pytest.main([__file__, "--benchmark-only", "-s"])
