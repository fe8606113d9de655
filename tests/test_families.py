"""Every supported family, on a tiny random model with its own processor: the objective through
the dual-path attention equals an eager forward with the dense 4-D dual-path mask and full
logits (value, its three parts, every gradient; float64); path-1 position ids equal the model's
own for the single-path sequence; unsupported models are refused with the reason."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as Fn
from dual_path_helpers import (
    cast_floats,
    dense_eager_run,
    gradient_pairs,
    objective_errors,
    relative_error,
)
from family_models import FAMILIES, SCALED_HEAD_FAMILIES, build
from PIL import Image

import crystal_ext
from crystal_ext.data.example import Example
from crystal_ext.data.packing import IGNORE, DualPathCollator, DualPathPacker
from crystal_ext.model.attention_registration import ATTN_IMPLEMENTATION, register_dual_path_attention
from crystal_ext.model.families import UnsupportedModel, family_of
from crystal_ext.model.objective import ObjectiveConfig, crystal_objective, intact_path_batch
from crystal_ext.model.parts import backbone_and_head
from crystal_ext.ops.layout import segments_of

pytestmark = pytest.mark.skipif(
    not crystal_ext.extension_available(), reason="the attention-alignment loss needs the compiled extension"
)
REFERENCE_HEAD = ObjectiveConfig(lm_head_losses="reference")


def _image(seed, w=40, h=50):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _examples():
    return [
        Example("a", _image(0), "what is the shape", "red circle"),
        Example(
            "b",
            [_image(1), _image(2, 60, 30)],
            "and the colour",
            "blue square",
            messages=[
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour"}]},
                {"role": "assistant", "content": "red"},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and the colour"}]},
            ],
        ),
        Example("c", _image(3, 30, 30), "how many", "two red square blue triangle green circle three"),
    ]


@functools.cache
def _setup(family):
    register_dual_path_attention()
    model, processor, latent = build(family, attn_implementation=ATTN_IMPLEMENTATION)
    model = model.double()
    packer = DualPathPacker(processor, latent, model, system="you are a helpful assistant")
    batch = DualPathCollator(packer, processor.tokenizer.pad_token_id)(_examples())
    assert len(batch["keys"]) == 3
    return model, processor, cast_floats(batch, torch.float64)


@pytest.mark.parametrize("family", FAMILIES)
def test_objective_and_gradients_equal_the_dense_eager_forward(family):
    model, _, batch = _setup(family)
    ours_model = copy.deepcopy(model)
    ours = crystal_objective(ours_model, batch, REFERENCE_HEAD)
    ours.loss.backward()
    assert ours.kl_pred > 0 and ours.kl_attn > 0
    errors, pairs = objective_errors(ours, ours_model, *dense_eager_run(model, batch), batch)
    print(
        f"\n{family}: max relative error {max(errors):.1e} over the loss, its parts and {len(pairs)} gradients"
    )
    assert len(pairs) > 10 and max(errors) < 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_path1_positions_equal_the_models_own(family):
    """The path-1 position ids of the packed sample equal what the stock model numbers the
    single-path sequence [A, C, D, E] with itself (M-RoPE models: their rope-index function on
    the processor's text types; others: 0, 1, 2, ...)."""
    model, _, batch = _setup(family)
    single = intact_path_batch(batch)
    base = backbone_and_head(model)[1]
    ids = single["input_ids"][:1, : int(single["attention_mask"][0].sum())]
    if hasattr(base, "get_rope_index"):
        from crystal_ext.model.families.qwen_vl import model_rope_index

        grid = single["images"]["image_grid_thw"][:1]
        want = model_rope_index(model)(ids, (ids == model.config.image_token_id).long(), grid)
        got = single["position_ids"][:, 0, : ids.shape[1]]
    else:
        want = torch.arange(ids.shape[1])
        got = single["position_ids"][0, : ids.shape[1]]
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_trains_the_projector_in_full(family):
    from crystal_ext.model.lora import apply_lora
    from crystal_ext.model.new_token_rows import attach_new_token_rows

    model, _, batch = _setup(family)
    peft_model = apply_lora(copy.deepcopy(model).float())
    vocab = peft_model.get_input_embeddings().weight.shape[0]
    rows = attach_new_token_rows(peft_model, list(range(vocab - 8, vocab)))
    crystal_objective(peft_model, cast_floats(batch, torch.float32), REFERENCE_HEAD).loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    full = family_of(model).trained_in_full(model)
    assert full
    assert any("lora_B" in n and g is not None and g.abs().sum() > 0 for n, g in grads.items())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in rows.parameters())
    assert any(
        "modules_to_save" in n and full[0] in n and g is not None and g.abs().sum() > 0
        for n, g in grads.items()
    )


@pytest.mark.parametrize(
    "model_type, reason",
    [("gemma3n", "sliding-window"), ("paligemma", "bidirectional"), ("mllama", "cross-attention")],
)
def test_unsupported_families_are_refused_with_the_reason(model_type, reason):
    from types import SimpleNamespace

    with pytest.raises(UnsupportedModel, match=rf"model_type '{model_type}' is not supported.*{reason}"):
        family_of(SimpleNamespace(model_type=model_type))


