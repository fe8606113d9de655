"""Gemma 4 on a tiny random model with its real processor (Gemma4Processor), float64: sliding and full
layers, KV-shared layers (a sliding one and the full last layer read earlier layers' keys and
values), per-layer inputs, full layers of their own head size whose values are their keys, image
blocks bidirectional on the sliding layers only, a logit soft-cap.

- the objective (its parts and every gradient) equals an eager forward whose dense 4-D masks are
  written here: the dual-path rule, the window counted on position ids and each image's block
  bidirectional inside its own path on the sliding layers, plain dual-path causal on the full ones;
  the KV-shared layers take the stock forward's shared keys and values under those masks;
- path 1 equals the stock model's own forward on [A, C, D, E] (its masks from mm_token_type_ids);
- the KV-shared layers are handed the storing layers' keys and values of the whole packed sequence;
- the run-time check passes; `python -m crystal_ext.train` trains and evaluates a saved folder."""

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
    gradient_pairs,
    objective_errors,
    register_dense_eager,
    relative_error,
)
from family_models import GEMMA3_WINDOW, build_gemma4
from test_families import _examples

import crystal_ext
from crystal_ext.data.packing import IGNORE, DualPathCollator, DualPathPacker
from crystal_ext.model import attention_registration
from crystal_ext.model.attention_registration import ATTN_IMPLEMENTATION, register_dual_path_attention
from crystal_ext.model.families import UnsupportedModel, classify, family_of
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


VARIANTS = ["dense", "moe"]


@functools.cache
def _setup(variant="dense"):
    register_dual_path_attention()
    model, processor, latent = build_gemma4(ATTN_IMPLEMENTATION, moe=variant == "moe")
    model = model.double()
    packer = DualPathPacker(processor, latent, model, system="you are a helpful assistant")
    batch = DualPathCollator(packer, processor.tokenizer.pad_token_id)(_examples())
    assert len(batch["keys"]) == 3
    return model, processor, cast_floats(batch, torch.float64)


def _image_tokens(model, batch):
    return batch["input_ids"] == model.config.image_token_id


def _dense_masks(model, batch):
    """{layer type: [B, 1, L, L] additive mask}: image blocks on the sliding layers only."""
    length = batch["input_ids"].shape[1]
    args = (batch["layout"], length, batch["position_ids"])
    window = model.config.text_config.sliding_window
    return {
        "full_attention": additive(dense_visibility(*args, None, None), model.dtype),
        "sliding_attention": additive(
            dense_visibility(*args, window, _image_tokens(model, batch)), model.dtype
        ),
    }


def _dense_eager_run(model, batch):
    return dense_eager_run(model, batch, _dense_masks(model, batch))


def _objective_errors(model, batch):
    ours_model = copy.deepcopy(model)
    ours = crystal_objective(ours_model, batch, REFERENCE_HEAD)
    ours.loss.backward()
    assert ours.kl_pred > 0 and ours.kl_attn > 0
    errors, pairs = objective_errors(ours, ours_model, *_dense_eager_run(model, batch), batch)
    return errors, pairs


def test_the_tiny_model_has_every_feature_under_test():
    model, _, batch = _setup()
    text = model.config.text_config
    assert text.kv_sharing_modes == [None, "store", "store", "reuse", "reuse"]
    assert text.layer_types[-1] == "full_attention" and text.attention_k_eq_v
    assert text.use_bidirectional_attention == "vision" and text.hidden_size_per_layer_input
    # The window cuts the paths and the image blocks; both paths hold images.
    assert batch["input_ids"].shape[1] > 3 * GEMMA3_WINDOW
    assert _image_tokens(model, batch).sum() > 4 * len(batch["keys"])
    assert classify(model.config) == ("tested", "Gemma4Family, tests/test_gemma4.py")


