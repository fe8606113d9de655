"""Families whose text layers include sequence mixers with a state (Qwen3.5 and Qwen3.5-MoE: Gated
DeltaNet linear attention; LFM2-VL: short convolutions), on tiny random models with their real
processors, float64:

- the objective (its parts and every gradient) equals a reference written here: the attention
  layers through an eager attention with the dense dual-path mask (dual_path_helpers), the linear
  and convolution layers as a per-path token-by-token recurrence (the causal convolution and the
  gated delta rule as plain loops over time, read from the layer's weights), path 1 over [A, C, D, E] and path 2
  over [A, B, D, F] with D's inputs as the packed sequence holds them (path 1's);
- the same reference, with path 2 scanned wrongly (over the packed sequence; F continuing path 1's
  state; D's outputs taken from path 2), differs from the objective: the comparison sees each;
- with A longer than the delta rule's chunk (a long system prompt), whose whole chunks Qwen3.5's
  layer scans once for both paths: the same comparison, and one layer's output rows and input
  gradients (A's rows included, which reach path 2 through the shared state) equal the recurrence;
- path 1 equals the stock model's own forward on [A, C, D, E], and the single-path baseline its loss;
- a configuration whose last layer is linear is refused with the default --alignment_layer (the
  flag named; tests/test_alignment_layer.py runs the other choice), and so is a text layer the
  scans do not know.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as Fn
from dual_path_helpers import (
    additive,
    cast_floats,
    dense_visibility,
    gradient_pairs,
    objective_errors,
    register_dense_eager,
    relative_error,
)
from family_models import LINEAR_FAMILIES, build_linear
from test_families import _examples

import crystal_ext
from crystal_ext.data.packing import IGNORE, DualPathCollator, DualPathPacker
from crystal_ext.model.alignment_layer import alignment_layer_index
from crystal_ext.model.attention_registration import ATTN_IMPLEMENTATION, register_dual_path_attention
from crystal_ext.model.dual_path_attention import DualPathPlan
from crystal_ext.model.families import UnsupportedModel, family_of
from crystal_ext.model.objective import (
    ObjectiveConfig,
    crystal_objective,
    dual_path_hidden,
    intact_path_batch,
)
from crystal_ext.model.parts import backbone_and_head
from crystal_ext.model.path_scan import (
    CHUNK,
    gated_delta_rule_paths,
    parts_forward,
    path_scan,
    shared_prefix,
    short_conv_paths,
)
from crystal_ext.ops.layout import check_layout, segments_of

pytestmark = pytest.mark.skipif(
    not crystal_ext.extension_available(), reason="the attention-alignment loss needs the compiled extension"
)
REFERENCE_HEAD = ObjectiveConfig(lm_head_losses="reference")


SYSTEM = "you are a helpful assistant"
# A system prompt that makes A longer than the delta rule's chunk: its whole chunks are scanned once
# for both paths (crystal_ext.model.path_scan.shared_prefix).
LONG_SYSTEM = " ".join([SYSTEM] * 15)


@functools.cache
def _setup(family, system=SYSTEM):
    register_dual_path_attention()
    model, processor, latent = build_linear(family, ATTN_IMPLEMENTATION)
    model = model.double()
    packer = DualPathPacker(processor, latent, model, system=system)
    batch = DualPathCollator(packer, processor.tokenizer.pad_token_id)(_examples())
    assert len(batch["keys"]) == 3
    return model, processor, cast_floats(batch, torch.float64)


# ---- the reference: Gated DeltaNet written as loops over time ----------------------------------


def _causal_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [n, channels], weight [channels, taps]: out[t] = sum_j weight[:, taps-1-j] * x[t-j] (t-j >= 0)."""
    taps = weight.shape[1]
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[0])
        for j in range(taps):
            if t - j >= 0:
                acc = acc + weight[:, taps - 1 - j] * x[t - j]
        rows.append(acc)
    return torch.stack(rows)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def gated_delta_net_reference(layer, x: torch.Tensor) -> torch.Tensor:
    """Qwen3.5's linear-attention layer on ONE sequence x [n, hidden], token by token: the short
    causal convolution (SiLU) over the q/k/v projection, then per value head h the state S [dk, dv]:
    S <- exp(g_t) S;  S <- S + beta_t k_t (v_t - S^T k_t)^T;  o_t = S^T q_t  (q, k unit length,
    q scaled by dk^-1/2; each key head serves consecutive value heads); then the RMS norm of o
    gated by SiLU(z), and the output projection."""
    nk, nv, dk, dv = layer.num_k_heads, layer.num_v_heads, layer.head_k_dim, layer.head_v_dim
    n = x.shape[0]
    mixed = Fn.silu(_causal_conv(x @ layer.in_proj_qkv.weight.T, layer.conv1d.weight[:, 0]))
    q, k, v = mixed.split([nk * dk, nk * dk, nv * dv], dim=-1)
    q = _unit(q.reshape(n, nk, dk)).repeat_interleave(nv // nk, 1) * dk**-0.5
    k = _unit(k.reshape(n, nk, dk)).repeat_interleave(nv // nk, 1)
    v = v.reshape(n, nv, dv)
    beta = torch.sigmoid(x @ layer.in_proj_b.weight.T)  # [n, nv]
    g = -layer.A_log.exp() * Fn.softplus(x @ layer.in_proj_a.weight.T + layer.dt_bias)
    state = x.new_zeros(nv, dk, dv)
    outs = []
    for t in range(n):
        state = state * g[t].exp()[:, None, None]
        recalled = torch.einsum("hkv,hk->hv", state, k[t])
        state = state + torch.einsum("hk,hv->hkv", k[t], beta[t][:, None] * (v[t] - recalled))
        outs.append(torch.einsum("hkv,hk->hv", state, q[t]))
    o = torch.stack(outs)  # [n, nv, dv]
    z = (x @ layer.in_proj_z.weight.T).reshape(n, nv, dv)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + layer.norm.variance_epsilon) * layer.norm.weight
    o = o * Fn.silu(z)
    return o.reshape(n, nv * dv) @ layer.out_proj.weight.T


def short_conv_reference(layer, x: torch.Tensor) -> torch.Tensor:
    """LFM2's convolution layer on ONE sequence x [n, hidden]: in_proj into three streams b, c, u;
    the causal depthwise convolution of b * u (its taps over the current and earlier rows); c times
    that; out_proj."""
    b, c, u = Fn.linear(x, layer.in_proj.weight, layer.in_proj.bias).chunk(3, dim=-1)
    mixed = _causal_conv(b * u, layer.conv.weight[:, 0])
    if layer.conv.bias is not None:
        mixed = mixed + layer.conv.bias
    return Fn.linear(c * mixed, layer.out_proj.weight, layer.out_proj.bias)


# The reference of each stock mixer class, on one sequence.
REFERENCES = {
    "Qwen3_5GatedDeltaNet": gated_delta_net_reference,
    "Qwen3_5MoeGatedDeltaNet": gated_delta_net_reference,
    "Lfm2ShortConv": short_conv_reference,
}


@dataclass(frozen=True)
class Spec:
    """What the tests name in each family: its scanned layer type, the attribute of that layer's
    mixer, parameters of the mixer that must get gradients, the modules trained in full, and
    whether the model numbers its own positions (from the processor's mm_token_type_ids)."""

    kind: str
    mixer: str
    mixer_params: tuple
    full: list
    own_positions: bool


QWEN3_5_SPEC = Spec(
    "linear_attention",
    "linear_attn",
    ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj", "conv1d", "A_log"),
    ["model.visual.merger"],
    True,
)
SPECS = {
    "qwen3_5": QWEN3_5_SPEC,
    "qwen3_5_moe": QWEN3_5_SPEC,
    "lfm2_vl": Spec(
        "conv", "conv", ("in_proj", "conv.weight", "out_proj"), ["model.multi_modal_projector"], False
    ),
}


# How the reference scans path 2 of one sample (segments `seg`): "right" is the dual-path rule; the
# others are the bugs the comparison must see.
PATH2_SCANS = {
    "right": lambda seg: [*seg.span("a"), *seg.span("b"), *seg.span("d"), *seg.span("f")],
    "packed": lambda seg: list(range(seg.f[1])),  # one scan over A, B, C, D, E, F
    "f_after_path1": lambda seg: [*seg.span("a"), *seg.span("c"), *seg.span("d"), *seg.span("f")],
}


def _reference_forward(layer, layout, path2="right", d_from_path2=False):
    reference = REFERENCES[type(layer).__name__]

    def forward(hidden_states, *args, **kwargs):
        out = torch.zeros_like(hidden_states)
        for b, seg in enumerate(segments_of(layout)):
            path1 = seg.path1()
            out[b, path1] = reference(layer, hidden_states[b, path1])
            # Rows B and F (and D, wrongly) from path 2's scan; with a wrong scan, each row from it
            # where that scan holds the row, else from the right one.
            keep = [*seg.span("b"), *seg.span("f")] + ([*seg.span("d")] if d_from_path2 else [])
            for scan in (PATH2_SCANS["right"](seg), PATH2_SCANS[path2](seg)):
                y2 = reference(layer, hidden_states[b, scan])
                rows = [p for p in keep if p in scan]
                out[b, rows] = y2[[scan.index(p) for p in rows]]
        return out

    return forward


def _layer_types(model) -> set:
    return set(model.config.get_text_config().layer_types)


def _reference_run(model, batch, layer=None, **scan):
    """The reference model copy's (logits, q, k and scale of the last layer or of text layer
    `layer`, copy)."""
    ref = copy.deepcopy(model)
    ref.set_attn_implementation(register_dense_eager())
    for module in ref.modules():
        if type(module).__name__ in REFERENCES:
            module.forward = _reference_forward(module, batch["layout"], **scan)
    length = batch["input_ids"].shape[1]
    dense = additive(dense_visibility(batch["layout"], length), model.dtype)
    sink = {} if layer is None else {"layer": layer}
    out = ref(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        attention_mask={kind: dense if kind == "full_attention" else None for kind in _layer_types(model)},
        use_cache=False,
        crystal_test_sink=sink,
        **batch["images"],
    )
    return out.logits, sink["q"], sink["k"], sink["scale"], ref


@functools.cache
def _ours(family, system=SYSTEM):
    model, _, batch = _setup(family, system)
    ours_model = copy.deepcopy(model)
    ours = crystal_objective(ours_model, batch, REFERENCE_HEAD)
    ours.loss.backward()
    return ours, ours_model


def _objective_errors(family, system=SYSTEM, **scan):
    model, _, batch = _setup(family, system)
    ours, ours_model = _ours(family, system)
    assert ours.kl_pred > 0 and ours.kl_attn > 0
    return objective_errors(ours, ours_model, *_reference_run(model, batch, **scan), batch)


@pytest.mark.parametrize("family", LINEAR_FAMILIES)
def test_objective_and_gradients_equal_the_per_path_recurrence(family):
    errors, pairs = _objective_errors(family)
    names = " ".join(n for n, _, _ in pairs)
    print(
        f"\n{family}: max relative error {max(errors):.1e} over the loss, its parts and {len(pairs)} gradients"
    )
    spec = SPECS[family]
    assert all(f"layers.0.{spec.mixer}.{param}" in names for param in spec.mixer_params)
    # 1e-5, not float64's 1e-6: the stock layer runs its gate and recurrence in float32 whatever the
    # model's dtype (A_log.float(), and its delta-rule kernel casts q, k, v, g and beta).
    assert len(pairs) > 20 and max(errors) < 1e-5


@pytest.mark.parametrize("family", LINEAR_FAMILIES)
@pytest.mark.parametrize(
    "wrong",
    [{"path2": "packed"}, {"path2": "f_after_path1"}, {"d_from_path2": True}],
    ids=["one_packed_scan", "f_continues_path1", "d_from_path2"],
)
def test_the_comparison_sees_a_wrong_path2_scan(family, wrong):
    """The reference with path 2 scanned wrongly differs from the objective by far more than the
    tolerance of the test above: that test would catch the objective doing the same. (A 3-tap
    convolution's state at F's start is D's last inputs in either scan: F continuing path 1 is
    the same computation there, so that case is the linear-attention families' only.)"""
    if SPECS[family].kind == "conv" and wrong.get("path2") == "f_after_path1":
        pytest.skip("a short convolution's state at F holds D's last rows only, the same in both scans")
    errors, _ = _objective_errors(family, **wrong)
    assert max(errors) > 1e-2


def test_a_long_prefix_scanned_once_equals_the_per_path_recurrence():
    """A longer than the delta rule's chunk: its whole chunks are scanned once and both paths go on
    from the state at their end; the objective and every gradient still equal the per-path
    recurrence."""
    _, _, batch = _setup("qwen3_5", LONG_SYSTEM)
    assert shared_prefix(segments_of(batch["layout"])) == CHUNK
    errors, pairs = _objective_errors("qwen3_5", LONG_SYSTEM)
    assert len(pairs) > 20 and max(errors) < 1e-5


def test_both_paths_carry_the_shared_prefix_state_and_its_gradient():
    """One Gated DeltaNet layer on the long-A layout, its decay slowed so that A's state lives on
    into B and F: the output rows and the gradient of every input row equal the per-path
    recurrence; A's rows, which reach path 2 only through the state at the shared prefix's end,
    are compared on their own as well."""
    model, _, batch = _setup("qwen3_5", LONG_SYSTEM)
    layer = copy.deepcopy(backbone_and_head(model)[1].language_model.layers[0].linear_attn)
    with torch.no_grad():
        layer.A_log.fill_(math.log(0.01))  # exp(g) ~ 0.99 a token
    layout = batch["layout"]
    size, length = layout.shape[0], batch["input_ids"].shape[1]
    plan = DualPathPlan(check_layout(layout, size, length, "test"), "cpu")
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(size, length, layer.hidden_size, generator=generator, dtype=torch.float64)
    weights = torch.randn(hidden.shape, generator=generator, dtype=torch.float64)
    hidden.requires_grad_(True)
    ours = gated_delta_rule_paths(layer, hidden, plan)
    want = _reference_forward(layer, layout)(hidden)
    grads = [torch.autograd.grad((out * weights).sum(), hidden)[0] for out in (ours, want)]
    a_rows = [(b, t) for b, seg in enumerate(segments_of(layout)) for t in seg.span("a")]
    a_grads = [g[tuple(zip(*a_rows, strict=True))] for g in grads]
    assert relative_error(ours, want) < 1e-5
    assert relative_error(*grads) < 1e-5 and relative_error(*a_grads) < 1e-5
    # The stock forward on each whole path (what transformers releases without the kernel entry
    # points get) gives the same rows.
    assert parts_forward(layer) is gated_delta_rule_paths
    assert relative_error(path_scan(type(layer).forward.__get__(layer), hidden, plan), ours) < 1e-5


def test_short_conv_layer_from_parts_equals_the_per_path_recurrence():
    """One LFM2 short-convolution layer built from its parts (projections and gates once per packed
    row, the convolution per path): its output rows and the gradient of every input row equal the
    per-path recurrence and the stock forward on each whole path."""
    model, _, batch = _setup("lfm2_vl")
    layer = next(m for m in backbone_and_head(model)[1].modules() if type(m).__name__ == "Lfm2ShortConv")
    layout = batch["layout"]
    size, length = layout.shape[0], batch["input_ids"].shape[1]
    plan = DualPathPlan(check_layout(layout, size, length, "test"), "cpu")
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(size, length, layer.in_proj.in_features, generator=generator, dtype=torch.float64)
    weights = torch.randn(hidden.shape, generator=generator, dtype=torch.float64)
    hidden.requires_grad_(True)
    assert parts_forward(layer) is short_conv_paths
    ours = short_conv_paths(layer, hidden, plan)
    want = _reference_forward(layer, layout)(hidden)
    grads = [torch.autograd.grad((out * weights).sum(), hidden)[0] for out in (ours, want)]
    real = torch.zeros(size, length, dtype=torch.bool)
    for b, seg in enumerate(segments_of(layout)):
        real[b, : seg.f[1]] = True
    assert relative_error(ours[real], want[real]) < 1e-10
    assert relative_error(*grads) < 1e-10
    stock = path_scan(type(layer).forward.__get__(layer), hidden, plan)
    assert relative_error(stock[real], ours[real]) < 1e-10


def _position_inputs(model, single) -> dict:
    """What the stock model needs to number positions itself: the processor's mm_token_type_ids (1
    on image tokens) where it has a position function of its own, nothing where it counts 0, 1, 2."""
    if not SPECS[model.config.model_type].own_positions:
        return {}
    return {"mm_token_type_ids": (single["input_ids"] == model.config.image_token_id).int()}


@pytest.mark.parametrize("family", LINEAR_FAMILIES)
@pytest.mark.parametrize("system", [SYSTEM, LONG_SYSTEM], ids=["short_a", "long_a"])
def test_path1_equals_the_stock_forward(family, system):
    """The dual path's rows A, C, D, E hold the stock model's last hidden states of [A, C, D, E]
    (its own positions, SDPA attention and linear-attention kernels, right-padded batch), also where
    A's first chunk is scanned once for both paths (the same chunk boundaries as the stock scan)."""
    model, _, batch = _setup(family, system)
    single = intact_path_batch(batch)
    stock = copy.deepcopy(model)
    stock.set_attn_implementation("sdpa")
    with torch.no_grad():
        hidden, _ = dual_path_hidden(backbone_and_head(model)[1], batch)
        want = stock(
            input_ids=single["input_ids"],
            attention_mask=single["attention_mask"],
            output_hidden_states=True,
            **_position_inputs(model, single),
            **single["images"],
        ).hidden_states[-1]
    for b, seg in enumerate(segments_of(batch["layout"])):
        path1 = seg.path1()
        assert relative_error(hidden[b, path1], want[b, : len(path1)]) < 1e-10


@pytest.mark.parametrize("family", LINEAR_FAMILIES)
def test_baseline_is_plain_sft_on_the_intact_path(family):
    model, _, batch = _setup(family)
    base = crystal_objective(model, batch, ObjectiveConfig(crystal=False, lm_head_losses="reference"))
    single = intact_path_batch(batch)
    stock = copy.deepcopy(model)
    stock.set_attn_implementation("sdpa")
    logits = stock(
        input_ids=single["input_ids"],
        attention_mask=single["attention_mask"],
        **_position_inputs(model, single),
        **single["images"],
    ).logits
    want = Fn.cross_entropy(logits.flatten(0, 1), single["targets"].flatten(), ignore_index=IGNORE)
    assert relative_error(base.ce, want) < 1e-9


@pytest.mark.parametrize("family", LINEAR_FAMILIES)
def test_a_scanned_last_layer_is_refused(family):
    model, _, _ = _setup(family)
    kind = SPECS[family].kind
    config = copy.deepcopy(model.config)
    config.text_config.layer_types = [*config.text_config.layer_types[:-1], kind]
    with pytest.raises(
        UnsupportedModel, match=f"last text layer is a '{kind}' layer.*Pass --alignment_layer last_attention"
    ):
        alignment_layer_index(config, "last")


def test_a_scanned_layer_without_a_known_mixer_is_refused():
    from crystal_ext.model.path_scan import use_path_scans

    model, _, _ = _setup("qwen3_5")
    backbone = copy.deepcopy(backbone_and_head(model)[1])
    layer = backbone.language_model.layers[0]
    layer.linear_attn = torch.nn.Identity()  # a mixer class the scans do not know
    with pytest.raises(ValueError, match="2 layers of types .* holds 1 known sequence mixers"):
        use_path_scans(backbone)


@pytest.mark.parametrize("family", LINEAR_FAMILIES)
def test_lora_targets_the_scanned_layers_projections(family):
    from crystal_ext.model.lora import apply_lora

    model, _, batch = _setup(family)
    spec = SPECS[family]
    targets = family_of(model).lora_targets(model)
    layer = model.model.language_model.layers[0]
    projections = [
        n for n, m in getattr(layer, spec.mixer).named_children() if isinstance(m, torch.nn.Linear)
    ]
    assert len(projections) >= 2
    for name in projections:
        assert f"model.language_model.layers.0.{spec.mixer}.{name}" in targets
    assert family_of(model).trained_in_full(model) == spec.full
    peft_model = apply_lora(copy.deepcopy(model).float())
    crystal_objective(peft_model, cast_floats(batch, torch.float32), REFERENCE_HEAD).loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    first = f"{spec.mixer}.{projections[0]}"
    assert any("lora_B" in n and first in n and g.abs().sum() > 0 for n, g in grads.items())
    vision = family_of(model).vision[0]
    assert any("lora_B" in n and vision in n and g.abs().sum() > 0 for n, g in grads.items())


# ---- the run-time check, and `python -m crystal_ext.train` from a saved folder --------------------


@pytest.mark.parametrize("family", LINEAR_FAMILIES)
def test_the_run_time_check_passes(family):
    from crystal_ext.data.packing import DualPathPacker
    from crystal_ext.training.objective_check import check_objective

    register_dual_path_attention()
    model, processor, latent = build_linear(family, attn_implementation="sdpa")  # as train loads it
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    model.train()
    packer = DualPathPacker(processor, latent, model, system="you are a helpful assistant")
    report = check_objective(model, packer, _examples(), ObjectiveConfig(), count=3)
    print("\n" + report.summary())
    assert report.examples == ["a", "b", "c"] and not report.failures


@pytest.mark.parametrize("family", LINEAR_FAMILIES)
def test_train_from_a_saved_folder_lowers_the_loss(family, tmp_path, monkeypatch):
    import test_families_train

    def save_linear(name, folder):
        model, processor, _ = build_linear(name, k=1, attn_implementation="sdpa")
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        return str(folder)

    monkeypatch.setattr(test_families_train, "save_family", save_linear)
    test_families_train.test_train_from_a_saved_folder_lowers_the_loss(family, tmp_path)


def test_qwen3_5_moe_adds_the_stock_router_term_on_path_1():
    """With output_router_logits, the objective's loss holds router_aux_loss_coef x the stock
    forward's load-balancing loss of the single path [A, C, D, E] (the router reads each row alone,
    and path 1's rows of the dual-path forward equal the stock ones)."""
    coef = 0.25
    model, _, batch = _setup("qwen3_5_moe")
    model = copy.deepcopy(model)
    model.config.text_config.output_router_logits = True
    model.config.text_config.router_aux_loss_coef = coef
    ours = crystal_objective(copy.deepcopy(model), batch, REFERENCE_HEAD)
    added = ours.loss - (ours.ce + ours.kl_pred + ours.kl_attn)
    single = intact_path_batch(batch)
    stock = copy.deepcopy(model)
    stock.set_attn_implementation("sdpa")
    out = stock(
        input_ids=single["input_ids"],
        attention_mask=single["attention_mask"],
        **_position_inputs(model, single),
        **single["images"],
    )
    want = coef * out.aux_loss
    assert float(want) > 0.1 and abs(float(added - want)) < 1e-6 * float(want)


def test_activation_checkpointing_recomputes_the_same_two_scans():
    """With activation checkpointing the backward pass reruns each decoder layer's forward: the
    linear layers must split into the two paths there too (the recipes turn it on)."""
    model, _, batch = _setup("qwen3_5")
    ours, ours_model = _ours("qwen3_5")
    checkpointed = copy.deepcopy(model)
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    checkpointed.train()
    again = crystal_objective(checkpointed, batch, REFERENCE_HEAD)
    again.loss.backward()
    assert relative_error(again.loss, ours.loss.detach()) < 1e-12
    pairs = gradient_pairs(checkpointed, ours_model)
    assert len(pairs) > 20 and max(relative_error(got, want) for _, got, want in pairs) < 1e-10


def test_a_scanned_layer_refuses_a_cache_and_a_malformed_input():
    from crystal_ext.model.attention_registration import LAYOUT_KWARG
    from crystal_ext.model.path_scan import use_path_scans

    model, _, batch = _setup("qwen3_5")
    backbone = copy.deepcopy(backbone_and_head(model)[1])
    use_path_scans(backbone)
    mixer = backbone.language_model.layers[0].linear_attn
    hidden = torch.zeros(*batch["input_ids"].shape, model.config.text_config.hidden_size, dtype=torch.float64)
    with pytest.raises(
        ValueError, match="path_scan: a dual-path layout needs the whole packed sequence.*cache"
    ):
        mixer(hidden_states=hidden, cache=object(), **{LAYOUT_KWARG: batch["layout"]})
    with pytest.raises(
        ValueError, match=r"path_scan: hidden_states must be \[batch, length, hidden\], got \[4\]"
    ):
        path_scan(mixer.forward, torch.zeros(4), plan=None)
    with pytest.raises(
        ValueError, match=r"path_scan: hidden_states must be \[batch, length, hidden\], got \[4\]"
    ):
        gated_delta_rule_paths(mixer, torch.zeros(4), plan=None)
    # Without a layout the stock forward runs, on the packed sequence as it is.
    assert torch.equal(mixer(hidden_states=hidden), type(mixer).forward(mixer, hidden))


@pytest.mark.parametrize("family", ["qwen3_5"])
def test_attention_pictures_run_the_two_scans(family):
    """The pictures' forward (crystal_ext.training.pictures) scans the linear layers per path even
    on a model that has not trained a step yet (the objective installs the scans otherwise)."""
    from crystal_ext.model.path_scan import use_path_scans
    from crystal_ext.training.pictures import attention_maps

    register_dual_path_attention()
    fresh, processor, latent = build_linear(family, ATTN_IMPLEMENTATION)
    fresh = fresh.double()
    packer = DualPathPacker(processor, latent, fresh, system="you are a helpful assistant")
    batch = cast_floats(
        DualPathCollator(packer, processor.tokenizer.pad_token_id)(_examples()[:1]), torch.float64
    )
    scanned = copy.deepcopy(fresh)
    use_path_scans(backbone_and_head(scanned)[1])
    got, want = attention_maps(fresh, batch), attention_maps(scanned, batch)
    for name in ("intact", "corrupted"):
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-12)
