r"""Fused LM-head losses (CrystaL's cross entropy and top-k prediction alignment), as a torch
custom op that never materialises the [N, V] logits.

Maths. Row r of hidden has logits z_r = softcap(scale (W h_r + b)) (W the LM head [V, Hd]; the
model's own logits, crystal_ext.ops.model_logits: scale = logit_scale, softcap(u) =
cap tanh(u / cap) with cap = logit_softcap, off by default). With lse_r = log sum_v exp(z_rv)
and p_r = softmax(z_r):

  ce   = (1/|T|) sum_{r in T} (lse_r - z_{r, t_r}),     T = rows whose target is not -100
  KL_i = sum_v p_{a_i v} (z_{a_i v} - z_{s_i v}) - lse_{a_i} + lse_{s_i}
         for pair i = (teacher row a_i, student row s_i), the teacher detached
  kl   = (1/|S|) sum_{samples s} (1/k_s) sum_{i in top-k_s} KL_i,
         k_s = max(1, int(topk_fraction * n_pairs_of_s)),  S = samples that have pairs.

Gradients. With the soft-cap's slope g_rv = d z_rv / d u_rv = 1 - (z_rv / cap)^2 (1 without a
cap), the expectation E_r = sum_v p_rv g_rv W_v and, per pair, the cross expectation
X_i = sum_v p_{a_i v} g_{s_i v} W_v (teacher probabilities, student slopes; X_i = E_{a_i}
without a cap):

  d ce / d h_r  = scale (E_r - g_{r t_r} W_{t_r}) / |T|
  d kl / d h_s  = scale sum_{kept i with s_i = s} c_i (E_{s_i} - X_i),   c_i = 1 / (k_s |S|)
  d ce / d W    = (scale/|T|) sum_r ((p_r - onehot(t_r)) * g_r) h_r^T,   d ce / d b = column sums
  d kl / d W    = scale sum_{kept i} c_i ((p_{s_i} - p_{a_i}) * g_{s_i}) h_{s_i}^T,  d kl / d b likewise.

How it is computed (csrc/lm_head_losses.h, csrc/cpu/, csrc/cuda/). The forward sweeps the
vocabulary in blocks for the rows that need logits (each row once, even when it is a CE row
and a teacher or student row), keeping for each row an online log-sum-exp (running max m,
running sum Z) and the running expectation O_r = sum_v exp(z_rv - m_r) W_v, rescaled like Z
when the max grows (the flash-attention trick with W as the value matrix), and for each pair
the cross term A_i = sum_v exp(z_av - m_a) (z_av - z_sv). At the end E_r = O_r / Z_r and
KL_i = A_i / Z_a - lse_a + lse_s (under a soft-cap O accumulates exp(z - m) g W, and each pair
also X_i, one more GEMM over the pairs' rows). So one sweep (two GEMMs per block: logits, then P W) gives
both losses and d ce / d hidden and every pair's d KL_i / d hidden, before the top-k selection
is known; the selection then only chooses the coefficients c_i. Logits, softmax statistics
and gradients are accumulated in float32 (float64 for float64 inputs) even for bf16/fp16
inputs. The backward multiplies the saved d ce / d hidden and d kl / d hidden ([N, Hd] each,
float32) by the two upstream gradients: no logits are recomputed for hidden. Only when weight
or bias requires grad does the backward sweep the vocabulary once more, for the CE rows and
the kept pairs' rows only, using the saved lse; with a frozen head nothing of that runs.

Override rows (the trained rows of new tokens in a frozen head): override_ids [n] and
override_rows R [n, Hd] stand for rows of W, the logits of column id_j being
softcap(scale (R_j h_r + b_{id_j})). The kernels take them themselves and only read W: per
vocabulary block they write the override columns' logits over the weight's, and take those
columns' entries out of the expectation GEMM's P to multiply R_j instead of W_{id_j}; the CE
gradient uses R_j for a target id_j. The weight and the bias get no gradient (the head is
frozen: a weight parameter that requires grad is refused); R gets, from the saved lse and pair
coefficients in [R, n] work (no vocabulary sweep),

  d ce / d R_j = (scale/|T|) sum_{r in T} (p_{r,id_j} - [t_r = id_j]) g_{r,id_j} h_r
  d kl / d R_j = scale sum_{kept i} c_i (p_{s_i,id_j} - p_{a_i,id_j}) g_{s_i,id_j} h_{s_i}

(csrc/lm_head_override.h, shared by both devices).

The index arguments reach the kernels as a plan (crystal_ext.ops.lm_head_plan.LmHeadPlan):
checked and built once on the host and copied to the device in one pinned asynchronous copy,
so that the op itself reads no value on the host; the per-sample top-k selection runs in ATen
ops on the compute device. A caller that has its indices on the host passes the plan (the
objective does); a plain call with index tensors builds it on every call.

Edge cases: no targeted rows gives ce = 0 and no pairs gives kl = 0; both still
backpropagate (zero gradients). Pairs may share rows; a row may be a teacher in one pair and
a student in another; ties in the top-k are broken towards the earlier pair.
"""

