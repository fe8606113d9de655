// The attention-alignment op's index plan as the kernels see it: one value, unpacked once from
// the schema's `Tensor[] plan` (the int64 tensors that alignment_indices in
// crystal_ext/ops/attention_alignment_loss.py builds, in the order of
// CRYSTAL_ALIGNMENT_PLAN_TENSORS, the one list of them on this side: plan_tensors.h). Their
// metadata is checked in attention_alignment_loss_checks.h.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>

#include "plan_tensors.h"

// All int64, on q's device, in the order of
// crystal_ext.ops.attention_alignment_loss.AlignmentPlanTensors (rows padded with position 0):
//   layout          [B, 6, 2] the validated layout
//   answer_rows     [2, B, max |E|] packed rows of E (path 0) and F (path 1)
//   intact_keys     [B, max keys] keys of the intact path, [A, C, D, E]
//   corrupted_keys  [B, max keys] keys of the corrupted path, [A, B, D, F]
//   latent_keys     [B, max |D|] the latent keys D
#define CRYSTAL_ALIGNMENT_PLAN_TENSORS(X) \
  X(layout) X(answer_rows) X(intact_keys) X(corrupted_keys) X(latent_keys)

namespace crystal_ext {
namespace attention_alignment {

constexpr const char* kPlanTensorNames[] = {CRYSTAL_ALIGNMENT_PLAN_TENSORS(CRYSTAL_PLAN_NAME)};

struct AlignmentPlan {
  CRYSTAL_ALIGNMENT_PLAN_TENSORS(CRYSTAL_PLAN_FIELD)
  // The key indices of a path (0: intact, 1: corrupted).
  const at::Tensor& path_keys(int path) const { return path == 0 ? intact_keys : corrupted_keys; }
};

inline AlignmentPlan unpack_plan(at::TensorList plan) {
  check_plan_length(plan, "attention_alignment_loss", kPlanTensorNames, "alignment_indices");
  AlignmentPlan out;
  size_t i = 0;
#define CRYSTAL_UNPACK(name) out.name = plan[i++];
  CRYSTAL_ALIGNMENT_PLAN_TENSORS(CRYSTAL_UNPACK)
#undef CRYSTAL_UNPACK
  return out;
}

}  // namespace attention_alignment
}  // namespace crystal_ext
