// An op's index plan crosses the Python / C++ boundary as one `Tensor[] plan` schema argument.
// Each plan's field list is written once on this side, as an X-macro
// (CRYSTAL_<PLAN>_TENSORS(X), X(name) per field in schema order), from which its struct, its
// names and its unpacking are generated; the Python side has one NamedTuple per plan, and
// crystal_ext.ops._extension checks the two lists against each other when the extension loads
// (the names reach Python through crystal_ext._C.plan_tensor_names()).
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <string>

// Helpers for the X-macros: a struct field, a name string.
#define CRYSTAL_PLAN_FIELD(name) at::Tensor name;
#define CRYSTAL_PLAN_NAME(name) #name,

namespace crystal_ext {

// "a, b, c" from a plan's names, for messages.
template <size_t N>
std::string joined_names(const char* const (&names)[N]) {
  std::string out;
  for (size_t i = 0; i < N; ++i) out += (i ? ", " : "") + std::string(names[i]);
  return out;
}

// Refuses a plan list of the wrong length, naming the argument, the expected tensors and the
// function that builds the plan.
template <size_t N>
void check_plan_length(at::TensorList plan, const char* op, const char* const (&names)[N],
                       const char* builder) {
  TORCH_CHECK_VALUE(plan.size() == N, op, ": plan must hold ", N, " tensors (",
                    joined_names(names), "; build it with ", builder, "), got ", plan.size());
}

}  // namespace crystal_ext
