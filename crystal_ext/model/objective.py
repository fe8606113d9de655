"""The CrystaL objective on a stock model: CE + lambda_pred * KL_pred + lambda_attn * KL_attn.

One forward of the model's backbone (not of the *ForConditionalGeneration wrapper, whose
forward would compute the full [B, L, V] logits) with dual-path attention; then
  - CE and KL_pred from the fused `lm_head_losses` on the last hidden states of the rows
    that need logits (targeted rows, and the E/F rows paired for the KL), with the model's
    own LM-head weight (and, when the new tokens' rows are trained on their own,
    crystal_ext.model.new_token_rows, those rows as override rows of the frozen head) and the
    model's own logit transform (a scale, a soft-cap: Family.logit_transform), so the losses
    see the logits the model's forward computes;
  - KL_attn from the fused attention-alignment loss, computed inside the text layer the run
    chose (the last one, as published, or the last full-attention one:
    crystal_ext.model.alignment_layer) and returned through the `crystal_outputs` forward kwarg.
`crystal=False` is the plain single-path SFT baseline: the intact path [A, C, D, E] alone,
with the model's own attention and logits, CE only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crystal_ext.model.alignment_layer import ALIGNMENT_LAYERS, alignment_layer_index
from crystal_ext.model.attention_registration import (
    ALIGNMENT_LAYER_KEY,
    ALIGNMENT_LOSS_KEY,
    ATTN_IMPLEMENTATION,
    CHECKED_LAYOUT_KEY,
    LAYOUT_KWARG,
    OUTPUTS_KWARG,
)
from crystal_ext.model.families import family_of
from crystal_ext.model.families.router_loss import recording_router_logits
from crystal_ext.model.new_token_rows import new_token_rows_of
from crystal_ext.model.parts import backbone_and_head, text_config
from crystal_ext.model.path_scan import use_path_scans
from crystal_ext.ops import lm_head_losses as fused_lm_head_losses
from crystal_ext.ops import reference
from crystal_ext.ops.layout import IGNORE, CheckedLayout, Segments, check_layout, copy_to_device, segments_of
from crystal_ext.ops.lm_head_plan import lm_head_plan

LM_HEAD_IMPLEMENTATIONS = ("fused", "reference")


@dataclass(frozen=True)
class ObjectiveConfig:
    """The settings of the CrystaL objective, carried as one value from the command line to
    the objective.

    crystal: the dual-path objective (False: the single-path SFT baseline, CE only).
    lambda_pred, lambda_attn: weights of the prediction and attention alignment losses.
    topk_fraction: the share of a sample's answer rows whose prediction KL is kept.
    lm_head_losses: "fused" (the compiled op) or "reference" (its plain-PyTorch twin).
    alignment_layer: whose attention the alignment loss reads, "last" or "last_attention"
      (crystal_ext.model.alignment_layer).
    """

    crystal: bool = True
    lambda_pred: float = 1.0
    lambda_attn: float = 1.0
    topk_fraction: float = 0.1
    lm_head_losses: str = "fused"
    alignment_layer: str = "last"

    def __post_init__(self):
        if self.alignment_layer not in ALIGNMENT_LAYERS:
            raise ValueError(
                f"ObjectiveConfig: alignment_layer must be one of {ALIGNMENT_LAYERS}, got {self.alignment_layer!r}"
            )
        if self.lm_head_losses not in LM_HEAD_IMPLEMENTATIONS:
            raise ValueError(
                f"ObjectiveConfig: lm_head_losses must be one of {LM_HEAD_IMPLEMENTATIONS}, "
                f"got {self.lm_head_losses!r}"
            )
        if self.lambda_pred < 0 or self.lambda_attn < 0:
            raise ValueError(
                f"ObjectiveConfig: lambda_pred and lambda_attn must be >= 0, got "
                f"{self.lambda_pred}, {self.lambda_attn}"
            )
        if not 0 < self.topk_fraction <= 1:
            raise ValueError(f"ObjectiveConfig: topk_fraction must be in (0, 1], got {self.topk_fraction}")

    def lm_head_fn(self):
        return fused_lm_head_losses if self.lm_head_losses == "fused" else reference.lm_head_losses


@dataclass
class CrystalLoss:
    loss: torch.Tensor
    ce: torch.Tensor
    kl_pred: torch.Tensor
    kl_attn: torch.Tensor


def _logit_rows(targets: torch.Tensor, samples: tuple[Segments, ...]):
    """Flat indices of the rows needing logits, and the (teacher, student, sample) pairs as
    indices into those rows."""
    batch, length = targets.shape
    need = targets != IGNORE
    teacher, student, sample = [], [], []
    for b, seg in enumerate(samples):
        need[b, seg.e[0] : seg.e[1]] = True
        need[b, seg.f[0] : seg.f[1]] = True
        teacher += [b * length + i for i in seg.span("e")]
        student += [b * length + i for i in seg.span("f")]
        sample += [b] * seg.size("e")
    flat = need.flatten().nonzero().squeeze(1)
    slot = torch.full((batch * length,), -1, dtype=torch.long)
    slot[flat] = torch.arange(flat.numel())
    return flat, slot[torch.tensor(teacher)], slot[torch.tensor(student)], torch.tensor(sample)


def dual_path_hidden(
    backbone,
    batch: dict,
    layout: CheckedLayout | None = None,
    alignment_layer: str = "last",
    outputs: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(last hidden states [batch, length, hidden], attention-alignment loss) of a collated
    dual-path batch; the backbone's text layers must run the dual-path attention. `layout`: the
    batch's layout already checked (crystal_ext.ops.layout.check_layout), which the text layers
    then take as it is; without it the first text layer checks the layout. `alignment_layer`:
    the layer whose attention the loss reads (crystal_ext.model.alignment_layer; its index goes
    to the layers in the output slot, the model's config is left as it is). `outputs`: the
    forward's output slot, for a caller that reads more from it than the loss (the pictures' probe)."""
    index = alignment_layer_index(backbone.config, alignment_layer)
    slot: dict = {} if outputs is None else outputs
    slot[ALIGNMENT_LAYER_KEY] = index
    if layout is not None:
        slot[CHECKED_LAYOUT_KEY] = layout
    # attention_mask=None on purpose: the layout marks padding, and without a 2-D mask the
    # registered mask function builds no L x L mask. The family may add inputs (Gemma 3: which
    # tokens are image tokens, and no masks at all).
    family = family_of(backbone.config)
    use_path_scans(backbone)  # linear-attention / convolution layers: one scan per path
    kwargs = {"attention_mask": None, **family.dual_path_inputs(backbone.config, batch["input_ids"])}
    hidden = backbone(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        use_cache=False,
        **kwargs,
        **batch["images"],
        **{LAYOUT_KWARG: batch["layout"], OUTPUTS_KWARG: slot},
    ).last_hidden_state
    if ALIGNMENT_LOSS_KEY not in slot:
        raise RuntimeError(
            f"crystal_objective: text layer {index} ({alignment_layer!r}) did not report the "
            "attention-alignment loss (is it a text decoder attention run through crystal_dual_path?)"
        )
    return hidden, slot[ALIGNMENT_LOSS_KEY]