@pytest.mark.parametrize("variant", VARIANTS)
def test_objective_and_gradients_equal_the_dense_eager_forward(variant):
    model, _, batch = _setup(variant)
    errors, pairs = _objective_errors(model, batch)
    names = [n for n, _, _ in pairs]
    assert variant == "dense" or any("experts" in n for n in names)
    print(
        f"\ngemma4 {variant}: max relative error {max(errors):.1e} over the loss, its parts and {len(pairs)} gradients"
    )
    # The storing layers' key projections get gradients from the KV-shared layers too.
    assert any("layers.2.self_attn.k_proj" in n for n in names)
    assert any("embed_tokens_per_layer" in n for n in names) and any("embed_vision" in n for n in names)
    assert len(pairs) > 30 and max(errors) < 1e-6


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_row_equals_the_dense_eager_forward(variant):
    """The last hidden states of every row of both paths, image rows included (the loss reads the
    E/F rows only), equal the dense eager forward's."""
    model, _, batch = _setup(variant)
    with torch.no_grad():
        hidden, _ = dual_path_hidden(backbone_and_head(model)[1], batch)
        eager = copy.deepcopy(model)
        eager.set_attn_implementation(register_dense_eager())
        want = eager(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            attention_mask=_dense_masks(model, batch),
            use_cache=False,
            output_hidden_states=True,
            **batch["images"],
        ).hidden_states[-1]
    for b, seg in enumerate(segments_of(batch["layout"])):
        rows = slice(0, seg.f[1])
        assert relative_error(hidden[b, rows], want[b, rows]) < 1e-12


def test_kv_shared_layers_get_the_storing_layers_packed_keys_and_values(monkeypatch):
    """The stock forward hands a KV-shared layer the very k/v tensors of the last earlier layer of its
    type, over the whole packed sequence (so the dual path gathers both paths from them)."""
    model, _, batch = _setup()
    calls = []
    planned = attention_registration.dual_path_attention_planned

    def recording(q, k, v, plan, **kwargs):
        calls.append((k, v, kwargs["window"]))
        return planned(q, k, v, plan, **kwargs)

    monkeypatch.setattr(attention_registration, "dual_path_attention_planned", recording)
    with torch.no_grad():
        dual_path_hidden(backbone_and_head(model)[1], batch)
    assert len(calls) == 5
    length = batch["input_ids"].shape[1]
    assert all(k.shape[2] == length for k, _, _ in calls)
    for reader, writer in ((3, 1), (4, 2)):
        assert calls[reader][0] is calls[writer][0] and calls[reader][1] is calls[writer][1]
    assert [w for _, _, w in calls] == [None, GEMMA3_WINDOW, None, GEMMA3_WINDOW, None]


def test_path_masks_are_built_once_per_forward(monkeypatch):
    """The path-local masks are built once per forward for each window and image-block choice, not
    in every layer: here one choice (the sliding layers' window with image blocks) for two sliding
    layers, one mask per path; the full layers are plain causal and take none."""
    from crystal_ext.model import dual_path_attention as module

    model, _, batch = _setup()
    built = []
    path_mask = module.path_mask
    monkeypatch.setattr(module, "path_mask", lambda *args: built.append(args[2]) or path_mask(*args))
    with torch.no_grad():
        dual_path_hidden(backbone_and_head(model)[1], batch)
    assert model.config.text_config.layer_types.count("sliding_attention") == 2
    assert built == [GEMMA3_WINDOW, GEMMA3_WINDOW]


def test_activation_checkpointing_gives_the_same_gradients():
    """The recipes checkpoint activations: the storing layers are recomputed in the backward pass and
    the KV-shared layers' gradients still reach them."""
    model, _, batch = _setup()
    plain, checkpointed = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    recomputed = []
    k_proj = checkpointed.model.language_model.layers[2].self_attn.k_proj
    k_proj.register_forward_hook(lambda *args: recomputed.append(1))
    for m in (plain, checkpointed):
        crystal_objective(m, batch, REFERENCE_HEAD).loss.backward()
    assert len(recomputed) == 2  # the forward, and its recomputation in the backward pass
    pairs = gradient_pairs(checkpointed, plain)
    assert len(pairs) > 30 and max(relative_error(got, want) for _, got, want in pairs) < 1e-12


