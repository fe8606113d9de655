// Override rows of the LM-head losses: a few trained rows standing in for rows of a frozen head.
// `override_ids` int64 [n] (unique, in [0, V)) and `override_rows` [n, Hd] (hidden's dtype):
// the logits of column ids[j] are h . rows[j] (+ that column's bias), every other column uses
// the weight, which is only read. The kernels of both devices take them themselves: per
// vocabulary block they write the override columns' logits over the weight's
// (OverrideLogits), take those columns out of P before the expectation GEMM and add
// P[:, ids[j]] rows[j] instead, and the CE gradient uses rows[j] for a target ids[j]
// (target_weight_rows). The backward gives d rows from the saved lse and pair coefficients in
// [R, n] work (override_rows_grad; the formulas are in crystal_ext/ops/lm_head_losses.py). This
// header holds what both devices share: the checks (metadata always; the ids' values only where
// they are on the CPU, a free read: ids on a GPU are checked where they are made) and the ATen
// code that runs the same on every device.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "lm_head_losses_checks.h"
#include "lm_head_plan.h"

namespace crystal_ext {
namespace lm_head {

struct Override {
  at::Tensor ids;   // [n] int64, on hidden's device
  at::Tensor rows;  // [n, Hd], hidden's dtype and device
  bool given() const { return ids.defined(); }
  int64_t size() const { return given() ? ids.size(0) : 0; }
};

inline Override check_override(const c10::optional<at::Tensor>& ids_in,
                               const c10::optional<at::Tensor>& rows_in, const at::Tensor& hidden,
                               const Problem& p) {
  const bool has_ids = ids_in.has_value() && ids_in->defined();
  const bool has_rows = rows_in.has_value() && rows_in->defined();
  TORCH_CHECK_VALUE(has_ids == has_rows, "lm_head_losses: override_ids and override_rows must "
                    "be given together");
  if (!has_ids) return {};
  const at::Tensor& ids = *ids_in;
  const at::Tensor& rows = *rows_in;
  TORCH_CHECK_VALUE(ids.dim() == 1 && ids.scalar_type() == at::kLong, "lm_head_losses: "
                    "override_ids must be a 1-D int64 tensor, got ", ids.scalar_type(), " of "
                    "shape ", ids.sizes());
  const int64_t n = ids.size(0);
  TORCH_CHECK_VALUE(rows.dim() == 2 && rows.size(0) == n && rows.size(1) == p.hidden_dim,
                    "lm_head_losses: override_rows must be [", n, ", ", p.hidden_dim,
                    "] (len(override_ids), hidden_dim), got ", rows.sizes());
  TORCH_CHECK_VALUE(rows.scalar_type() == hidden.scalar_type(), "lm_head_losses: override_rows "
                    "must have the dtype of hidden (", hidden.scalar_type(), "), got ",
                    rows.scalar_type());
  TORCH_CHECK(ids.device() == hidden.device() && rows.device() == hidden.device(),
              "lm_head_losses: override_ids and override_rows must be on the device of hidden (",
              hidden.device(), "), got ", ids.device(), " and ", rows.device());
  if (ids.device().is_cpu()) {
    const at::Tensor c = ids.contiguous();
    const int64_t* v = c.data_ptr<int64_t>();
    std::vector<char> seen(p.vocab, 0);
    for (int64_t j = 0; j < n; ++j) {
      TORCH_CHECK_VALUE(v[j] >= 0 && v[j] < p.vocab, "lm_head_losses: override_ids must be in [0, ",
                        p.vocab, ") (the vocabulary), got override_ids[", j, "] = ", v[j]);
      TORCH_CHECK_VALUE(!seen[v[j]], "lm_head_losses: override_ids has duplicates: override_ids[",
                        j, "] = ", v[j], " repeats an earlier id");
      seen[v[j]] = 1;
    }
  }
  return {ids.contiguous(), rows.contiguous()};
}

// The weight's rows of each logit row's target ([R] in the plan's order, -100 allowed), in acc,
// with rows[j] for a target ids[j]: the W_t of the CE gradient scale (E_r - g_t W_t).
inline at::Tensor target_weight_rows(const at::Tensor& weight, const at::Tensor& targets,
                                     const Override& ov, at::ScalarType acc) {
  const at::Tensor safe = targets.clamp_min(0);
  at::Tensor w = weight.index_select(0, safe).to(acc);
  if (!ov.given() || ov.size() == 0) return w.contiguous();
  const at::Tensor match = targets.unsqueeze(1).eq(ov.ids.unsqueeze(0));  // [R, n]
  const at::Tensor which = match.to(at::kLong).argmax(1);
  const at::Tensor replaced = ov.rows.index_select(0, which).to(acc);
  return at::where(match.any(1).unsqueeze(1), replaced, w).contiguous();
}

// The override columns' raw logits h . rows[j] of a chunk's hidden rows h [R, Hd] (acc), [R, n]
// in acc; the bias and the model's transform are applied where the block's other logits get
// theirs.
inline at::Tensor override_raw_logits(const at::Tensor& h_acc, const Override& ov,
                                      at::ScalarType acc) {
  return at::mm(h_acc, ov.rows.to(acc).t()).contiguous();
}

// d loss / d rows: for override column j, with p = exp(z - lse) from the saved lse and
// g the soft-cap slope of each row's own logit (the student's for the KL),
//   scale * sum_r [ (g_ce/|T|) (p_rj - [t_r = id_j]) over CE rows
//                   + g_kl sum_{pairs i with student r} c_i (p_{s_i j} - p_{a_i j}) ] g_rj h_r.
// ATen ops on the compute device: [R, n] work, nothing read on the host.
inline at::Tensor override_rows_grad(const Problem& p, const LmHeadPlan& plan,
                                     const at::Tensor& hidden, const c10::optional<at::Tensor>& bias,
                                     const Override& ov, const at::Tensor& lse,
                                     const at::Tensor& coef, const at::Tensor& grad_ce,
                                     const at::Tensor& grad_kl, at::ScalarType acc) {
  const at::Tensor h = hidden.index_select(0, plan.rows).to(acc);  // [R, Hd]
  at::Tensor z = at::mm(h, ov.rows.to(acc).t());                  // [R, n]
  if (bias.has_value() && bias->defined()) z = z + bias->index_select(0, ov.ids).to(acc);
  z = z * p.logit_scale;
  if (p.capped()) z = at::tanh(z / p.logit_softcap) * p.logit_softcap;
  const at::Tensor prob = (z - lse.index_select(0, plan.rows).to(acc).unsqueeze(1)).exp();
  at::Tensor dz = at::zeros_like(prob);
  if (p.n_targeted > 0) {
    const at::Tensor onehot =
        plan.row_targets.index_select(0, plan.ce_rows).unsqueeze(1).eq(ov.ids.unsqueeze(0)).to(acc);
    const at::Tensor g = grad_ce.to(acc) / static_cast<double>(p.n_targeted);
    dz.index_add_(0, plan.ce_rows, (prob.index_select(0, plan.ce_rows) - onehot) * g);
  }
  if (p.n_pairs > 0) {
    const at::Tensor teacher = plan.pair_rows.select(0, 0), student = plan.pair_rows.select(0, 1);
    const at::Tensor diff = prob.index_select(0, student) - prob.index_select(0, teacher);
    dz.index_add_(0, student, diff * coef.to(acc).unsqueeze(1) * grad_kl.to(acc));
  }
  if (p.capped()) dz = dz * (1 - z / p.logit_softcap) * (1 + z / p.logit_softcap);
  return (at::mm(dz.t(), h) * p.logit_scale).to(ov.rows.scalar_type());
}

}  // namespace lm_head
}  // namespace crystal_ext
