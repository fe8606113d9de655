// Host-side helpers shared by the ops' entry points (CPU and CUDA).
#pragma once

#include <ATen/ATen.h>

namespace crystal_ext {

// Logits, softmax statistics and gradients accumulate in float32 for float32 / bfloat16 /
// float16 inputs, and in float64 for float64 inputs (gradcheck).
inline at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace crystal_ext