def _stock_single_path(model, single, **kwargs):
    """The stock model on ordinary sequences, with its SDPA attention and its own masks (image blocks
    on the sliding layers from mm_token_type_ids, 1 on the image tokens)."""
    stock = copy.deepcopy(model)
    stock.set_attn_implementation("sdpa")
    return stock(
        input_ids=single["input_ids"],
        attention_mask=single["attention_mask"],
        mm_token_type_ids=(single["input_ids"] == model.config.image_token_id).long(),
        **single["images"],
        **kwargs,
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_path1_equals_the_stock_forward(variant):
    """Rows A, C, D, E of the dual path hold the stock model's last hidden states of [A, C, D, E]."""
    model, _, batch = _setup(variant)
    single = intact_path_batch(batch)
    with torch.no_grad():
        hidden, _ = dual_path_hidden(backbone_and_head(model)[1], batch)
        want = _stock_single_path(model, single, output_hidden_states=True).hidden_states[-1]
    for b, seg in enumerate(segments_of(batch["layout"])):
        path1 = seg.path1()
        assert relative_error(hidden[b, path1], want[b, : len(path1)]) < 1e-12


def test_baseline_is_plain_sft_on_the_intact_path():
    model, _, batch = _setup()
    base = crystal_objective(model, batch, ObjectiveConfig(crystal=False, lm_head_losses="reference"))
    single = intact_path_batch(batch)
    logits = _stock_single_path(model, single).logits  # the model's own (soft-capped) logits
    want = Fn.cross_entropy(logits.flatten(0, 1), single["targets"].flatten(), ignore_index=IGNORE)
    assert relative_error(base.ce, want) < 1e-9


def test_lora_trains_the_vision_embedder_in_full():
    from crystal_ext.model.lora import apply_lora

    model, _, batch = _setup()
    assert family_of(model).trained_in_full(model) == ["model.embed_vision"]
    peft_model = apply_lora(copy.deepcopy(model).float())
    crystal_objective(peft_model, cast_floats(batch, torch.float32), REFERENCE_HEAD).loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    for part in ("vision_tower", "language_model"):
        assert any("lora_B" in n and part in n and g.abs().sum() > 0 for n, g in grads.items()), part
    assert any("modules_to_save" in n and "embed_vision" in n and g.abs().sum() > 0 for n, g in grads.items())


def test_every_text_token_bidirectional_is_refused():
    model, _, _ = _setup()
    config = copy.deepcopy(model.config)
    config.text_config.use_bidirectional_attention = "all"
    with pytest.raises(UnsupportedModel, match="use_bidirectional_attention='all'"):
        family_of(config)


def test_added_tokens_get_the_same_per_layer_inputs_in_training_and_after_a_reload():
    """The per-layer input rows that a vocabulary resize adds are zeros, not transformers' random
    draw, both where training adds the latent tokens and where a LoRA run is loaded again."""
    from crystal_ext.model.latent_tokens import add_latent_tokens, grow_vocabulary

    model, processor, _ = build_gemma4(k=1)
    base = copy.deepcopy(model)
    size = model.get_input_embeddings().weight.shape[0]
    original = model.get_per_layer_input_embeddings().weight.clone()
    add_latent_tokens(processor.tokenizer, model, k=3)  # two more latent tokens: the matrices grow
    grow_vocabulary(base, len(processor.tokenizer))  # crystal_ext.training.run_loading's resize
    trained, reloaded = (m.get_per_layer_input_embeddings().weight for m in (model, base))
    assert trained.shape[0] == size + 2 and torch.equal(trained, reloaded)
    assert trained[size:].eq(0).all() and torch.equal(trained[:size], original)


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_run_time_check_passes(variant):
    from crystal_ext.training.objective_check import check_objective

    register_dual_path_attention()
    model, processor, latent = build_gemma4("sdpa", moe=variant == "moe")  # loaded as train loads it
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    model.train()
    packer = DualPathPacker(processor, latent, model, system="you are a helpful assistant")
    report = check_objective(model, packer, _examples(), ObjectiveConfig(), count=3)
    print("\n" + report.summary())
    assert report.examples == ["a", "b", "c"] and not report.failures


@pytest.mark.parametrize("variant", VARIANTS)
def test_train_from_a_saved_folder_lowers_the_loss(variant, tmp_path, monkeypatch):
    import test_families_train

    def save_gemma4(family, folder):
        model, processor, _ = build_gemma4("sdpa", k=1, moe=variant == "moe")
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        return str(folder)

    monkeypatch.setattr(test_families_train, "save_family", save_gemma4)
    test_families_train.test_train_from_a_saved_folder_lowers_the_loss("gemma4", tmp_path)