def crystal_objective(model, batch: dict, config: ObjectiveConfig = ObjectiveConfig()) -> CrystalLoss:
    """The training loss of one collated batch (crystal_ext.data.packing.DualPathCollator).

    The batch's layout is read and checked here, once per forward; the text layers and the
    LM-head losses take the checked value (its Segments) from here on."""
    model, backbone, head = backbone_and_head(model)
    fn = _with_new_token_rows(config.lm_head_fn(), model)
    family = family_of(model)
    transform = family.logit_transform(model.config)
    if not config.crystal:
        return _baseline(model, family, backbone, head, batch, fn, transform)
    _require_dual_path_attention(model)
    layout = check_layout(batch["layout"], *batch["input_ids"].shape, "crystal_objective")
    with recording_router_logits(model, family) as router:  # the MoE router term the stock forward adds
        hidden, kl_attn = dual_path_hidden(backbone, batch, layout, config.alignment_layer)
    rows, indices = _lm_head_indices(
        config, batch["targets"], layout.segments, head.weight.shape[0], hidden.device
    )
    ce, kl_pred = fn(
        hidden.flatten(0, 1)[rows],
        head.weight,
        *indices,
        bias=head.bias,
        **transform.op_kwargs(),
    )
    loss = router.with_path1_term(ce + config.lambda_pred * kl_pred + config.lambda_attn * kl_attn, batch)
    return CrystalLoss(loss, ce, kl_pred, kl_attn)


def _require_dual_path_attention(model) -> None:
    attn = text_config(model)._attn_implementation
    if attn != ATTN_IMPLEMENTATION:
        raise ValueError(
            f"crystal_objective: the text layers run {attn!r} attention; call "
            f"crystal_ext.register_dual_path_attention() and model.set_attn_implementation('{ATTN_IMPLEMENTATION}')"
        )


