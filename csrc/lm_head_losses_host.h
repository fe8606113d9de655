// The lm_head_losses entry points, one for both devices: the plan unpacked from the schema's
// arguments (lm_head_plan.h), the override rows checked (lm_head_override.h), input checks
// (always, in the forward and the backward; metadata only), contiguous operands, the accumulate
// dtype, the per-sample top-k selection (ATen ops on the compute device), the combination of the
// saved hidden gradients in the backward, the override rows' gradient and the empty placeholders
// for gradients not requested. csrc/cpu/lm_head_losses.cpp and csrc/cuda/lm_head_losses.cu
// supply only a Device: the device kernels (a forward sweep, a weight-gradient sweep) and what a
// call holds on that device, and register forward<Device> and backward<Device>.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <limits>
#include <tuple>
#include <utility>

#include "common_host.h"
#include "lm_head_losses_checks.h"
#include "lm_head_override.h"
#include "lm_head_plan.h"

namespace crystal_ext {
namespace lm_head {

struct ForwardOutputs {
  at::Tensor ce, kl, grad_ce, grad_kl, lse, coef;
};

// Forward sweep over the vocabulary: the two losses, each row's lse, each pair's d kl / d KL_i
// and, with grad_hidden, d ce / d hidden and d kl / d hidden (the logit scale already in them).
// The logit transform is p.logit_scale / p.logit_softcap; override rows (possibly none) stand in
// for their columns of the weight (lm_head_override.h).
using ForwardKernel = ForwardOutputs (*)(const Problem& p, const LmHeadPlan& plan,
                                         const at::Tensor& hidden, const at::Tensor& weight,
                                         const c10::optional<at::Tensor>& bias, const Override& ov,
                                         bool grad_hidden, at::ScalarType acc);

// Weight-gradient sweep: fills *grad_weight / *grad_bias (each may be null: not wanted) from
// the saved lse and coef and the upstream gradients grad_ce, grad_kl (scalar tensors).
using WeightGradKernel = void (*)(const Problem& p, const LmHeadPlan& plan, const at::Tensor& hidden,
                                  const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                  const at::Tensor& coef, const at::Tensor& lse,
                                  const at::Tensor& grad_ce, const at::Tensor& grad_kl,
                                  at::ScalarType acc, at::Tensor* grad_weight,
                                  at::Tensor* grad_bias);

// The per-sample top-k selection, in ATen ops on the pair KLs' device (no value is read on the
// host: on a GPU it queues like the kernels). Each sample's pair KLs are laid out in a row of
// an [S, W] grid (padding -inf), sorted descending with a stable sort, so that NaN ranks above
// every number (as in torch.topk) and ties go to the earlier pair; the first k_s ranks of each
// sample (kept_slots) are kept. Returns (kl, coef): kl = mean over samples of the mean of the
// kept KLs, coef[i] = d kl / d KL_i = 1 / (k_s S) for kept pairs and 0 otherwise (both in the
// KLs' dtype; the reduction in float64).
inline std::pair<at::Tensor, at::Tensor> select_topk(const at::Tensor& pair_kl, const LmHeadPlan& plan,
                                                     const Problem& p) {
  at::Tensor coef = at::zeros({p.n_pairs}, pair_kl.options());
  if (p.n_pairs == 0) return {at::zeros({}, pair_kl.options()), coef};
  const int64_t S = p.n_samples, W = p.max_pairs;
  const at::Tensor grid =
      pair_kl.index_select(0, plan.sample_pairs.clamp_min(0).reshape({-1}))
          .view({S, W})
          .masked_fill(plan.sample_pairs.lt(0), -std::numeric_limits<double>::infinity());
  const auto ranked = at::sort(grid, /*stable=*/true, /*dim=*/1, /*descending=*/true);
  const at::Tensor kept_pairs =
      plan.sample_pairs.gather(1, std::get<1>(ranked)).reshape({-1}).index_select(0, plan.kept_slots);
  const at::Tensor kept_sample = at::div(plan.kept_slots, W, "floor");
  const at::Tensor kept_coef =
      at::reciprocal(plan.sample_k.to(at::kDouble) * static_cast<double>(S)).index_select(0, kept_sample);
  coef.scatter_(0, kept_pairs, kept_coef.to(pair_kl.scalar_type()));
  const at::Tensor kept_kl =
      std::get<0>(ranked).reshape({-1}).index_select(0, plan.kept_slots).to(at::kDouble);
  return {(kept_kl * kept_coef).sum().to(pair_kl.scalar_type()), coef};
}

inline void check_kernel_device(const at::Tensor& hidden, at::DeviceType device) {
  TORCH_CHECK(hidden.device().type() == device, "lm_head_losses: the ", device,
              " kernel was called with hidden on ", hidden.device());
}

inline c10::optional<at::Tensor> contiguous_bias(const c10::optional<at::Tensor>& bias) {
  if (bias.has_value() && bias->defined()) return bias->contiguous();
  return c10::nullopt;
}

using ForwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The lm_head_losses_fwd kernel of a device: Device supplies kType (its at::DeviceType), Scope
// (constructed from hidden for the call: a device guard and the GEMM precision on CUDA,
// nothing on the CPU) and the kernels `forward` (a ForwardKernel) and `weight_grads` (a
// WeightGradKernel). See bindings.cpp for the schema.
template <typename Device>
ForwardResult forward(const at::Tensor& hidden_in, const at::Tensor& weight_in,
                      const c10::optional<at::Tensor>& bias_in, at::TensorList plan_tensors,
                      int64_t paired_rows, const c10::optional<at::Tensor>& override_ids,
                      const c10::optional<at::Tensor>& override_rows, double logit_scale,
                      double logit_softcap, bool grad_hidden) {
  const typename Device::Scope scope(hidden_in);
  const LmHeadPlan plan = unpack_plan(plan_tensors, paired_rows);
  const Problem p = check_inputs(hidden_in, weight_in, bias_in, plan, logit_scale, logit_softcap);
  const Override ov = check_override(override_ids, override_rows, hidden_in, p);
  check_kernel_device(hidden_in, Device::kType);
  const at::Tensor hidden = hidden_in.contiguous(), weight = weight_in.contiguous();
  const ForwardOutputs o = Device::forward(p, plan, hidden, weight, contiguous_bias(bias_in), ov,
                                           grad_hidden, accumulate_type(hidden.scalar_type()));
  return {o.ce, o.kl, o.grad_ce, o.grad_kl, o.lse, o.coef};
}

// The saved outputs of the forward that the backward reads.
inline void check_saved(const Problem& p, const at::Tensor& hidden, const at::Tensor& grad_ce,
                        const at::Tensor& grad_kl, const at::Tensor& lse,
                        const at::Tensor& coef) {
  TORCH_CHECK_VALUE(grad_ce.numel() == 1 && grad_kl.numel() == 1,
                    "lm_head_losses backward: grad_ce and grad_kl must be scalars");
  TORCH_CHECK_VALUE(lse.dim() == 1 && lse.size(0) == p.n_rows && coef.dim() == 1 &&
                        coef.size(0) == p.n_pairs,
                    "lm_head_losses backward: lse must be [", p.n_rows, "] and kl_coef [",
                    p.n_pairs, "], got ", lse.sizes(), " and ", coef.sizes());
  TORCH_CHECK(lse.device() == hidden.device() && coef.device() == hidden.device(),
              "lm_head_losses backward: lse and kl_coef must be on the device of hidden (",
              hidden.device(), ")");
}

// d loss / d hidden from the forward's saved d ce / d hidden and d kl / d hidden.
inline at::Tensor combine_hidden_grads(const at::Tensor& hidden, const at::Tensor& grad_ce,
                                       const at::Tensor& grad_kl,
                                       const at::Tensor& grad_hidden_ce,
                                       const at::Tensor& grad_hidden_kl, at::ScalarType acc) {
  TORCH_CHECK_VALUE(grad_hidden_ce.sizes() == hidden.sizes() &&
                        grad_hidden_kl.sizes() == hidden.sizes(),
                    "lm_head_losses backward: the saved hidden gradients must have the shape "
                    "of hidden ", hidden.sizes());
  return (grad_hidden_ce * grad_ce.to(acc) + grad_hidden_kl * grad_kl.to(acc))
      .to(hidden.scalar_type());
}

// The lm_head_losses_bwd kernel of a device (Device as for forward). output_mask: which of
// (grad_hidden, grad_weight, grad_bias, grad_override_rows) to compute; the others are empty [0].
template <typename Device>
BackwardResult backward(const at::Tensor& grad_ce, const at::Tensor& grad_kl,
                        const at::Tensor& hidden_in, const at::Tensor& weight_in,
                        const c10::optional<at::Tensor>& bias_in, at::TensorList plan_tensors,
                        int64_t paired_rows, const c10::optional<at::Tensor>& override_ids,
                        const c10::optional<at::Tensor>& override_rows, double logit_scale,
                        double logit_softcap, const at::Tensor& grad_hidden_ce,
                        const at::Tensor& grad_hidden_kl, const at::Tensor& lse_in,
                        const at::Tensor& coef_in, std::array<bool, 4> output_mask) {
  const typename Device::Scope scope(hidden_in);
  const LmHeadPlan plan = unpack_plan(plan_tensors, paired_rows);
  const Problem p = check_inputs(hidden_in, weight_in, bias_in, plan, logit_scale, logit_softcap);
  const Override ov = check_override(override_ids, override_rows, hidden_in, p);
  check_kernel_device(hidden_in, Device::kType);
  check_saved(p, hidden_in, grad_ce, grad_kl, lse_in, coef_in);
  const auto acc = accumulate_type(hidden_in.scalar_type());
  const bool grad_weight = output_mask[1], grad_bias = output_mask[2];
  TORCH_CHECK_VALUE(!(ov.given() && (grad_weight || grad_bias)), "lm_head_losses backward: "
                    "with override rows the head is frozen: no weight or bias gradient "
                    "(output_mask asks for one); the override columns' rows get theirs");
  TORCH_CHECK_VALUE(ov.given() || !output_mask[3], "lm_head_losses backward: output_mask asks "
                    "for the override rows' gradient, but no override rows were given");
  at::Tensor gw, gb, gr;
  if (output_mask[3])
    gr = override_rows_grad(p, plan, hidden_in, bias_in, ov, lse_in, coef_in, grad_ce, grad_kl, acc);
  const at::Tensor gh = output_mask[0] ? combine_hidden_grads(hidden_in, grad_ce, grad_kl, grad_hidden_ce,
                                             grad_hidden_kl, acc)
                      : at::empty({0}, hidden_in.options());
  if (grad_weight || grad_bias) {
    const at::Tensor hidden = hidden_in.contiguous(), weight = weight_in.contiguous();
    const at::Tensor lse = lse_in.to(acc).contiguous(), coef = coef_in.to(acc).contiguous();
    Device::weight_grads(p, plan, hidden, weight, contiguous_bias(bias_in), coef, lse, grad_ce,
                         grad_kl, acc, grad_weight ? &gw : nullptr, grad_bias ? &gb : nullptr);
  }
  if (!gw.defined()) gw = at::empty({0}, weight_in.options());
  if (!gb.defined()) gb = at::empty({0}, weight_in.options());
  if (!gr.defined()) gr = at::empty({0}, hidden_in.options());
  return {gh, gw, gb, gr};
}

// Registers a device's lm_head_losses kernels (in its TORCH_LIBRARY_IMPL block).
template <typename Device>
void register_kernels(torch::Library& m) {
  m.impl("lm_head_losses_fwd", &forward<Device>);
  m.impl("lm_head_losses_bwd", &backward<Device>);
}

}  // namespace lm_head
}  // namespace crystal_ext
