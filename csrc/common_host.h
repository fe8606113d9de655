// Host-side helpers shared by the ops' entry points (CPU and CUDA).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>

namespace crystal_ext {

// Logits, softmax statistics and gradients accumulate in float32 for float32 / bfloat16 /
// float16 inputs, and in float64 for float64 inputs (gradcheck).
inline at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// A small tensor built on the host, on `device` without blocking the host: copied through
// pinned memory, non-blocking on the current stream (ATen's pinned-memory allocator keeps the
// staging buffer until the copy has run). A pageable copy would wait for the queued GPU work.
inline at::Tensor to_device_async(const at::Tensor& host, const at::Device& device) {
  return host.pin_memory().to(device, /*non_blocking=*/true);
}

// Pins the ops' fp32 GEMMs to full fp32 on the GPU for its scope: TF32 off whatever
// torch.backends.cuda.matmul.allow_tf32 / torch.set_float32_matmul_precision say, so that the
// logits, scores and the paired rows' expectation GEMMs keep their 23-bit mantissa. Thread-local
// (ATen's NoTF32Guard): other threads' GEMMs and the global flag are untouched.
class Fp32GemmPrecisionGuard {
 public:
  Fp32GemmPrecisionGuard() = default;
  Fp32GemmPrecisionGuard(const Fp32GemmPrecisionGuard&) = delete;
  Fp32GemmPrecisionGuard& operator=(const Fp32GemmPrecisionGuard&) = delete;

 private:
  at::NoTF32Guard no_tf32_;
};

}  // namespace crystal_ext
