// Input validation of rms_norm (csrc/cpu/rms_norm.cpp). Every message names the argument and
// what was expected. Shape, dtype and value problems raise ValueError (TORCH_CHECK_VALUE);
// device problems RuntimeError (TORCH_CHECK).
#pragma once

#include <ATen/ATen.h>

#include <cmath>

namespace crystal_ext {
namespace rms_norm {

inline at::ScalarType accumulate_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_forward(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) > 0,
                    "rms_norm: x must have a non-empty last (normalized) dimension, got shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(x.scalar_type()),
                    "rms_norm: x must be float32, bfloat16, float16 or float64, got ",
                    x.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == x.size(-1),
                    "rms_norm: weight must be 1-D of x's last size ", x.size(-1), ", got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(weight.scalar_type() == x.scalar_type(), "rms_norm: weight must have x's dtype ",
                    x.scalar_type(), ", got ", weight.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), "rms_norm: weight must be on x's device ", x.device(),
              ", got ", weight.device());
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "rms_norm: eps must be finite and >= 0, got ",
                    eps);
}

inline void check_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                           const at::Tensor& rstd) {
  check_forward(x, weight, 0.0);
  TORCH_CHECK_VALUE(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type(),
                    "rms_norm: grad_y must have x's shape ", x.sizes(), " and dtype ",
                    x.scalar_type(), ", got ", grad_y.sizes(), " ", grad_y.scalar_type());
  TORCH_CHECK_VALUE(rstd.sizes() == x.sizes().slice(0, x.dim() - 1) &&
                        rstd.scalar_type() == accumulate_dtype(x.scalar_type()),
                    "rms_norm: rstd must be the forward's [", x.sizes().slice(0, x.dim() - 1),
                    "] ", accumulate_dtype(x.scalar_type()), " tensor, got ", rstd.sizes(), " ",
                    rstd.scalar_type());
  TORCH_CHECK(grad_y.device() == x.device() && rstd.device() == x.device(),
              "rms_norm: grad_y and rstd must be on x's device ", x.device());
}

}  // namespace rms_norm
}  // namespace crystal_ext
