"""A stock tiny Qwen2.5-VL through crystal_dual_path vs the same model run eager with the
explicit dense dual-path mask; the objective's parts vs a plain composition of the formulas."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as Fn
from dual_path_helpers import cast_floats, dense_mask_forward, gradient_pairs, plain_losses
from family_models import build
from PIL import Image

import crystal_ext
from crystal_ext.data.packing import IGNORE, DualPathCollator, DualPathPacker, Example
from crystal_ext.model.attention_registration import ATTN_IMPLEMENTATION, register_dual_path_attention
from crystal_ext.model.objective import ObjectiveConfig, crystal_objective, intact_path_batch
from crystal_ext.model.parts import embedding_and_head_weights

REFERENCE_HEAD = ObjectiveConfig(lm_head_losses="reference")

pytestmark = pytest.mark.skipif(
    not crystal_ext.extension_available(),
    reason="the fused attention-alignment loss needs the compiled extension",
)


def _image(seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 50, 3), dtype=np.uint8))


@functools.cache
def _setup(family="qwen2_5_vl"):
    register_dual_path_attention()
    model, processor, lat = build(family, attn_implementation=ATTN_IMPLEMENTATION)
    tok = processor.tokenizer
    packer = DualPathPacker(processor, lat, model, image_size=56, system="you are a helpful assistant")
    batch = DualPathCollator(packer, tok.pad_token_id)(
        [
            Example("a", _image(0), "what is the shape", "red circle"),
            Example("b", _image(1), "how many", "two red square blue triangle green circle three"),
            Example("c", _image(2), "what colour", "blue"),
        ]
    )
    return model, batch


def _eager_run(model, batch):
    """The stock model, eager attention, the dense dual-path mask as a 4-D additive mask; returns
    (last hidden states, last layer's rotated q and k) without any crystal_ext code in the forward."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as mq

    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    captured = {}
    last = eager.model.language_model.layers[-1].self_attn

    def grab(module, args, kwargs):  # recompute q, k exactly as the layer does (q/k are not exposed)
        h = kwargs["hidden_states"]
        b, n, _ = h.shape
        q = module.q_proj(h).view(b, n, -1, module.head_dim).transpose(1, 2)
        k = module.k_proj(h).view(b, n, -1, module.head_dim).transpose(1, 2)
        cos, sin = kwargs["position_embeddings"]
        captured["q"], captured["k"] = mq.apply_rotary_pos_emb(q, k, cos, sin)

    handle = last.register_forward_pre_hook(grab, with_kwargs=True)
    out = dense_mask_forward(eager, batch, output_hidden_states=True)
    handle.remove()
    return eager, out, captured


def _real_rows(batch):
    return (
        batch["targets"]
        .new_tensor([[i < int(r[5, 1]) for i in range(batch["targets"].shape[1])] for r in batch["layout"]])
        .bool()
    )


def test_hidden_states_match_eager_with_dense_mask():
    model, batch = _setup()
    ours = model.model(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        **batch["images"],
        crystal_layout=batch["layout"],
        crystal_outputs={},
    ).last_hidden_state
    _, out, _ = _eager_run(model, batch)
    real = _real_rows(batch)
    assert real.sum() < real.numel()  # the batch has padding
    torch.testing.assert_close(ours[real], out.hidden_states[-1][real], rtol=1e-5, atol=1e-5)


def test_objective_parts_loss_and_gradients_match_plain_composition():
    model, batch = _setup()
    ours_model = copy.deepcopy(model)
    ours = crystal_objective(ours_model, batch, REFERENCE_HEAD)
    ours.loss.backward()
    eager, out, cap = _eager_run(model, batch)
    scale = eager.model.language_model.layers[-1].self_attn.scaling
    ce, kl_pred, kl_attn = plain_losses(out.logits, cap["q"], cap["k"], batch, scale)
    for got, want in ((ours.ce, ce), (ours.kl_pred, kl_pred), (ours.kl_attn, kl_attn)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert ours.kl_pred > 0 and ours.kl_attn > 0
    (ce + kl_pred + kl_attn).backward()
    torch.testing.assert_close(ours.loss, (ce + kl_pred + kl_attn).detach(), rtol=1e-5, atol=1e-6)
    pairs = gradient_pairs(ours_model, eager)
    for name, got, want in pairs:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    assert len(pairs) > 20 and ours_model.model.visual.merger.mlp[0].weight.grad.abs().sum() > 0


def test_lambdas_weight_the_parts():
    model, batch = _setup()
    a = crystal_objective(
        model, batch, ObjectiveConfig(lambda_pred=0.5, lambda_attn=3.0, lm_head_losses="reference")
    )
    torch.testing.assert_close(a.loss, a.ce + 0.5 * a.kl_pred + 3.0 * a.kl_attn)


def test_baseline_is_plain_sft_on_the_intact_path():
    model, batch = _setup()
    base = crystal_objective(model, batch, ObjectiveConfig(crystal=False, lm_head_losses="reference"))
    single = intact_path_batch(batch)
    stock = copy.deepcopy(model)
    stock.set_attn_implementation("sdpa")
    logits = stock(
        input_ids=single["input_ids"],
        attention_mask=single["attention_mask"],
        **single["images"],
        mm_token_type_ids=(single["input_ids"] == stock.config.image_token_id).long(),
    ).logits
    # The stock model numbers positions itself here: the baseline's path-1 ids must agree with it.
    want = Fn.cross_entropy(logits.flatten(0, 1), single["targets"].flatten(), ignore_index=IGNORE)
    torch.testing.assert_close(base.ce, want, rtol=1e-5, atol=1e-6)
    assert base.loss is base.ce and base.kl_pred == 0 and base.kl_attn == 0
    assert single["images"]["pixel_values"].shape[0] * 2 == batch["images"]["pixel_values"].shape[0]


def test_switching_with_set_attn_implementation_and_plain_calls():
    model, batch = _setup()
    m = copy.deepcopy(model)
    m.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="set_attn_implementation"):
        crystal_objective(m, batch, REFERENCE_HEAD)
    m.set_attn_implementation(ATTN_IMPLEMENTATION)
    assert m.config.text_config._attn_implementation == ATTN_IMPLEMENTATION
    crystal_objective(m, batch, REFERENCE_HEAD)
    # Without a layout the model is an ordinary causal model (e.g. for generate).
    ids = batch["input_ids"][:1, :10]
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("sdpa")
    torch.testing.assert_close(m(input_ids=ids).logits, ref(input_ids=ids).logits)


@pytest.mark.parametrize(
    "bad, name",
    [
        (dict(lm_head_losses="triton"), "lm_head_losses"),
        (dict(lambda_pred=-1.0), "lambda_pred"),
        (dict(topk_fraction=0.0), "topk_fraction"),
    ],
)
def test_objective_config_names_the_bad_setting(bad, name):
    with pytest.raises(ValueError, match=name):
        ObjectiveConfig(**bad)


def test_qwen2_vl_objective_matches_plain_composition():
    """Qwen2-VL (its own rotary and vision classes) through the same attention: every part of
    the objective equals the published formulas on the eager model with the dense mask, whose
    last-layer attention probabilities transformers returns itself (output_attentions)."""
    model, batch = _setup("qwen2_vl")
    ours = crystal_objective(model, batch, REFERENCE_HEAD)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    out = dense_mask_forward(eager, batch, output_attentions=True)
    ce, kl_pred, kl_attn = plain_losses(out.logits, None, None, batch, None, probs=out.attentions[-1])
    for got, want in ((ours.ce, ce), (ours.kl_pred, kl_pred), (ours.kl_attn, kl_attn)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert ours.kl_pred > 0 and ours.kl_attn > 0
    torch.testing.assert_close(ours.loss, ce + kl_pred + kl_attn, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head", ["reference", "fused"])
def test_peft_wrapped_model_trains_lora_merger_and_new_rows(head):
    from crystal_ext.model.lora import apply_lora
    from crystal_ext.model.new_token_rows import attach_new_token_rows

    if head == "fused" and not crystal_ext.extension_available():
        pytest.skip("compiled extension unavailable")
    model, batch = _setup()
    peft_model = apply_lora(copy.deepcopy(model))
    vocab = peft_model.get_input_embeddings().weight.shape[0]
    rows = attach_new_token_rows(peft_model, list(range(vocab - 8, vocab)))  # the 4 latents + 4 markers
    crystal_objective(peft_model, batch, ObjectiveConfig(lm_head_losses=head)).loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    # LoRA's B starts at zero, so A's gradient is zero at the start; B's is not, in every
    # adapted layer of the vision tower as of the language model.
    visual_b = {n: g for n, g in grads.items() if "lora_B" in n and "visual" in n}
    assert visual_b and all(g is not None and g.abs().sum() > 0 for g in visual_b.values()), {
        n: None if g is None else g.abs().sum().item() for n, g in visual_b.items()
    }
    assert any(
        "lora_B" in n and "language_model" in n and g is not None and g.abs().sum() > 0
        for n, g in grads.items()
    )
    assert any("merger" in n and g is not None and g.abs().sum() > 0 for n, g in grads.items())
    assert rows.embedding_rows.grad.abs().sum() > 0 and rows.head_rows.grad.abs().sum() > 0
    assert all(m.grad is None for m in embedding_and_head_weights(peft_model))

    # and the visual adapters change the loss: a step along their gradient lowers it
    with torch.no_grad():
        before = crystal_objective(peft_model, batch, ObjectiveConfig(lm_head_losses=head)).loss
        visual_params = {n: p for n, p in peft_model.named_parameters() if n in visual_b}
        for n, p in visual_params.items():
            p -= 0.05 * visual_b[n] / visual_b[n].norm()
        after = crystal_objective(peft_model, batch, ObjectiveConfig(lm_head_losses=head)).loss
    assert after < before, (before.item(), after.item())


def test_objective_with_new_token_rows_equals_the_rows_written_in():
    """The head rows reach the losses as override rows: the same losses as a model whose
    matrices hold the trained rows, and the same gradient as those matrices' rows."""
    from crystal_ext.model.new_token_rows import attach_new_token_rows

    model, batch = _setup()
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = list(range(vocab - 8, vocab))
    with_rows = copy.deepcopy(model)
    rows = attach_new_token_rows(with_rows, ids)
    with torch.no_grad():
        for p in rows.parameters():
            p.add_(torch.randn_like(p))
    written = copy.deepcopy(model)
    rows.write_into(written.get_input_embeddings(), written.get_output_embeddings())
    for p in written.parameters():
        p.requires_grad_(False)
    head = written.get_output_embeddings().weight.requires_grad_()
    got = crystal_objective(with_rows, batch, REFERENCE_HEAD)
    want = crystal_objective(written, batch, REFERENCE_HEAD)
    got.loss.backward()
    want.loss.backward()
    torch.testing.assert_close(got.loss, want.loss)
    torch.testing.assert_close(rows.head_rows.grad, head.grad[ids])


def test_layout_is_planned_once_per_forward(monkeypatch):
    """The layout's validation and indices (host work; a device sync on a GPU) happen once per
    forward, not in every text layer."""
    import crystal_ext.model.attention_registration as reg

    model, batch = _setup()
    built = []
    original = reg.DualPathPlan

    class Counting(original):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(reg, "DualPathPlan", Counting)
    crystal_objective(model, batch, REFERENCE_HEAD)
    assert len(built) == 1 and model.config.text_config.num_hidden_layers > 1


def test_layout_is_read_and_checked_once_per_forward(monkeypatch):
    """The objective checks the layout and hands the checked value to the text layers, which do
    not read or check it again (on a GPU each read waits for the device)."""
    from crystal_ext.ops.layout import Segments

    model, batch = _setup()
    read = []
    original = Segments.from_bounds.__func__

    def counting(cls, bounds):
        read.append(1)
        return original(cls, bounds)

    monkeypatch.setattr(Segments, "from_bounds", classmethod(counting))
    crystal_objective(model, batch, REFERENCE_HEAD)
    assert len(read) == batch["layout"].shape[0]


def test_the_layers_check_a_layout_the_caller_did_not(monkeypatch):
    """A checked layout of another layout tensor is not taken for this one: the layers check the
    layout they are given, and name it when it breaks a rule."""
    from crystal_ext.model.objective import dual_path_hidden
    from crystal_ext.model.parts import backbone_and_head
    from crystal_ext.ops.layout import check_layout

    model, batch = _setup()
    good = check_layout(batch["layout"], *batch["input_ids"].shape)
    broken = batch["layout"].clone()
    broken[0, 5, 1] += 1  # |F| != |E|
    with pytest.raises(ValueError, match=r"dual_path_attention: layout\[0\]: \|E\| must equal \|F\|"):
        dual_path_hidden(backbone_and_head(model)[1], {**batch, "layout": broken}, good)


def test_alignment_op_gets_the_plans_indices(monkeypatch):
    """The last layer hands the fused alignment loss the plan's prebuilt indices (so the op does
    no host work), built once per forward."""
    import crystal_ext.model.attention_registration as reg
    import crystal_ext.model.dual_path_attention as dpa
    from crystal_ext.ops.attention_alignment_loss import AlignmentIndices

    model, batch = _setup()
    built, received = [], []
    original_build, original_op = dpa.alignment_indices, reg.attention_alignment_loss

    def counting_build(*args, **kwargs):
        built.append(1)
        return original_build(*args, **kwargs)

    def recording_op(q, k, layout, scale=None):
        received.append(layout)
        return original_op(q, k, layout, scale)

    monkeypatch.setattr(dpa, "alignment_indices", counting_build)
    monkeypatch.setattr(reg, "attention_alignment_loss", recording_op)
    crystal_objective(model, batch, REFERENCE_HEAD)
    assert len(built) == 1
    assert len(received) == 1 and isinstance(received[0], AlignmentIndices)


def test_fused_lm_head_losses_get_a_plan_built_once_per_forward(monkeypatch):
    """The objective builds the LM-head op's plan once per forward on the host and hands it to
    the fused op (so the op reads nothing on the host); the losses equal the reference head's."""
    import crystal_ext.model.objective as objective
    from crystal_ext.ops.lm_head_plan import LmHeadPlan

    model, batch = _setup()
    built, received = [], []
    original_build, original_op = objective.lm_head_plan, objective.fused_lm_head_losses

    def counting_build(*args, **kwargs):
        built.append(1)
        return original_build(*args, **kwargs)

    def recording_op(hidden, weight, *args, **kwargs):
        received.append(args)
        return original_op(hidden, weight, *args, **kwargs)

    monkeypatch.setattr(objective, "lm_head_plan", counting_build)
    monkeypatch.setattr(objective, "fused_lm_head_losses", recording_op)
    fused = crystal_objective(model, batch, ObjectiveConfig())
    assert len(built) == 1
    assert len(received) == 1 and len(received[0]) == 1 and isinstance(received[0][0], LmHeadPlan)
    want = crystal_objective(model, batch, REFERENCE_HEAD)
    for name in ("ce", "kl_pred"):
        torch.testing.assert_close(getattr(fused, name), getattr(want, name), rtol=1e-4, atol=1e-5, msg=name)


def _parts(model, batch, config, autocast):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = crystal_objective(model, batch, config)
    return torch.stack([out.loss, out.ce, out.kl_pred, out.kl_attn]).double()


def test_bf16_autocast_objective_tracks_float64():
    """The whole objective under CPU bf16 autocast (as training with --bf16 runs it) against the
    float64 objective. Tolerance, per part, as flash-attention's tests derive theirs: twice the
    error of the plain-PyTorch composition in the same precision (reference LM-head losses), plus
    the float32 objective's error scaled by the precision ratio 2^16 of float32 to bf16."""
    model, batch = _setup()
    model64 = copy.deepcopy(model).double()
    batch64 = cast_floats(batch, torch.float64)
    gold = _parts(model64, batch64, REFERENCE_HEAD, autocast=False)
    fp32_err = (_parts(model, batch, ObjectiveConfig(), autocast=False) - gold).abs()
    bf16 = _parts(model, batch, ObjectiveConfig(), autocast=True)
    plain_bf16_err = (_parts(model, batch, REFERENCE_HEAD, autocast=True) - gold).abs()
    assert not torch.equal(bf16, _parts(model, batch, ObjectiveConfig(), autocast=False))  # bf16 did run
    tol = 2 * plain_bf16_err + 2**16 * fp32_err
    for i, name in enumerate(("loss", "ce", "kl_pred", "kl_attn")):
        err = (bf16[i] - gold[i]).abs()
        assert err <= tol[i], f"{name}: bf16 error {err.item():.3g} > tolerance {tol[i].item():.3g}"