from __future__ import annotations

import torch

import crystal_ext.ops._extension as _extension
from crystal_ext.ops.checks import check_override
from crystal_ext.ops.lm_head_plan import LmHeadPlan, PlanTensors, lm_head_plan
from crystal_ext.ops.model_logits import check_logit_transform

_OP = "crystal_ext::lm_head_losses_fwd"
_NAME = "lm_head_losses"


def lm_head_losses(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor | LmHeadPlan,
    teacher_rows: torch.Tensor | None = None,
    student_rows: torch.Tensor | None = None,
    pair_sample: torch.Tensor | None = None,
    topk_fraction: float = 0.1,
    bias: torch.Tensor | None = None,
    override_ids: torch.Tensor | None = None,
    override_rows: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CrystaL's LM-head losses without materialising the logits.

    Args:
        hidden: [N, Hd] final hidden states, float32 / bfloat16 / float16 (float64 for tests).
        weight: [V, Hd] LM-head weight, same dtype and device.
        targets: int64 [N]; row i predicts targets[i] (already shifted); -100 is ignored. Or
            the `LmHeadPlan` of all four index arguments and topk_fraction
            (crystal_ext.ops.lm_head_plan.lm_head_plan(targets, teacher_rows, student_rows,
            pair_sample, topk_fraction, N, V, hidden.device)), which a caller that has them
            on the host builds once: with a plan the op reads no index value on the host and,
            on a GPU, never waits for the device. teacher_rows, student_rows and pair_sample
            are then None and topk_fraction is the plan's.
        teacher_rows, student_rows: int64 [M], row indices into hidden; pair i is
            (teacher_rows[i], student_rows[i]).
        pair_sample: int64 [M], the sample each pair belongs to (any integer labels).
        topk_fraction: per sample keep k = max(1, int(topk_fraction * n_pairs)) pairs; (0, 1].
        bias: optional [V] LM-head bias.
        override_ids, override_rows: optional int64 [n] unique ids in [0, V) and their rows
            [n, Hd]: the logits of column override_ids[j] are hidden . override_rows[j] (+ its
            bias) instead of the weight's row; the weight is only read and gets no gradient (nor
            does the bias), override_rows does (see the maths above).
        logit_scale: the model's logit multiplier, finite and > 0 (1: the head's output as it is).
        logit_softcap: None or 0 (no cap), or the cap of logit_softcap * tanh(z / logit_softcap)
            applied after the scale (crystal_ext.ops.model_logits).

    Index tensors (without a plan) may be on the CPU or on hidden's device; they are read on
    the host to build the plan (on a GPU: pass host copies, or the copy back waits for it).

    Returns:
        (ce, kl): scalars in float32 (float64 for float64 inputs). ce is the mean cross
        entropy over targeted rows (0 when there are none); kl the mean over samples of the
        mean of each sample's top-k pair KLs (0 when there are no pairs). Gradients reach
        hidden, and weight / bias only when they require grad.
    """
    _extension.require_fused(_NAME, hidden, weight)
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise ValueError(f"{_NAME}: hidden and weight must be tensors")
    scale, cap = check_logit_transform(logit_scale, logit_softcap, _NAME)
    plan = _plan_of(hidden, weight, targets, teacher_rows, student_rows, pair_sample, topk_fraction)
    if check_override(weight, override_ids, override_rows, _NAME, check_values=False):
        # The kernels take the rows in hidden's dtype; the cast is differentiable.
        override_rows = override_rows.to(hidden.dtype)
    grad_hidden = bool(torch.is_grad_enabled() and hidden.requires_grad)
    ce, kl, *_ = torch.ops.crystal_ext.lm_head_losses_fwd(
        hidden,
        weight,
        bias,
        plan.tensors,
        plan.paired_rows,
        override_ids,
        override_rows,
        scale,
        cap,
        grad_hidden,
    )
    return ce, kl


def _plan_of(hidden, weight, targets, teacher_rows, student_rows, pair_sample, topk_fraction) -> LmHeadPlan:
    """The caller's plan, checked against hidden and weight, or one built from the index tensors."""
    n_rows = hidden.shape[0] if hidden.dim() >= 1 else 0
    vocab = weight.shape[0] if weight.dim() >= 1 else 0
    if isinstance(targets, LmHeadPlan):
        plan = targets
        if not (teacher_rows is None and student_rows is None and pair_sample is None):
            raise ValueError(
                f"{_NAME}: with a plan (targets is an LmHeadPlan), teacher_rows, student_rows and "
                f"pair_sample must be None: the plan holds them"
            )
        if plan.device != hidden.device:
            raise RuntimeError(
                f"{_NAME}: targets (LmHeadPlan) was built on {plan.device}, but hidden is on {hidden.device}"
            )
        if (plan.n_rows, plan.vocab) != (n_rows, vocab):
            raise ValueError(
                f"{_NAME}: targets (LmHeadPlan) was built for {plan.n_rows} rows and vocabulary "
                f"{plan.vocab}, but hidden has {n_rows} rows and weight {vocab}"
            )
        return plan
    named = (
        ("targets", targets),
        ("teacher_rows", teacher_rows),
        ("student_rows", student_rows),
        ("pair_sample", pair_sample),
    )
    for name, t in named:
        # A tensor on another device would otherwise be read from wherever it is.
        if isinstance(t, torch.Tensor) and t.device.type != "cpu" and t.device != hidden.device:
            raise RuntimeError(
                f"{_NAME}: {name} must be on the CPU or on the device of hidden ({hidden.device}), got {t.device}"
            )
    return lm_head_plan(
        targets, teacher_rows, student_rows, pair_sample, topk_fraction, n_rows, vocab, hidden.device
    )


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _forward_outputs_fake(hidden: torch.Tensor, n_pairs: int, grad_hidden: bool) -> tuple[torch.Tensor, ...]:
    """Empty tensors shaped like the forward's outputs (ce, kl, d ce / d hidden, d kl / d hidden,
    lse, pair coefficients)."""
    acc = _accumulate_dtype(hidden.dtype)
    grad_shape = tuple(hidden.shape) if grad_hidden else (0,)
    return (
        hidden.new_empty((), dtype=acc),
        hidden.new_empty((), dtype=acc),
        hidden.new_empty(grad_shape, dtype=acc),
        hidden.new_empty(grad_shape, dtype=acc),
        hidden.new_empty((hidden.shape[0],), dtype=acc),
        hidden.new_empty((n_pairs,), dtype=acc),
    )


