r"""Override rows for the LM-head losses: a few rows of a frozen LM head replaced by trained ones.

`override_ids` (int64 [n], unique ids in [0, V)) and `override_rows` ([n, Hd]) stand for rows
of the head: the logits of column override_ids[j] are hidden . override_rows[j] (+ that
column's bias), every other column uses the frozen weight. Only override_rows gets a gradient;
the [V, Hd] weight is neither copied nor given a gradient. This is how the new tokens' LM-head
rows are trained (crystal_ext.model.new_token_rows).

Gradient of the override rows from the coefficients the losses already use: with
p_r = softmax(z_r) and the op's saved lse_r, for override column j,

  d ce / d R_j = (1/|T|) sum_{r in T} (p_{r,j} - [t_r = id_j]) h_r
  d kl / d R_j = sum_{kept pairs i} c_i (p_{s_i,j} - p_{a_i,j}) h_{s_i}

(c_i the pair coefficients of the top-k selection): [N, n] work instead of the [N, V] sweep
of the weight gradient.

`lm_head_losses_with_override` runs the compiled op, which has no override arguments of its
own: the n rows are written into the weight for the duration of the forward call and the old
rows are put back right after (n x Hd values moved, the weight is not copied). The op's forward
already returns d loss / d hidden computed with the override rows in place, and its saved lse
and pair coefficients give the row gradient above. The plain-PyTorch twin is
`crystal_ext.ops.reference.lm_head_losses(..., override_ids=, override_rows=)`.
"""

from __future__ import annotations

import torch


def check_override(weight: torch.Tensor, override_ids, override_rows, op: str) -> bool:
    """True when an override is given (both arguments), after checking it; errors name the argument."""
    if override_ids is None and override_rows is None:
        return False
    if override_ids is None or override_rows is None:
        raise ValueError(f"{op}: override_ids and override_rows must be given together")
    if not isinstance(override_ids, torch.Tensor) or override_ids.dim() != 1:
        raise ValueError(f"{op}: override_ids must be a 1-D int64 tensor")
    if override_ids.dtype != torch.long:
        raise ValueError(f"{op}: override_ids must be int64, got {override_ids.dtype}")
    vocab, width = weight.shape
    n = override_ids.numel()
    if not isinstance(override_rows, torch.Tensor) or tuple(override_rows.shape) != (n, width):
        got = list(override_rows.shape) if isinstance(override_rows, torch.Tensor) else type(override_rows)
        raise ValueError(f"{op}: override_rows must be [{n}, {width}] (len(override_ids), Hd), got {got}")
    if not override_rows.is_floating_point():
        raise ValueError(f"{op}: override_rows must be floating point, got {override_rows.dtype}")
    if override_ids.device != weight.device or override_rows.device != weight.device:
        raise RuntimeError(
            f"{op}: override_ids and override_rows must be on the weight's device ({weight.device})"
        )
    if n and (int(override_ids.min()) < 0 or int(override_ids.max()) >= vocab):
        raise ValueError(f"{op}: override_ids must be in [0, {vocab}), got {override_ids.tolist()}")
    if override_ids.unique().numel() != n:
        raise ValueError(f"{op}: override_ids has duplicates: {override_ids.tolist()}")
    return True


class _OverrideRows(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden, override_rows, weight, bias, targets, teacher, student, sample, topk, ids, grads
    ):
        # Written through .data: the write is undone before anything reads the weight again,
        # and must not bump the version counter that the weight shares with its base (under
        # FSDP the head and the trained rows are views of one flat parameter, and autograd
        # would then reject every saved view of it).
        storage = weight.data
        with torch.no_grad():
            kept = storage[ids].clone()
            storage[ids] = override_rows.detach().to(weight.dtype)
            try:
                ce, kl, grad_ce, grad_kl, lse, coef = torch.ops.crystal_ext.lm_head_losses_fwd(
                    hidden, storage, bias, targets, teacher, student, sample, float(topk), grads
                )
            finally:
                storage[ids] = kept
        ctx.save_for_backward(
            hidden, override_rows, bias, targets, teacher, student, ids, grad_ce, grad_kl, lse, coef
        )
        return ce, kl

    @staticmethod
    def backward(ctx, g_ce, g_kl):
        hidden, rows, bias, targets, teacher, student, ids, grad_ce, grad_kl, lse, coef = ctx.saved_tensors
        acc = lse.dtype
        grad_hidden = (g_ce * grad_ce + g_kl * grad_kl).to(hidden.dtype)
        h = hidden.to(acc)
        z = h @ rows.to(hidden.dtype).to(acc).T  # [N, n]: the override columns of the logits
        if bias is not None:
            z = z + bias[ids].to(acc)
        p = (z - lse[:, None]).exp()
        targeted = (targets != -100).to(acc)
        onehot = (targets[:, None] == ids[None, :]).to(acc)
        # No targeted rows: every term is multiplied by 0 (the clamp only avoids 0 / 0).
        dz = (p - onehot) * targeted[:, None] * (g_ce / targeted.sum().clamp(min=1))
        if teacher.numel():
            dz = dz.index_add(0, student, coef[:, None] * (p[student] - p[teacher]) * g_kl)
        grad_rows = (dz.T @ h).to(rows.dtype)
        return grad_hidden, grad_rows, None, None, None, None, None, None, None, None, None


def lm_head_losses_with_override(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    teacher_rows: torch.Tensor,
    student_rows: torch.Tensor,
    pair_sample: torch.Tensor,
    topk_fraction: float = 0.1,
    bias: torch.Tensor | None = None,
    override_ids: torch.Tensor | None = None,
    override_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`crystal_ext.lm_head_losses` with optional override rows (module docstring). With an
    override, weight and bias get no gradient (even when they require one: under FSDP with
    use_orig_params the frozen head arrives as a view of a flat parameter that does)."""
    from crystal_ext.ops import _extension
    from crystal_ext.ops.lm_head_losses import lm_head_losses

    if not check_override(weight, override_ids, override_rows, "lm_head_losses"):
        return lm_head_losses(
            hidden, weight, targets, teacher_rows, student_rows, pair_sample, topk_fraction, bias
        )
    _extension.require_fused("lm_head_losses", hidden, weight)
    return _OverrideRows.apply(
        hidden,
        override_rows,
        weight,
        bias,
        targets,
        teacher_rows,
        student_rows,
        pair_sample,
        topk_fraction,
        override_ids,
        torch.is_grad_enabled() and (hidden.requires_grad or override_rows.requires_grad),
    )
