"""One whole CrystaL training step (forward + backward, all three losses) on small models of the
families with sliding-window layers: Gemma 3 (5 sliding : 1 full, image blocks on every layer),
Gemma 4 (sliding and full layers, two KV-shared layers, per-layer inputs, image blocks on the
sliding layers) and Aya Vision's Cohere2 text (sliding and full layers, no image blocks, a logit scale).
Each against, in the same run:
  - the single-path SFT step on [A, C, D, E] (goal: the dual-path step at most 2.0x its time);
  - the published way: every layer under a dense [B, 1, L, L] additive mask of its layer type
    (window on positions and image blocks written in, built once outside the step as the
    published Dataset does), the last layer's full [B, H, L, L] probabilities, the full logits.

Run: pytest benchmarks/test_windowed_family_step.py --benchmark-only -s
Shapes: text hidden 512 (4 heads of 128; Gemma 4's full layers 256), 6 layers, window 128 (it cuts
every path), the tests' tiny vision towers and word-level tokenizers; one sample of about 600 packed
tokens. Times: the fastest of 4 interleaved rounds of the three ways. The goal is reported, not
asserted: on this scale the vision tower and the LM head are small, so the ratios are mostly the
text layers'.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import step_models  # noqa: F401  (puts tests/ on the path)
import torch
from bench_utils import median_seconds, require_fused_ops
from dual_path_helpers import additive, dense_visibility, plain_losses
from family_models import TASK_WORDS, build_gemma4, build_windowed
from PIL import Image
from published_step import PROBS_KWARG, register_published_attention
from step_models import peak_step_bytes, run_step

import crystal_ext
from crystal_ext.data.packing import DualPathCollator, DualPathPacker, Example
from crystal_ext.model.objective import CrystalLoss, ObjectiveConfig, crystal_objective
from crystal_ext.model.parts import text_config

FAMILIES = ["gemma3", "gemma4", "aya_vision_cohere2"]
HIDDEN, WINDOW, QUESTION, ANSWER, ROUNDS = 512, 128, 180, 90, 4
LAYERS = {
    "gemma3": ("sliding_attention",) * 5 + ("full_attention",),
    # Layers 4 and 5 reuse the keys and values of layers 3 and 2.
    "gemma4": ("sliding_attention", "sliding_attention", "full_attention") * 2,
    # Cohere2 alternates 3 sliding : 1 full over 32 layers; 6 layers here, the last one full.
    "aya_vision_cohere2": ("sliding_attention", "sliding_attention", "full_attention") * 2,
}
DUAL_PATH_PRICE = 2.0


def _words(n, seed):
    return " ".join(np.random.default_rng(seed).choice(TASK_WORDS[4:], size=n))


@functools.cache
def prepared(family):
    crystal_ext.register_dual_path_attention()
    attn = crystal_ext.ATTN_IMPLEMENTATION
    shape = {"hidden": HIDDEN, "k": 8, "layer_types": LAYERS[family], "window": WINDOW}
    if family == "gemma4":
        model, processor, latent = build_gemma4(attn, **shape)
    else:
        model, processor, latent = build_windowed(family, attn, **shape)
    model.train()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    packer = DualPathPacker(processor, latent, model, max_length=4096)
    example = Example("ex0", image, _words(QUESTION, 0), _words(ANSWER, 100))
    batch = DualPathCollator(packer, processor.tokenizer.pad_token_id)([example])
    return model, batch, _dense_masks(model, batch)


def _dense_masks(model, batch):
    """{layer type: [B, 1, L, L] additive mask}: the published way's masks for this family."""
    text = text_config(model)
    length = batch["input_ids"].shape[1]
    images = batch["input_ids"] == model.config.image_token_id
    kind = model.config.model_type
    full_blocks = images if kind == "gemma3" else None  # Gemma 4: sliding layers only
    sliding_blocks = images if kind in ("gemma3", "gemma4") else None  # Cohere2: none
    args = (batch["layout"], length, batch["position_ids"])
    return {
        "full_attention": additive(dense_visibility(*args, None, full_blocks), model.dtype),
        "sliding_attention": additive(
            dense_visibility(*args, text.sliding_window, sliding_blocks), model.dtype
        ),
    }


def ours(model, batch):
    return crystal_objective(model, batch)


def baseline(model, batch):
    return crystal_objective(model, batch, ObjectiveConfig(crystal=False))


def published(model, batch, masks) -> CrystalLoss:
    """The published way (module docstring) on the same model and batch, same losses."""
    previous = text_config(model)._attn_implementation
    model.set_attn_implementation(register_published_attention())
    try:
        slot: dict = {}
        logits = model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            attention_mask=masks,
            use_cache=False,
            **batch["images"],
            **{PROBS_KWARG: slot},
        ).logits.float()  # the model's own logits, soft-capped where its forward soft-caps them
        ce, kl_pred, kl_attn = plain_losses(logits, None, None, batch, None, probs=slot["probs"])
    finally:
        model.set_attn_implementation(previous)
    return CrystalLoss(ce + kl_pred + kl_attn, ce, kl_pred, kl_attn)


@pytest.mark.parametrize("family", FAMILIES)
def test_dual_path_vs_single_path_and_published(benchmark, family):
    require_fused_ops()
    model, batch, masks = prepared(family)
    with torch.no_grad():  # both ways compute the same loss, part by part
        got, want = ours(model, batch), published(model, batch, masks)
    for name in ("loss", "ce", "kl_pred", "kl_attn"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-4, atol=1e-5)
    run_dual = lambda: run_step(ours, model, batch)  # noqa: E731
    run_single = lambda: run_step(baseline, model, batch)  # noqa: E731
    run_published = lambda: run_step(lambda m, b: published(m, b, masks), model, batch)  # noqa: E731
    benchmark.group = f"windowed family step {family}"
    benchmark.pedantic(run_dual, rounds=ROUNDS, warmup_rounds=1)
    if benchmark.disabled:
        return
    run_single()
    run_published()
    # Interleaved rounds, fastest of each: the development machine is shared, and a burst of
    # another job's load then slows one round of every way instead of all rounds of one way.
    rounds = [[median_seconds(f, 1) for f in (run_dual, run_single, run_published)] for _ in range(ROUNDS)]
    dual_s, single_s, published_s = (min(r[i] for r in rounds) for i in range(3))
    peaks = {
        name: peak_step_bytes(fn, model, batch)
        for name, fn in (
            ("dual", ours),
            ("single", baseline),
            ("published", lambda m, b: published(m, b, masks)),
        )
    }
    info = {
        "length": batch["input_ids"].shape[1],
        "dual_s": round(dual_s, 3),
        "single_s": round(single_s, 3),
        "published_s": round(published_s, 3),
        "dual_over_single": round(dual_s / single_s, 2),
        "published_over_dual": round(published_s / dual_s, 2),
        **{f"{name}_peak_MB": round(b / 2**20, 1) for name, b in peaks.items()},
        "dual_path_goal_met": dual_s / single_s <= DUAL_PATH_PRICE,
    }
    benchmark.extra_info.update(info)
    print(f"\n{family}: {info}")