if _extension.extension_available():

    @torch.library.register_fake(_OP)
    def _forward_fake(
        hidden, weight, bias, plan, paired_rows, ids, rows, logit_scale, logit_softcap, grad_hidden
    ):
        return _forward_outputs_fake(hidden, PlanTensors(*plan).pair_rows.shape[1], grad_hidden)

    @torch.library.register_fake("crystal_ext::lm_head_losses_bwd")
    def _backward_fake(grad_ce, grad_kl, hidden, weight, bias, plan, paired_rows, ids, rows, *rest):
        *_transform_and_saved, (grad_hidden, grad_weight, grad_bias, grad_rows) = rest
        return (
            hidden.new_empty(hidden.shape) if grad_hidden else hidden.new_empty((0,)),
            weight.new_empty(weight.shape) if grad_weight else weight.new_empty((0,)),
            weight.new_empty((weight.shape[0],)) if grad_bias else weight.new_empty((0,)),
            rows.new_empty(rows.shape) if grad_rows else hidden.new_empty((0,)),
        )

    def _setup_context(ctx, inputs, output):
        hidden, weight, bias, plan, paired_rows, ids, rows, logit_scale, logit_softcap, grad_hidden = inputs
        _ce, _kl, grad_hidden_ce, grad_hidden_kl, lse, kl_coef = output
        ctx.grad_hidden = bool(grad_hidden)
        ctx.logit_transform = (logit_scale, logit_softcap)
        ctx.has_bias = bias is not None
        ctx.has_override = ids is not None
        ctx.paired_rows = paired_rows
        ctx.save_for_backward(
            hidden, weight, bias, ids, rows, grad_hidden_ce, grad_hidden_kl, lse, kl_coef, *plan
        )

    def _backward(ctx, grad_ce, grad_kl, *_unused):
        hidden, weight, bias, ids, rows, *saved = ctx.saved_tensors
        saved, plan = saved[:4], saved[4:]  # (grad_hidden_ce, grad_hidden_kl, lse, kl_coef), the plan
        need_hidden = ctx.needs_input_grad[0]
        # With override rows the head is frozen: the weight and the bias get no gradient (the
        # override columns' rows are trained through override_rows).
        need_weight = ctx.needs_input_grad[1] and not ctx.has_override
        need_bias = ctx.has_bias and ctx.needs_input_grad[2] and not ctx.has_override
        need_rows = ctx.has_override and ctx.needs_input_grad[6]
        if need_hidden and not ctx.grad_hidden:
            raise RuntimeError(
                "lm_head_losses: hidden did not require grad when the forward ran, so its "
                "gradient was not prepared; set requires_grad before calling the op"
            )
        # plan (a list: one None per tensor), paired_rows, override_ids, logit_scale,
        # logit_softcap, grad_hidden
        plan_none, rest_none = [None] * len(plan), (None, None, None)
        if not (need_hidden or need_weight or need_bias or need_rows):
            return (None, None, None, plan_none, None, None, None, *rest_none)
        mask = [bool(need_hidden), bool(need_weight), bool(need_bias), bool(need_rows)]
        gh, gw, gb, gr = torch.ops.crystal_ext.lm_head_losses_bwd(
            grad_ce, grad_kl, hidden, weight, bias, plan, ctx.paired_rows, ids, rows,
            *ctx.logit_transform, *saved, mask,
        )  # fmt: skip
        keep = lambda grad, needed: grad if needed else None  # noqa: E731
        return (
            keep(gh, need_hidden),
            keep(gw, need_weight),
            keep(gb, need_bias),
            plan_none,
            None,
            None,
            keep(gr, need_rows),
            *rest_none,
        )

    torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)
