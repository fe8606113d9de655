"""The CrystaL objective on a stock model: CE + lambda_pred * KL_pred + lambda_attn * KL_attn.

One forward of the model's backbone (not of the *ForConditionalGeneration wrapper, whose
forward would compute the full [B, L, V] logits) with dual-path attention; then
  - CE and KL_pred from the fused `lm_head_losses` on the last hidden states of the rows
    that need logits (targeted rows, and the E/F rows paired for the KL), with the model's
    own LM-head weight;
  - KL_attn from the fused attention-alignment loss, computed inside the last text layer
    and returned through the `crystal_outputs` forward kwarg.
`crystal=False` is the plain single-path SFT baseline: the intact path [A, C, D, E] alone,
with the model's own attention, CE only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import crystal_ext
from crystal_ext.attention_registration import (
    ALIGNMENT_LOSS_KEY, ATTN_IMPLEMENTATION, LAYOUT_KWARG, OUTPUTS_KWARG,
)
from crystal_ext.layout import E, F, validate_layout
from crystal_ext.packing import IGNORE


@dataclass
class CrystalLoss:
    loss: torch.Tensor
    ce: torch.Tensor
    kl_pred: torch.Tensor
    kl_attn: torch.Tensor


def _resolve_lm_head_losses(fn):
    if fn is not None:
        return fn
    fn = getattr(crystal_ext, "lm_head_losses", None)  # looked up at call time: the op lands separately
    if fn is None:
        raise RuntimeError(
            "crystal_objective: crystal_ext.lm_head_losses (the fused LM-head losses) is not available "
            "in this build; pass lm_head_losses=crystal_ext.reference.lm_head_losses to use the plain "
            "PyTorch reference explicitly"
        )
    return fn


def _parts(model):
    """(backbone returning last hidden states, LM head) of a possibly peft-wrapped model."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    backbone = getattr(model, model.base_model_prefix, None)
    head = model.get_output_embeddings()
    if backbone is None or head is None:
        raise ValueError(f"crystal_objective: cannot find the backbone and LM head of {type(model).__name__}")
    return model, backbone, head


def _text_attn_implementation(model) -> str | None:
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return text._attn_implementation


def _logit_rows(targets: torch.Tensor, rows: list[list[int]]):
    """Flat indices of the rows needing logits, their targets, and the (teacher, student, sample) pairs."""
    batch, length = targets.shape
    need = targets != IGNORE
    teacher, student, sample = [], [], []
    for b, r in enumerate(rows):
        (e0, e1), (f0, f1) = r[2 * E : 2 * E + 2], r[2 * F : 2 * F + 2]
        need[b, e0:e1] = True
        need[b, f0:f1] = True
        teacher += [b * length + i for i in range(e0, e1)]
        student += [b * length + i for i in range(f0, f1)]
        sample += [b] * (e1 - e0)
    flat = need.flatten().nonzero().squeeze(1)
    slot = torch.full((batch * length,), -1, dtype=torch.long)
    slot[flat] = torch.arange(flat.numel())
    return flat, slot[torch.tensor(teacher)], slot[torch.tensor(student)], torch.tensor(sample)


def crystal_objective(model, batch: dict, *, crystal: bool = True, lambda_pred: float = 1.0,
                      lambda_attn: float = 1.0, topk_fraction: float = 0.1, lm_head_losses=None) -> CrystalLoss:
    """The training loss of one collated batch (crystal_ext.packing.DualPathCollator).

    `lm_head_losses` defaults to the fused crystal_ext.lm_head_losses (an error if absent);
    tests pass crystal_ext.reference.lm_head_losses.
    """
    fn = _resolve_lm_head_losses(lm_head_losses)
    model, backbone, head = _parts(model)
    if not crystal:
        return _baseline(backbone, head, batch, fn)
    if _text_attn_implementation(model) != ATTN_IMPLEMENTATION:
        raise ValueError(
            f"crystal_objective: the text layers run {_text_attn_implementation(model)!r} attention; call "
            f"crystal_ext.register_dual_path_attention() and model.set_attn_implementation('{ATTN_IMPLEMENTATION}')"
        )
    input_ids, targets, layout = batch["input_ids"], batch["targets"], batch["layout"]
    rows = validate_layout(layout, *input_ids.shape, "crystal_objective")
    slot: dict = {}
    # attention_mask=None on purpose: the layout marks padding, and without a 2-D mask the
    # registered mask function builds no L x L mask.
    hidden = backbone(input_ids=input_ids, pixel_values=batch["pixel_values"],
                      image_grid_thw=batch["image_grid_thw"], position_ids=batch["position_ids"],
                      attention_mask=None, use_cache=False,
                      **{LAYOUT_KWARG: layout, OUTPUTS_KWARG: slot}).last_hidden_state
    if ALIGNMENT_LOSS_KEY not in slot:
        raise RuntimeError("crystal_objective: the last text layer did not report the attention-alignment "
                           "loss (is it a text decoder attention run through crystal_dual_path?)")
    flat, teacher, student, sample = (t.to(hidden.device) for t in _logit_rows(targets.cpu(), rows))
    ce, kl_pred = fn(hidden.flatten(0, 1)[flat], head.weight, targets.flatten()[flat].to(hidden.device),
                     teacher, student, sample, topk_fraction, bias=head.bias)
    kl_attn = slot[ALIGNMENT_LOSS_KEY]
    return CrystalLoss(ce + lambda_pred * kl_pred + lambda_attn * kl_attn, ce, kl_pred, kl_attn)


def intact_path_batch(batch: dict) -> dict:
    """The single-path batch [A, C, D, E] of a dual-path batch, with the intact images only."""
    rows = batch["layout"].reshape(-1, 12).tolist()
    keep = [list(range(0, r[1])) + list(range(r[4], r[9])) for r in rows]
    length = max(map(len, keep))
    index = torch.tensor([k + [k[-1]] * (length - len(k)) for k in keep])
    valid = torch.tensor([[i < len(k) for i in range(length)] for k in keep])
    pick = lambda t, fill: torch.where(valid, t.gather(1, index), fill)
    grid = batch["image_grid_thw"]
    patches = torch.split(batch["pixel_values"], grid.prod(-1).tolist())
    intact = batch["image_is_intact"]
    pos = batch["position_ids"]
    return {
        "input_ids": pick(batch["input_ids"], 0),  # padding id is irrelevant: attention_mask hides it
        "targets": pick(batch["targets"], IGNORE),
        "attention_mask": valid.long(),
        "position_ids": torch.stack([torch.where(valid, pos[a].gather(1, index), 0) for a in range(3)]),
        "pixel_values": torch.cat([p for p, ok in zip(patches, intact.tolist()) if ok]),
        "image_grid_thw": grid[intact],
    }


def _baseline(backbone, head, batch, fn) -> CrystalLoss:
    single = intact_path_batch(batch)
    hidden = backbone(input_ids=single["input_ids"], pixel_values=single["pixel_values"],
                      image_grid_thw=single["image_grid_thw"], position_ids=single["position_ids"],
                      attention_mask=single["attention_mask"], use_cache=False).last_hidden_state
    targets = single["targets"].to(hidden.device)
    flat = (targets != IGNORE).flatten().nonzero().squeeze(1)
    none = torch.zeros(0, dtype=torch.long, device=hidden.device)
    ce, _ = fn(hidden.flatten(0, 1)[flat], head.weight, targets.flatten()[flat], none, none, none, bias=head.bias)
    zero = ce.new_zeros(())
    return CrystalLoss(ce, ce, zero, zero)
