// The LM-head op's index plan as the kernels see it: one value, unpacked once from the schema's
// `Tensor[] plan` (the int64 tensors that crystal_ext/ops/lm_head_plan.py builds, in the order
// of CRYSTAL_LM_HEAD_PLAN_TENSORS, the one list of them on this side: plan_tensors.h) and
// `int paired_rows`, and its metadata checks (dtypes, devices, shapes; no value is read). The
// plan's values are checked by the CPU kernel, which reads them on the host anyway (host_plan,
// lm_head_losses_checks.h).
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>

#include "plan_tensors.h"

// All int64, on hidden's device, in the order of crystal_ext.ops.lm_head_plan.PlanTensors:
//   rows          [R] rows of hidden needing logits, paired rows first
//   row_targets   [R] their targets (-100: none)
//   ce_rows       [T] positions in rows of the targeted rows
//   pair_rows     [2, M] positions in rows of each pair's teacher, student
//   sample_pairs  [S, W] pairs of each sample, padded with -1
//   sample_k      [S] pairs kept per sample
//   kept_slots    [K] flat positions s * W + j (j < k_s) of kept ranks
#define CRYSTAL_LM_HEAD_PLAN_TENSORS(X) \
  X(rows) X(row_targets) X(ce_rows) X(pair_rows) X(sample_pairs) X(sample_k) X(kept_slots)

namespace crystal_ext {
namespace lm_head {

constexpr const char* kPlanTensorNames[] = {CRYSTAL_LM_HEAD_PLAN_TENSORS(CRYSTAL_PLAN_NAME)};
constexpr size_t kPlanTensors = sizeof(kPlanTensorNames) / sizeof(kPlanTensorNames[0]);

struct LmHeadPlan {
  CRYSTAL_LM_HEAD_PLAN_TENSORS(CRYSTAL_PLAN_FIELD)
  int64_t paired_rows = 0;  // rows[:paired_rows] are the paired rows
};

inline LmHeadPlan unpack_plan(at::TensorList plan, int64_t paired_rows) {
  check_plan_length(plan, "lm_head_losses", kPlanTensorNames, "lm_head_plan");
  LmHeadPlan out;
  size_t i = 0;
#define CRYSTAL_UNPACK(name) out.name = plan[i++];
  CRYSTAL_LM_HEAD_PLAN_TENSORS(CRYSTAL_UNPACK)
#undef CRYSTAL_UNPACK
  out.paired_rows = paired_rows;
  return out;
}

inline void check_plan_tensor(const at::Tensor& t, const char* name, const at::Tensor& hidden,
                              at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kLong, "lm_head_losses: plan tensor ", name,
                    " must be int64 (torch.long), got ", t.scalar_type());
  TORCH_CHECK(t.device() == hidden.device(), "lm_head_losses: plan tensor ", name,
              " must be on the device of hidden (", hidden.device(), "), got ", t.device());
  bool ok = t.dim() == static_cast<int64_t>(shape.size());
  for (size_t d = 0; ok && d < shape.size(); ++d) ok = shape[d] < 0 || t.size(d) == shape[d];
  TORCH_CHECK_VALUE(ok, "lm_head_losses: plan tensor ", name, " must have shape ", shape,
                    " (-1: any; build it with lm_head_plan), got ", t.sizes());
}

// Each plan tensor's dtype, device and shape (-1: any), the widths the tensors share agreeing.
inline void check_plan_tensors(const LmHeadPlan& plan, const at::Tensor& hidden) {
  check_plan_tensor(plan.rows, "rows", hidden, {-1});
  check_plan_tensor(plan.row_targets, "row_targets", hidden, {plan.rows.size(0)});
  check_plan_tensor(plan.ce_rows, "ce_rows", hidden, {-1});
  check_plan_tensor(plan.pair_rows, "pair_rows", hidden, {2, -1});
  check_plan_tensor(plan.sample_pairs, "sample_pairs", hidden, {-1, -1});
  check_plan_tensor(plan.sample_k, "sample_k", hidden, {plan.sample_pairs.size(0)});
  check_plan_tensor(plan.kept_slots, "kept_slots", hidden, {-1});
}

}  // namespace lm_head
}  // namespace crystal_ext
