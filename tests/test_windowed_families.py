"""Families with sliding-window layers, on tiny random models with their real processors, float64:
Gemma 3 (Gemma3Processor; sliding layers and bidirectional image blocks) and Aya Vision with Aya
Vision 8B's Cohere2 text model (AyaVisionProcessor; sliding layers with rotary positions, full
layers without).

- the objective (its parts and every gradient) equals an eager forward whose dense 4-D masks are
  written here: the dual-path rule, the window counted on position ids (sliding layers), each
  image's block bidirectional inside its own path, Gemma 3 (dual_path_helpers.dense_visibility);
- path 1 equals the stock model's own forward on [A, C, D, E] (the stock model builds its masks,
  Gemma 3's from token_type_ids), and the single-path baseline its loss;
- in every gathered path the path-local index is the position id (the window's premise);
- a sliding last layer is accepted only while the window hides no key from an E or F row."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as Fn
from dual_path_helpers import (
    additive,
    cast_floats,
    dense_eager_run,
    dense_visibility,
    objective_errors,
    relative_error,
)
from family_models import GEMMA3_WINDOW, WINDOWED_FAMILIES, build_windowed
from test_families import _examples

import crystal_ext
from crystal_ext.data.packing import IGNORE, DualPathCollator, DualPathPacker
from crystal_ext.model.attention_registration import ATTN_IMPLEMENTATION, register_dual_path_attention
from crystal_ext.model.dual_path_attention import path_indices
from crystal_ext.model.families import UnsupportedModel, family_of
from crystal_ext.model.objective import (
    ObjectiveConfig,
    crystal_objective,
    dual_path_hidden,
    intact_path_batch,
)
from crystal_ext.model.parts import backbone_and_head
from crystal_ext.ops.layout import segments_of

pytestmark = pytest.mark.skipif(
    not crystal_ext.extension_available(), reason="the attention-alignment loss needs the compiled extension"
)
REFERENCE_HEAD = ObjectiveConfig(lm_head_losses="reference")


@functools.cache
def _setup(family, layer_types=None, window=GEMMA3_WINDOW):
    register_dual_path_attention()
    kw = {} if layer_types is None else {"layer_types": layer_types}
    model, processor, latent = build_windowed(family, ATTN_IMPLEMENTATION, window=window, **kw)
    model = model.double()
    packer = DualPathPacker(processor, latent, model, system="you are a helpful assistant")
    batch = DualPathCollator(packer, processor.tokenizer.pad_token_id)(_examples())
    assert len(batch["keys"]) == 3
    return model, processor, cast_floats(batch, torch.float64)


def _blocks(model) -> bool:
    """Whether the model's image tokens attend to each other bidirectionally (Gemma 3's do)."""
    return model.config.model_type == "gemma3"


def _image_tokens(model, batch):
    return batch["input_ids"] == model.config.image_token_id if _blocks(model) else None


def _dense_masks(model, batch):
    """{layer type: [B, 1, L, L] additive mask}: the dense rule of each layer type."""
    length = batch["input_ids"].shape[1]
    args = (batch["layout"], length, batch["position_ids"])
    image = _image_tokens(model, batch)
    text = model.config.text_config
    return {
        "full_attention": additive(dense_visibility(*args, None, image), model.dtype),
        "sliding_attention": additive(dense_visibility(*args, text.sliding_window, image), model.dtype),
    }


def _dense_eager_run(model, batch):
    return dense_eager_run(model, batch, _dense_masks(model, batch))


def _objective_errors(model, batch):
    ours_model = copy.deepcopy(model)
    ours = crystal_objective(ours_model, batch, REFERENCE_HEAD)
    ours.loss.backward()
    assert ours.kl_pred > 0 and ours.kl_attn > 0
    errors, pairs = objective_errors(ours, ours_model, *_dense_eager_run(model, batch), batch)
    return errors, len(pairs)


@pytest.mark.parametrize("family", WINDOWED_FAMILIES)
def test_objective_and_gradients_equal_the_dense_eager_forward(family):
    model, _, batch = _setup(family)
    # The window cuts the paths, and both paths hold image blocks where the model has them.
    assert batch["input_ids"].shape[1] > 3 * GEMMA3_WINDOW
    assert not _blocks(model) or _image_tokens(model, batch).any()
    errors, pairs = _objective_errors(model, batch)
    print(f"\n{family}: max relative error {max(errors):.1e} over the loss, its parts and {pairs} gradients")
    assert pairs > 10 and max(errors) < 1e-6


@pytest.mark.parametrize("family", WINDOWED_FAMILIES)
def test_path_local_index_is_the_position(family):
    """The premise of counting the window on path-local indices: in both gathered paths of every
    packed sample, slot i holds position id i."""
    _, _, batch = _setup(family)
    samples = segments_of(batch["layout"])
    idx1, idx2, _ = path_indices(samples, batch["input_ids"].shape[1])
    for b, seg in enumerate(samples):
        n = len(seg.path1())
        for idx in (idx1, idx2):
            assert torch.equal(batch["position_ids"][b, idx[b, :n]], torch.arange(n))


def _stock_single_path(model, single, **kwargs):
    """The stock model on ordinary sequences, with its SDPA attention (Gemma 3's eager one takes the
    softmax in float32) and its own masks (Gemma 3's from token_type_ids, 1 on the image tokens)."""
    stock = copy.deepcopy(model)
    stock.set_attn_implementation("sdpa")
    if _blocks(model):
        kwargs["token_type_ids"] = (single["input_ids"] == model.config.image_token_id).long()
    return stock(
        input_ids=single["input_ids"],
        attention_mask=single["attention_mask"],
        **single["images"],
        **kwargs,
    )


@pytest.mark.parametrize("family", WINDOWED_FAMILIES)
def test_path1_equals_the_stock_forward(family):
    """The dual path's rows A, C, D, E hold the stock model's last hidden states of [A, C, D, E],
    with the stock model's own sliding (and image-block) masks."""
    model, _, batch = _setup(family)
    single = intact_path_batch(batch)
    with torch.no_grad():
        hidden, _ = dual_path_hidden(backbone_and_head(model)[1], batch)
        want = _stock_single_path(model, single, output_hidden_states=True).hidden_states[-1]
    for b, seg in enumerate(segments_of(batch["layout"])):
        path1 = seg.path1()
        assert relative_error(hidden[b, path1], want[b, : len(path1)]) < 1e-12


@pytest.mark.parametrize("family", WINDOWED_FAMILIES)
def test_baseline_is_plain_sft_on_the_intact_path(family):
    model, _, batch = _setup(family)
    base = crystal_objective(model, batch, ObjectiveConfig(crystal=False, lm_head_losses="reference"))
    single = intact_path_batch(batch)
    logits = _stock_single_path(model, single).logits  # the model's own (scaled) logits
    want = Fn.cross_entropy(logits.flatten(0, 1), single["targets"].flatten(), ignore_index=IGNORE)
    assert relative_error(base.ce, want) < 1e-9


LAST_SLIDING = ("sliding_attention", "full_attention", "sliding_attention")


@pytest.mark.parametrize("family", WINDOWED_FAMILIES)
def test_a_sliding_last_layer_whose_window_cuts_a_path_is_refused(family):
    model, _, batch = _setup(family, LAST_SLIDING)
    with pytest.raises(NotImplementedError, match="last text layer is a sliding-window layer"):
        crystal_objective(copy.deepcopy(model), batch, REFERENCE_HEAD)


@pytest.mark.parametrize("family", WINDOWED_FAMILIES)
def test_a_sliding_last_layer_whose_window_covers_the_paths_is_exact(family):
    window = 96
    model, _, batch = _setup(family, LAST_SLIDING, window=window)
    assert batch["input_ids"].shape[1] <= window
    errors, pairs = _objective_errors(model, batch)
    assert pairs > 10 and max(errors) < 1e-6


@pytest.mark.parametrize("family", WINDOWED_FAMILIES)
def test_lora_trains_the_projector_in_full(family):
    from crystal_ext.model.lora import apply_lora

    model, _, batch = _setup(family)
    full = family_of(model).trained_in_full(model)
    assert full == ["model.multi_modal_projector"]
    peft_model = apply_lora(copy.deepcopy(model).float())
    crystal_objective(peft_model, cast_floats(batch, torch.float32), REFERENCE_HEAD).loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("lora_B" in n and "vision_tower" in n and g.abs().sum() > 0 for n, g in grads.items())
    assert any("lora_B" in n and "language_model" in n and g.abs().sum() > 0 for n, g in grads.items())
    assert any(
        "modules_to_save" in n and "multi_modal_projector" in n and g.abs().sum() > 0
        for n, g in grads.items()
    )


def test_gemma3_bidirectional_text_is_refused():
    model, _, _ = _setup("gemma3")
    config = copy.deepcopy(model.config)
    config.text_config.use_bidirectional_attention = True
    with pytest.raises(UnsupportedModel, match="use_bidirectional_attention"):
        family_of(config)
