// The host side of the lm_head_losses entry points, one for both devices: input checks (always,
// in the forward and the backward; metadata only), contiguous operands, the accumulate dtype,
// the per-sample top-k selection (ATen ops on the compute device), the combination of the saved
// hidden gradients in the backward and the empty placeholders for gradients not requested.
// csrc/cpu/lm_head_losses.cpp and csrc/cuda/lm_head_losses.cu supply only the device kernels
// (a forward sweep, a weight-gradient sweep).
#pragma once

#include <ATen/ATen.h>

#include <limits>
#include <tuple>
#include <utility>

#include "common_host.h"
#include "lm_head_losses_checks.h"

namespace crystal_ext {
namespace lm_head {

struct ForwardOutputs {
  at::Tensor ce, kl, grad_ce, grad_kl, lse, coef;
};

// Forward sweep over the vocabulary: the two losses, each row's lse, each pair's d kl / d KL_i
// and, with grad_hidden, d ce / d hidden and d kl / d hidden (the logit scale already in them).
// The logit transform is p.logit_scale / p.logit_softcap.
using ForwardKernel = ForwardOutputs (*)(const Problem& p, const Plan& plan,
                                         const at::Tensor& hidden, const at::Tensor& weight,
                                         const c10::optional<at::Tensor>& bias, bool grad_hidden,
                                         at::ScalarType acc);

// Weight-gradient sweep: fills *grad_weight / *grad_bias (each may be null: not wanted) from
// the saved lse and coef and the upstream gradients grad_ce, grad_kl (scalar tensors).
using WeightGradKernel = void (*)(const Problem& p, const Plan& plan, const at::Tensor& hidden,
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
inline std::pair<at::Tensor, at::Tensor> select_topk(const at::Tensor& pair_kl, const Plan& plan,
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

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
host_forward(at::DeviceType device, ForwardKernel kernel, const at::Tensor& hidden_in,
             const at::Tensor& weight_in, const c10::optional<at::Tensor>& bias_in,
             const Plan& plan, double logit_scale, double logit_softcap, bool grad_hidden) {
  const Problem p = check_inputs(hidden_in, weight_in, bias_in, plan, logit_scale, logit_softcap);
  check_kernel_device(hidden_in, device);
  const at::Tensor hidden = hidden_in.contiguous(), weight = weight_in.contiguous();
  const ForwardOutputs o = kernel(p, plan, hidden, weight, contiguous_bias(bias_in), grad_hidden,
                                  accumulate_type(hidden.scalar_type()));
  return {o.ce, o.kl, o.grad_ce, o.grad_kl, o.lse, o.coef};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> host_backward(
    at::DeviceType device, WeightGradKernel kernel, const at::Tensor& grad_ce,
    const at::Tensor& grad_kl, const at::Tensor& hidden_in, const at::Tensor& weight_in,
    const c10::optional<at::Tensor>& bias_in, const Plan& plan, double logit_scale,
    double logit_softcap, const at::Tensor& grad_hidden_ce, const at::Tensor& grad_hidden_kl,
    const at::Tensor& lse_in, const at::Tensor& coef_in, bool grad_hidden, bool grad_weight,
    bool grad_bias) {
  const Problem p = check_inputs(hidden_in, weight_in, bias_in, plan, logit_scale, logit_softcap);
  check_kernel_device(hidden_in, device);
  TORCH_CHECK_VALUE(grad_ce.numel() == 1 && grad_kl.numel() == 1,
                    "lm_head_losses backward: grad_ce and grad_kl must be scalars");
  TORCH_CHECK_VALUE(lse_in.dim() == 1 && lse_in.size(0) == p.n_rows && coef_in.dim() == 1 &&
                        coef_in.size(0) == p.n_pairs,
                    "lm_head_losses backward: lse must be [", p.n_rows, "] and kl_coef [",
                    p.n_pairs, "], got ", lse_in.sizes(), " and ", coef_in.sizes());
  TORCH_CHECK(lse_in.device() == hidden_in.device() && coef_in.device() == hidden_in.device(),
              "lm_head_losses backward: lse and kl_coef must be on the device of hidden (",
              hidden_in.device(), ")");
  const auto acc = accumulate_type(hidden_in.scalar_type());
  at::Tensor gh, gw, gb;
  if (grad_hidden) {
    TORCH_CHECK_VALUE(grad_hidden_ce.sizes() == hidden_in.sizes() &&
                          grad_hidden_kl.sizes() == hidden_in.sizes(),
                      "lm_head_losses backward: the saved hidden gradients must have the shape "
                      "of hidden ", hidden_in.sizes());
    gh = (grad_hidden_ce * grad_ce.to(acc) + grad_hidden_kl * grad_kl.to(acc))
             .to(hidden_in.scalar_type());
  } else {
    gh = at::empty({0}, hidden_in.options());
  }
  if (grad_weight || grad_bias) {
    const at::Tensor hidden = hidden_in.contiguous(), weight = weight_in.contiguous();
    const at::Tensor lse = lse_in.to(acc).contiguous(), coef = coef_in.to(acc).contiguous();
    kernel(p, plan, hidden, weight, contiguous_bias(bias_in), coef, lse, grad_ce, grad_kl, acc,
           grad_weight ? &gw : nullptr, grad_bias ? &gb : nullptr);
  }
  if (!gw.defined()) gw = at::empty({0}, weight_in.options());
  if (!gb.defined()) gb = at::empty({0}, weight_in.options());
  return {gh, gw, gb};
}

}  // namespace lm_head
}  // namespace crystal_ext
