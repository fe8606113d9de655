r"""Override rows for the LM-head losses: a few rows of a frozen LM head replaced by trained ones.

`override_ids` (int64 [n], unique ids in [0, V)) and `override_rows` ([n, Hd]) stand for rows
of the head: the logits of column override_ids[j] are hidden . override_rows[j] (+ that
column's bias), every other column uses the frozen weight. Only override_rows gets a gradient;
the [V, Hd] weight is neither copied nor given a gradient. This is how the new tokens' LM-head
rows are trained (crystal_ext.model.new_token_rows).

Gradient of the override rows from the coefficients the losses already use: with
p_r = softmax(z_r) and the op's saved lse_r, for override column j,

  d ce / d R_j = (scale/|T|) sum_{r in T} (p_{r,j} - [t_r = id_j]) g_{r,j} h_r
  d kl / d R_j = scale sum_{kept pairs i} c_i (p_{s_i,j} - p_{a_i,j}) g_{s_i,j} h_{s_i}

(c_i the pair coefficients of the top-k selection; z the model's logits and g their soft-cap
slope 1 - (z / cap)^2, 1 without a cap: crystal_ext.ops.model_logits): [N, n] work instead of
the [N, V] sweep of the weight gradient.

`crystal_ext.lm_head_losses(..., override_ids=, override_rows=)` runs the custom op
`crystal_ext::lm_head_losses_override_fwd` (fake kernel and autograd registered, so opcheck and
torch.compile apply) over the compiled `lm_head_losses_fwd`, which has no override arguments of
its own: the n rows are written into the weight for the duration of the call and the old rows
are put back right after (n x Hd values moved, the weight is not copied). The compiled forward
already returns d loss / d hidden computed with the override rows in place, and its saved lse
and pair coefficients give the row gradient above. The plain-PyTorch twin is
`crystal_ext.ops.reference.lm_head_losses(..., override_ids=, override_rows=)`.
"""

from __future__ import annotations

import torch

from crystal_ext.ops.lm_head_outputs import forward_outputs_fake
from crystal_ext.ops.lm_head_plan import PlanTensors
from crystal_ext.ops.model_logits import model_logits

_OP = "crystal_ext::lm_head_losses_override_fwd"


@torch.library.custom_op(_OP, mutates_args=())
def _override_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    plan: list[torch.Tensor],
    paired_rows: int,
    override_ids: torch.Tensor,
    override_rows: torch.Tensor,
    logit_scale: float,
    logit_softcap: float,
    grad_hidden: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The compiled forward with the override rows written into the weight for the call:
    (ce, kl, d ce / d hidden, d kl / d hidden, lse, pair coefficients), as lm_head_losses_fwd.
    plan, paired_rows: the plan (crystal_ext.ops.lm_head_plan.LmHeadPlan.tensors, .paired_rows)."""
    # Written through .data and put back before returning: the weight is unchanged for every
    # reader, and its version counter (shared with its base: under FSDP the head and the
    # trained rows are views of one flat parameter) is not bumped, which would make autograd
    # reject every saved view of that base.
    storage = weight.data
    with torch.no_grad():
        kept = storage[override_ids].clone()
        storage[override_ids] = override_rows.detach().to(weight.dtype)
        try:
            out = torch.ops.crystal_ext.lm_head_losses_fwd(
                hidden, storage, bias, plan, paired_rows, logit_scale, logit_softcap, grad_hidden
            )
        finally:
            storage[override_ids] = kept
    return tuple(out)


@_override_forward.register_fake
def _override_forward_fake(hidden, weight, bias, plan, *rest):
    return forward_outputs_fake(hidden, PlanTensors(*plan).pair_rows.shape[1], rest[-1])


def _setup_context(ctx, inputs, output):
    hidden, _weight, bias, plan, _paired_rows, ids, override, logit_scale, logit_softcap, _grads = inputs
    _ce, _kl, grad_ce, grad_kl, lse, coef = output
    ctx.logit_transform = (logit_scale, logit_softcap)
    plan = PlanTensors(*plan)
    ctx.save_for_backward(
        hidden, override, bias, plan.rows, plan.row_targets, plan.ce_rows, plan.pair_rows, ids,
        grad_ce, grad_kl, lse, coef,
    )  # fmt: skip


def _backward(ctx, g_ce, g_kl, *_unused):
    (hidden, override, bias, rows, row_targets, ce_rows, pair_rows, ids, grad_ce, grad_kl, lse, coef) = (
        ctx.saved_tensors
    )
    acc = lse.dtype
    grad_hidden = None
    if ctx.needs_input_grad[0]:
        if grad_ce.numel() == 0:
            raise RuntimeError(
                "lm_head_losses: hidden did not require grad when the forward ran, so its "
                "gradient was not prepared; set requires_grad before calling the op"
            )
        grad_hidden = (g_ce * grad_ce + g_kl * grad_kl).to(hidden.dtype)
    # The override columns of the logits of the rows that have logits (the plan's rows), [R, n].
    h = hidden[rows].to(acc)
    z = h @ override.to(hidden.dtype).to(acc).T
    if bias is not None:
        z = z + bias[ids].to(acc)
    scale, cap = ctx.logit_transform
    z = model_logits(z, scale, cap)
    p = (z - lse[rows][:, None]).exp()
    # CE rows (their count is a shape: nothing is read on the host).
    onehot = (row_targets[ce_rows][:, None] == ids[None, :]).to(acc)
    dz = torch.zeros_like(p).index_add(0, ce_rows, (p[ce_rows] - onehot) * (g_ce / max(ce_rows.numel(), 1)))
    if pair_rows.shape[1]:
        teacher, student = pair_rows[0], pair_rows[1]
        dz = dz.index_add(0, student, coef[:, None] * (p[student] - p[teacher]) * g_kl)
    if cap:  # each row's gradient through its own soft-cap slope (the student's for the KL)
        dz = dz * (1 - z / cap) * (1 + z / cap)
    grad_override = (scale * (dz.T @ h)).to(override.dtype) if ctx.needs_input_grad[6] else None
    no_plan_grads = [None] * len(PlanTensors._fields)
    return (grad_hidden, None, None, no_plan_grads, None, None, grad_override, None, None, None)


_override_forward.register_autograd(_backward, setup_context=_setup_context)


def override_lm_head_losses(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    plan,
    override_ids: torch.Tensor,
    override_rows: torch.Tensor,
    logit_scale: float = 1.0,
    logit_softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The compiled losses with override rows, for crystal_ext.lm_head_losses, which checked
    the override, the logit transform and built the plan (crystal_ext.ops.lm_head_plan.LmHeadPlan)."""
    grads = torch.is_grad_enabled() and (hidden.requires_grad or override_rows.requires_grad)
    ce, kl, *_ = _override_forward(
        hidden,
        weight,
        bias,
        plan.tensors,
        plan.paired_rows,
        override_ids,
        override_rows,
        logit_scale,
        logit_softcap,
        bool(grads),
    )
    return ce, kl