def test_an_unlisted_model_with_sliding_window_layers_is_refused():
    from types import SimpleNamespace

    config = SimpleNamespace(model_type="newvlm", layer_types=["sliding_attention", "full_attention"])
    with pytest.raises(UnsupportedModel, match="newvlm.*sliding_attention"):
        family_of(config)
    assert family_of(SimpleNamespace(model_type="newvlm2", layer_types=["full_attention"])).position_rows == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_baseline_is_plain_sft_on_the_intact_path(family):
    """--no_crystal: CE of the intact path [A, C, D, E] with the intact images alone equals the
    stock model's own forward (its own attention and its own position numbering)."""
    model, _, batch = _setup(family)
    base = crystal_objective(model, batch, ObjectiveConfig(crystal=False, lm_head_losses="reference"))
    single = intact_path_batch(batch)
    stock = copy.deepcopy(model)
    stock.set_attn_implementation("eager")
    extra = {}
    if hasattr(backbone_and_head(stock)[1], "get_rope_index"):
        extra["mm_token_type_ids"] = (single["input_ids"] == stock.config.image_token_id).long()
    logits = stock(
        input_ids=single["input_ids"], attention_mask=single["attention_mask"], **single["images"], **extra
    ).logits
    want = Fn.cross_entropy(logits.flatten(0, 1), single["targets"].flatten(), ignore_index=IGNORE)
    # 1e-8, not float64's 1e-15: GLM-4V's stock eager attention takes its softmax in float32 even
    # in a float64 model (1.6e-9 here with the sdpa side exact); a wrong position or mask is ~1e-2.
    assert relative_error(base.ce, want) < 1e-8 and base.kl_pred == 0 and base.kl_attn == 0


# ---- models whose forward transforms the LM head's output ----------------------------------------
# Aya Vision (Cohere text: logits * logit_scale) and Granite-Docling (logits / logits_scaling): the
# dense eager side above takes the stock model's own logits, so these comparisons fail on a bare head.


@pytest.mark.parametrize("family", SCALED_HEAD_FAMILIES)
def test_scaled_head_objective_and_gradients_equal_the_dense_eager_forward(family):
    test_objective_and_gradients_equal_the_dense_eager_forward(family)


@pytest.mark.parametrize("family", SCALED_HEAD_FAMILIES)
def test_scaled_head_baseline_is_plain_sft_on_the_intact_path(family):
    test_baseline_is_plain_sft_on_the_intact_path(family)


@pytest.mark.parametrize("family", SCALED_HEAD_FAMILIES)
def test_scaled_head_path1_positions_equal_the_models_own(family):
    test_path1_positions_equal_the_models_own(family)


def _path1_ce_and_stock_loss(model, batch, config):
    """(the objective's CE with the targets of F dropped, i.e. over path 1's targeted rows; the
    stock model's own loss on [A, C, D, E] with labels on those rows, and the same cross entropy
    on its logits in float64: its loss function upcasts the logits to float32 only)."""
    targets = batch["targets"].clone()
    for b, seg in enumerate(segments_of(batch["layout"])):
        targets[b, seg.f[0] : seg.f[1]] = IGNORE
    ours = crystal_objective(copy.deepcopy(model), {**batch, "targets": targets}, config)
    single = intact_path_batch(batch)
    assert (single["targets"][:, -1] == IGNORE).all()
    # Row r is trained on targets[r]; the stock loss shifts its labels by one.
    labels = Fn.pad(single["targets"][:, :-1], (1, 0), value=IGNORE)
    stock = copy.deepcopy(model)
    stock.set_attn_implementation("eager")
    out = stock(
        input_ids=single["input_ids"],
        attention_mask=single["attention_mask"],
        labels=labels,
        **single["images"],
    )
    shifted = Fn.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)
    return ours.ce, out.loss, shifted


@pytest.mark.parametrize("lm_head", ["fused", "reference"])
@pytest.mark.parametrize("family", SCALED_HEAD_FAMILIES)
def test_scaled_head_path1_ce_equals_the_stock_forward_loss(family, lm_head):
    model, _, batch = _setup(family)
    transform = family_of(model).logit_transform(model.config)
    assert transform.scale != 1.0
    ce, stock_loss, stock_ce = _path1_ce_and_stock_loss(model, batch, ObjectiveConfig(lm_head_losses=lm_head))
    assert relative_error(ce, stock_loss) < 1e-6 and relative_error(ce, stock_ce) < 1e-9


@pytest.mark.parametrize("family", SCALED_HEAD_FAMILIES)
def test_scaled_head_comparison_fails_on_the_bare_head(family, monkeypatch):
    """The comparison above has teeth: with the head's output taken as the logits, the path-1 CE
    is far from the stock model's loss."""
    from crystal_ext.model.families.logits import LogitTransform

    model, _, batch = _setup(family)
    monkeypatch.setattr(type(family_of(model)), "logit_transform", lambda self, config: LogitTransform())
    ce, stock_loss, _ = _path1_ce_and_stock_loss(model, batch, ObjectiveConfig(lm_head_losses="fused"))
    assert relative_error(ce, stock_loss) > 1e-3  # a thousand times the tolerance above


@pytest.mark.parametrize("family", SCALED_HEAD_FAMILIES)
def test_scaled_head_fused_objective_equals_the_reference_objective(family):
    model, _, batch = _setup(family)
    runs = []
    for lm_head in ("fused", "reference"):
        ours = copy.deepcopy(model)
        loss = crystal_objective(ours, batch, ObjectiveConfig(lm_head_losses=lm_head))
        loss.loss.backward()
        runs.append((loss, ours))
    (fused, fused_model), (ref, ref_model) = runs
    for got, want in zip((fused.ce, fused.kl_pred, fused.loss), (ref.ce, ref.kl_pred, ref.loss)):
        assert relative_error(got, want) < 1e-8  # KL_pred is ~1e-5 here: its formula cancels
    pairs = gradient_pairs(fused_model, ref_model)
    assert len(pairs) > 10 and max(relative_error(got, want) for _, got, want in pairs) < 1e-8
