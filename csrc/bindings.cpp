// The crystal_ext._C module: operator schemas (torch.library, so torch.compile and opcheck see
// the ops) and a pybind11 module with build facts and the direct forward entry point; the
// internal entry points for tests live in test_entry_points.cpp.
// Kernels register themselves beside their code: csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>
#include <torch/library.h>

#ifndef CRYSTAL_TORCH_VERSION
#define CRYSTAL_TORCH_VERSION "unknown"
#endif

#ifdef CRYSTAL_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#include <vector>

#include "attention_alignment_plan.h"
#include "cpu/gemm_bf16.h"
#include "lm_head_plan.h"
#include "test_entry_points.h"

TORCH_LIBRARY(crystal_ext, m) {
  // Attention-alignment loss (crystal_ext/ops/attention_alignment_loss.py). `plan` is the
  // plan that alignment_indices built on the host and moved to q's device: the layout and its
  // index tensors (layout, answer_rows, intact_keys, corrupted_keys, latent_keys; unpacked once
  // into attention_alignment::AlignmentPlan, csrc/attention_alignment_plan.h). Returns
  // (loss, lse): the scalar loss (float32; float64 for float64 inputs) and the log-sum-exp of
  // every aligned row and head, [B, H, L] (zero on the other rows), which the backward reuses.
  m.def("attention_alignment_loss_fwd(Tensor q, Tensor k, Tensor[] plan, float scale) "
        "-> (Tensor, Tensor)");
  // Returns (grad_q, grad_k).
  m.def("attention_alignment_loss_bwd(Tensor grad_loss, Tensor q, Tensor k, Tensor[] plan, "
        "Tensor lse, float scale) -> (Tensor, Tensor)");
  // LM-head losses (crystal_ext/ops/lm_head_losses.py). `plan` and `paired_rows` are the plan
  // that crystal_ext.ops.lm_head_plan.lm_head_plan built on the host and moved to hidden's
  // device: its seven index tensors (rows, row_targets, ce_rows, pair_rows, sample_pairs,
  // sample_k, kept_slots; unpacked once into lm_head::LmHeadPlan, csrc/lm_head_plan.h) and its
  // paired-row count. override_ids [n] and override_rows [n, Hd] (both or neither; hidden's
  // dtype): the logits of column override_ids[j] are h . override_rows[j] (+ its bias) instead of
  // the weight's row, which is only read (csrc/lm_head_override.h). logit_scale and
  // logit_softcap are the model's own logits, z = softcap(logit_scale * (h W^T + b)) with
  // softcap(u) = logit_softcap * tanh(u / logit_softcap) (0: no cap).
  // Returns (ce, kl, grad_hidden_ce, grad_hidden_kl, lse, kl_coef): the two scalar losses
  // (float32; float64 for float64 inputs), d ce / d hidden and d kl / d hidden ([N, Hd] in the
  // accumulate dtype, or [0] when grad_hidden is false), each row's log-sum-exp [N] (zero on
  // rows without logits) and each pair's d kl / d KL_i [M] (zero for pairs outside the top k).
  m.def("lm_head_losses_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor[] plan, "
        "int paired_rows, Tensor? override_ids, Tensor? override_rows, float logit_scale, "
        "float logit_softcap, bool grad_hidden) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The forward's arguments, its saved outputs (grad_hidden_ce .. kl_coef) and output_mask:
  // which of (grad_hidden, grad_weight, grad_bias, grad_override_rows) to compute (with override
  // rows the head is frozen: no weight or bias gradient). Returns them; each is [0] when not
  // requested.
  m.def("lm_head_losses_bwd(Tensor grad_ce, Tensor grad_kl, Tensor hidden, Tensor weight, "
        "Tensor? bias, Tensor[] plan, int paired_rows, Tensor? override_ids, "
        "Tensor? override_rows, float logit_scale, float logit_softcap, "
        "Tensor grad_hidden_ce, Tensor grad_hidden_kl, Tensor lse, Tensor kl_coef, "
        "bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  // RMSNorm in transformers' Llama / Qwen2 order (crystal_ext/ops/rms_norm.py); CPU kernels
  // only (on a GPU the module runs its own forward). Returns (y, rstd): y in x's dtype and each
  // row's 1 / sqrt(mean(x^2) + eps), x.shape[:-1], float32 (float64 for float64 x).
  m.def("rms_norm_fwd(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  // Returns (grad_x, grad_weight); grad_weight is [0] when weight_grad is false.
  m.def("rms_norm_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor rstd, bool weight_grad) "
        "-> (Tensor, Tensor)");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_built_against"] = CRYSTAL_TORCH_VERSION;
  info["cpu_kernels"] = true;
  // Whether at::parallel_for in the CPU kernels runs on torch's OpenMP threads (it is compiled
  // into this extension, so it needs -fopenmp here: setup.py).
#ifdef _OPENMP
  info["cpu_openmp"] = true;
#else
  info["cpu_openmp"] = false;
#endif
  // Whether bf16 CPU GEMMs with fp32 output run on AVX512-BF16 here (csrc/cpu/gemm_bf16.h).
  info["cpu_bf16_gemm"] = crystal_ext::cpu_gemm::bf16_gemm_available();
#ifdef CRYSTAL_WITH_CUDA
  info["cuda_kernels"] = true;
  info["cuda_built_against"] = std::to_string(CUDART_VERSION / 1000) + "." +
                               std::to_string((CUDART_VERSION % 1000) / 10);
#ifdef CRYSTAL_CUDA_ARCH_LIST
  info["cuda_arch_list"] = CRYSTAL_CUDA_ARCH_LIST;
#else
  info["cuda_arch_list"] = "";
#endif
#else
  info["cuda_kernels"] = false;
  info["cuda_built_against"] = pybind11::none();
  info["cuda_arch_list"] = "";
#endif
  return info;
}

// Direct entry points through the dispatcher (the same kernels torch.ops.crystal_ext reaches).
std::tuple<at::Tensor, at::Tensor> attention_alignment_loss_forward(
    const at::Tensor& q, const at::Tensor& k, const std::vector<at::Tensor>& plan, double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("crystal_ext::attention_alignment_loss_fwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, at::TensorList, double)>();
  return op.call(q, k, plan, scale);
}

template <size_t N>
pybind11::tuple names_tuple(const char* const (&names)[N]) {
  pybind11::tuple out(N);
  for (size_t i = 0; i < N; ++i) out[i] = pybind11::str(names[i]);
  return out;
}

// Each op's plan tensors in its schema's order, as the kernels unpack them: the Python plans'
// NamedTuples are checked against these when the extension loads (crystal_ext.ops._extension).
pybind11::dict plan_tensor_names() {
  pybind11::dict names;
  names["lm_head_losses"] = names_tuple(crystal_ext::lm_head::kPlanTensorNames);
  names["attention_alignment_loss"] =
      names_tuple(crystal_ext::attention_alignment::kPlanTensorNames);
  return names;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "crystal_ext compiled kernels";
  m.def("build_info", &build_info, "Facts about how this extension was compiled");
  m.def("attention_alignment_loss_forward", &attention_alignment_loss_forward,
        "Fused attention-alignment loss, forward: (loss, lse). Prefer "
        "crystal_ext.attention_alignment_loss, which adds autograd.",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("plan"), pybind11::arg("scale"));
  m.def("plan_tensor_names", &plan_tensor_names,
        "Each op's plan tensors, in the order its schema's `Tensor[] plan` takes them");
  crystal_ext::testing::register_test_entry_points(m);
}