def _lm_head_indices(config: ObjectiveConfig, targets: torch.Tensor, samples, vocab: int, device) -> tuple:
    """(the flat rows of the hidden states that need logits, on `device`; the LM-head losses'
    index arguments after hidden and weight): for the fused op its plan, built once per forward on
    the host, where the indices are, so that the op reads nothing on the host and, on a GPU, waits
    for nothing (crystal_ext.ops.lm_head_plan); for the reference its index tensors."""
    targets_cpu = targets.cpu()
    flat, teacher, student, sample = _logit_rows(targets_cpu, samples)
    row_targets = targets_cpu.flatten()[flat]
    (flat_on_device,) = copy_to_device((flat,), device)
    if config.lm_head_losses == "fused":
        plan = lm_head_plan(
            row_targets, teacher, student, sample, config.topk_fraction, flat.numel(), vocab, device
        )
        return flat_on_device, (plan,)
    return flat_on_device, copy_to_device((row_targets, teacher, student, sample), device) + (
        config.topk_fraction,
    )


def _with_new_token_rows(fn, model):
    """`fn` with the trained rows of the new tokens as override rows of the frozen head, when
    the model trains them on their own."""
    rows = new_token_rows_of(model)
    if rows is None:
        return fn

    def with_rows(*args, **kwargs):
        return fn(*args, **kwargs, override_ids=rows.ids, override_rows=rows.lm_head_rows())

    return with_rows


def lm_head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The logits [N, V] that the objective's LM-head losses are computed from, for hidden rows
    [N, Hd]: the model's head, with the new tokens' trained rows in place of theirs, in float32
    (float64 for float64 rows), transformed as the model's forward transforms them (its family's
    logit transform: a scale, a soft-cap). Training never materialises them; the run-time check
    (crystal_ext.training.objective_check) compares them with the stock model's own logits."""
    model, _, head = backbone_and_head(model)
    transform = family_of(model).logit_transform(model.config)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = torch.nn.functional.linear(hidden, head.weight, head.bias).to(acc)
    rows = new_token_rows_of(model)
    if rows is not None:
        bias = None if head.bias is None else head.bias[rows.ids]
        new = torch.nn.functional.linear(hidden, rows.lm_head_rows().to(hidden.dtype), bias)
        logits = logits.index_copy(1, rows.ids, new.to(acc))
    return transform.apply(logits)


def intact_path_batch(batch: dict) -> dict:
    """The single-path batch [A, C, D, E] of a dual-path batch, with the intact images only."""
    keep = [seg.path1() for seg in segments_of(batch["layout"])]
    length = max(map(len, keep))
    device = batch["input_ids"].device
    index = torch.tensor([k + [k[-1]] * (length - len(k)) for k in keep], device=device)
    valid = torch.tensor([[i < len(k) for i in range(length)] for k in keep], device=device)

    def pick(t, fill):
        return torch.where(valid, t.gather(1, index), fill)

    pos = batch["position_ids"]
    rows = pos if pos.dim() == 3 else pos[None]  # [rows, batch, length]
    positions = torch.stack([torch.where(valid, r.gather(1, index), 0) for r in rows])
    return {
        "input_ids": pick(batch["input_ids"], 0),  # padding id is irrelevant: attention_mask hides it
        "targets": pick(batch["targets"], IGNORE),
        "attention_mask": valid.long(),
        "position_ids": positions if pos.dim() == 3 else positions[0],
        "images": batch["intact_images"],
    }


def _baseline(model, family, backbone, head, batch, fn, transform) -> CrystalLoss:
    single = intact_path_batch(batch)
    with recording_router_logits(model, family) as router:
        hidden = backbone(
            input_ids=single["input_ids"],
            position_ids=single["position_ids"],
            attention_mask=single["attention_mask"],
            use_cache=False,
            **family_of(model).single_path_inputs(model.config, single["input_ids"]),
            **single["images"],
        ).last_hidden_state
    targets = single["targets"].to(hidden.device)
    flat = (targets != IGNORE).flatten().nonzero().squeeze(1)
    none = torch.zeros(0, dtype=torch.long, device=hidden.device)
    head_kwargs = {"bias": head.bias, **transform.op_kwargs()}
    ce, _ = fn(
        hidden.flatten(0, 1)[flat], head.weight, targets.flatten()[flat], none, none, none, **head_kwargs
    )
    zero = ce.new_zeros(())
    return CrystalLoss(router.with_single_path_term(ce, single["attention_mask"]), ce, zero, zero)
