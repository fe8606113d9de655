"""Plain-PyTorch references of the fused ops, written for clarity, with the fused ops'
signatures. The tests compare every fused op with its reference; the benchmarks time both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from crystal_ext.ops.checks import check_override, check_qk
from crystal_ext.ops.layout import dual_path_mask, validate_layout
from crystal_ext.ops.model_logits import check_logit_transform, model_logits

RENORM_EPS = 1e-8


def _dense_dual_path_probs(q, k, layout, scale):
    """(attention probabilities [B, H, L, L] under the dual-path mask, the mask [B, 1, L, L]).
    Grouped kv heads are repeated per query head here, for clarity."""
    length = q.shape[2]
    k_per_head = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = torch.matmul(q, k_per_head.transpose(-1, -2)) * scale
    visible = dual_path_mask(layout.to(q.device), length)[:, None]
    # finfo.min rather than -inf: padding rows see nothing and must not turn into NaN.
    return scores.masked_fill(~visible, torch.finfo(scores.dtype).min).softmax(dim=-1), visible


def attention_alignment_loss(
    q: torch.Tensor, k: torch.Tensor, layout: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """CrystaL's attention-alignment loss, computed the obvious way (dense [B, H, L, L]).

    For each sample: attention probabilities of the last layer with the dual-path mask,
    averaged over heads; rows E (teacher, detached) and F (student), columns D; each row
    renormalised over D (m / (m.sum() + 1e-8)); KL(teacher || student) with 'batchmean'
    (sum / |E|). The result is the mean over samples, returned in float32 (float64 for
    float64 inputs). Arithmetic runs in the input dtype, like a plain PyTorch model would.
    """
    op = "reference.attention_alignment_loss"
    check_qk(q, k, op)
    batch, _, length, head_dim = q.shape
    samples = validate_layout(layout, batch, length, op)
    scale = head_dim**-0.5 if scale is None else scale
    probs, _ = _dense_dual_path_probs(q, k, layout, scale)
    per_sample = []
    for b, seg in enumerate(samples):
        latent = slice(*seg.d)
        teacher = probs[b, :, slice(*seg.e), latent].mean(dim=0)
        student = probs[b, :, slice(*seg.f), latent].mean(dim=0)
        teacher = (teacher / (teacher.sum(-1, keepdim=True) + RENORM_EPS)).detach()
        student = student / (student.sum(-1, keepdim=True) + RENORM_EPS)
        per_sample.append(F.kl_div(student.log(), teacher, reduction="batchmean"))
    out_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.stack(per_sample).to(out_dtype).mean()


def lm_head_losses(
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
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CrystaL's LM-head losses with the full logits materialised.

    hidden [N, Hd], weight [V, Hd], bias [V] or None, targets [N] (-100 ignored; row i
    predicts targets[i]); pair i = (teacher_rows[i], student_rows[i]) of sample pair_sample[i].
    Returns (ce, kl):
      ce = mean cross entropy over rows whose target is not -100;
      kl = per pair KL(softmax(z_teacher) || softmax(z_student)) (teacher detached); per
           sample the mean of its top k = max(1, int(topk_fraction * n_pairs)) pairs; then
           the mean over samples that have pairs.
    No targeted rows (or no pairs) gives a zero ce (or kl) that still backpropagates.
    The logits come out of the linear layer in the input dtype (rounded to bf16/fp16 for
    bf16/fp16 inputs, as in a plain model) and are then upcast: the softmax, the losses and
    the logit gradients run in float32 (float64 for float64 inputs).
    override_ids [n] / override_rows [n, Hd]: the logits of column override_ids[j] are
    hidden . override_rows[j] (+ that column's bias) instead of the weight's row
    (crystal_ext.ops.lm_head_losses); the weight is not copied.
    logit_scale, logit_softcap: the model's own logits, softcap(logit_scale * (h W^T + b))
    (crystal_ext.ops.model_logits), applied in float32 (float64) after the upcast.
    """
    scale, cap = check_logit_transform(logit_scale, logit_softcap, "reference.lm_head_losses")
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = F.linear(hidden, weight, bias).to(acc)  # [N, V]
    if check_override(weight, override_ids, override_rows, "reference.lm_head_losses"):
        column_bias = None if bias is None else bias[override_ids]
        replaced = F.linear(hidden, override_rows.to(hidden.dtype), column_bias).to(acc)
        logits = logits.index_copy(1, override_ids, replaced)
    logits = model_logits(logits, scale, cap)
    targeted = targets != -100
    if targeted.any():
        ce = F.cross_entropy(logits, targets, ignore_index=-100)
    else:
        ce = logits.sum() * 0.0
    if teacher_rows.numel() == 0:
        return ce, logits.sum() * 0.0
    teacher = logits[teacher_rows].detach().log_softmax(-1)
    student = logits[student_rows].log_softmax(-1)
    teacher_prob = teacher.exp()
    # 0 * log 0 = 0: a vocabulary entry the teacher gives probability 0 (a -inf logit)
    # contributes nothing, also where the student's logit is -inf too; a NaN stays NaN.
    terms = torch.where(teacher_prob == 0, 0.0, teacher_prob * (teacher - student))
    pair_kl = terms.sum(-1)  # [M]
    per_sample = []
    for sample in pair_sample.unique(sorted=True).tolist():
        values = pair_kl[pair_sample == sample]
        k = max(1, int(topk_fraction * values.numel()))
        per_sample.append(values.topk(k).values.mean())
    return ce, torch.stack(per_sample).mean()


def dual_path_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Dual-path attention with the dense [B, 1, L, L] mask: softmax(q k^T scale + mask) v.

    q [B, H, L, d], k and v [B, Hkv, L, d] (kv heads repeated per query head here, for
    clarity); returns [B, H, L, d] in q's dtype, with zeros on padding rows (after F.end).
    """
    op = "reference.dual_path_attention"
    check_qk(q, k, op)
    if not isinstance(v, torch.Tensor) or v.shape != k.shape or v.dtype != k.dtype:
        raise ValueError(f"{op}: v must be a tensor with the shape and dtype of k")
    batch, heads, length, head_dim = q.shape
    validate_layout(layout, batch, length, op)
    scale = head_dim**-0.5 if scale is None else scale
    probs, visible = _dense_dual_path_probs(q, k, layout, scale)
    # Padding rows see nothing: finfo.min makes them a uniform average, so zero them.
    probs = probs * visible.any(-1, keepdim=True)
    return torch.matmul(probs, v.repeat_interleave(heads // k.shape[1], dim=1))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as transformers' Llama / Qwen2 RMSNorm computes it: in float32 (float64 for
    float64 inputs), normalized values rounded to x's dtype, then times the weight."""
    accumulate = torch.float64 if x.dtype == torch.float64 else torch.float32
    x_acc = x.to(accumulate)
    normalized = x_acc * torch.rsqrt(x_acc.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normalized.to(x.dtype)
