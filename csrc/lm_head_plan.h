// The LM-head op's index plan as the kernels see it: one value, unpacked once from the schema's
// `Tensor[] plan` (the seven int64 tensors that crystal_ext/ops/lm_head_plan.py builds, in the
// order of kPlanTensorNames) and `int paired_rows`, and its metadata checks (dtypes, devices,
// shapes; no value is read). The plan's values are checked by the CPU kernel, which reads them
// on the host anyway (host_plan, lm_head_losses_checks.h).
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>

namespace crystal_ext {
namespace lm_head {

// The schema's plan list, in order (crystal_ext.ops.lm_head_plan.PlanTensors).
constexpr const char* kPlanTensorNames[] = {"rows",         "row_targets", "ce_rows",
                                            "pair_rows",    "sample_pairs", "sample_k",
                                            "kept_slots"};
constexpr size_t kPlanTensors = sizeof(kPlanTensorNames) / sizeof(kPlanTensorNames[0]);

// All int64, on hidden's device.
struct LmHeadPlan {
  at::Tensor rows;          // [R] rows of hidden needing logits, paired rows first
  at::Tensor row_targets;   // [R] their targets (-100: none)
  at::Tensor ce_rows;       // [T] positions in rows of the targeted rows
  at::Tensor pair_rows;     // [2, M] positions in rows of each pair's teacher, student
  at::Tensor sample_pairs;  // [S, W] pairs of each sample, padded with -1
  at::Tensor sample_k;      // [S] pairs kept per sample
  at::Tensor kept_slots;    // [K] flat positions s * W + j (j < k_s) of kept ranks
  int64_t paired_rows = 0;  // rows[:paired_rows] are the paired rows
};

inline LmHeadPlan unpack_plan(at::TensorList plan, int64_t paired_rows) {
  TORCH_CHECK_VALUE(plan.size() == kPlanTensors, "lm_head_losses: plan must hold ", kPlanTensors,
                    " tensors (rows, row_targets, ce_rows, pair_rows, sample_pairs, sample_k, "
                    "kept_slots; build it with lm_head_plan), got ", plan.size());
  return LmHeadPlan{plan[0], plan[1], plan[2], plan[3], plan[4], plan[5], plan[6], paired_rows};
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
