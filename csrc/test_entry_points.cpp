// Internal entry points for the tests (crystal_ext._C.<name>): they reach pieces of the CPU
// kernels that the ops' schemas do not expose. Not part of the public API.
#include "test_entry_points.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "cpu/gemm_bf16.h"
#include "cpu/vocab_rows.h"
#include "lm_head_losses_host.h"
#include "lm_head_losses_tiling.h"

namespace crystal_ext {
namespace testing {
namespace {

// a [m, k] x B -> fp32 [m, n] through the CPU bf16 GEMM, for its tests: B = w^T for w [n, k]
// (transposed=true, the logits GEMM) or B = w for w [k, n] (the expectation GEMM). With
// `out` given, accumulates into it. With `a2` ([m2 <= m, k]), its product adds into the first
// m2 rows too (the LM-head op's lo parts of P, gemm_bf16_f32_two).
at::Tensor cpu_gemm_bf16(const at::Tensor& a, const at::Tensor& w, bool transposed,
                         const c10::optional<at::Tensor>& out, const c10::optional<at::Tensor>& a2) {
  namespace g = crystal_ext::cpu_gemm;
  TORCH_CHECK(a.dim() == 2 && w.dim() == 2 && a.scalar_type() == at::kBFloat16 &&
                  w.scalar_type() == at::kBFloat16 && a.device().is_cpu() && w.device().is_cpu(),
              "cpu_gemm_bf16: a and w must be 2-D bf16 CPU tensors");
  const at::Tensor wc = w.contiguous();
  const g::PackedB b = transposed ? g::pack_transposed(wc) : g::pack(wc);
  TORCH_CHECK(a.size(1) == b.k, "cpu_gemm_bf16: a has ", a.size(1), " columns, B has ", b.k,
              " rows");
  const int64_t m2 = a2.has_value() ? a2->size(0) : 0;
  if (a2.has_value()) {
    TORCH_CHECK(a2->dim() == 2 && a2->scalar_type() == at::kBFloat16 && a2->size(1) == a.size(1) &&
                    m2 <= a.size(0),
                "cpu_gemm_bf16: a2 must be bf16 [m2 <= ", a.size(0), ", ", a.size(1), "]");
  }
  at::Tensor c = out.has_value() ? *out : at::empty({a.size(0), b.n}, a.options().dtype(at::kFloat));
  TORCH_CHECK(c.scalar_type() == at::kFloat && c.is_contiguous() && c.size(0) == a.size(0) &&
                  c.size(1) == b.n,
              "cpu_gemm_bf16: out must be a contiguous float32 [", a.size(0), ", ", b.n, "]");
  // One operand for a and a2 (one lda for both, as in the op's P buffer).
  const at::Tensor a_op = g::a_operand(a2.has_value() ? at::cat({a, *a2}) : a);
  const at::BFloat16* a_ptr = a_op.data_ptr<at::BFloat16>();
  const int64_t lda = a_op.size(1);
  g::gemm_bf16_f32_two(a_ptr, lda, a.size(0), m2 > 0 ? a_ptr + a.size(0) * lda : nullptr, m2, b,
                       c.data_ptr<float>(), b.n, /*accumulate=*/out.has_value());
  return c;
}

// The kept pairs' one-pass sweep (cpu_gemm::sweep_logits_then_product) with a D the test can
// recompute: D[r, v] = bf16(S[r, v] * (1 + (v0 + v) % 3)) for the first d_rows rows of
// S = a w^T, so a block given the wrong v0 or columns shows. Returns (S as the blocks saw it,
// c = D w).
std::tuple<at::Tensor, at::Tensor> cpu_gemm_sweep(const at::Tensor& a, const at::Tensor& w,
                                                   int64_t d_rows) {
  namespace g = crystal_ext::cpu_gemm;
  TORCH_CHECK(a.dim() == 2 && w.dim() == 2 && a.scalar_type() == at::kBFloat16 &&
                  w.scalar_type() == at::kBFloat16 && a.size(1) == w.size(1),
              "cpu_gemm_sweep: a [m, k] and w [n, k] must be bf16");
  const int64_t m = a.size(0), n = w.size(0), k = w.size(1);
  const at::Tensor a_op = g::a_operand(a);
  const at::Tensor wc = w.contiguous();
  at::Tensor s_seen = at::zeros({m, n}, a.options().dtype(at::kFloat));
  at::Tensor c = at::empty({d_rows, k}, a.options().dtype(at::kFloat));
  float* seen = s_seen.data_ptr<float>();
  auto form_d = [&](int64_t v0, int64_t vb, float* s, at::BFloat16* d, int64_t ldd) {
    for (int64_t r = 0; r < m; ++r)
      for (int64_t v = 0; v < vb; ++v) seen[r * n + v0 + v] = s[r * vb + v];
    for (int64_t r = 0; r < d_rows; ++r)
      for (int64_t v = 0; v < vb; ++v)
        d[r * ldd + v] = at::BFloat16(s[r * vb + v] * static_cast<float>(1 + (v0 + v) % 3));
  };
  g::sweep_logits_then_product(a_op.data_ptr<at::BFloat16>(), a_op.size(1), m, wc, d_rows, form_d,
                               c.data_ptr<float>(), k);
  return {s_seen, c};
}

// How many distinct threads run the chunks of an at::parallel_for over n items compiled in
// this extension (for the test that the CPU kernels are parallel).
int64_t parallel_for_threads(int64_t n) {
  std::vector<int> seen(static_cast<size_t>(at::get_num_threads()), 0);
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
    const int t = at::get_thread_num();
    if (t >= 0 && t < static_cast<int>(seen.size())) seen[static_cast<size_t>(t)] = 1;
  });
  return std::count(seen.begin(), seen.end(), 1);
}

// (max_chunk_rows, vocab_block) that lm_head_losses uses on the CPU or CUDA for a chunk of
// `rows` rows over `vocab` columns of hidden size hidden_dim.
std::tuple<int64_t, int64_t> lm_head_losses_tiling(bool cuda, int64_t rows, int64_t vocab,
                                                 int64_t hidden_dim) {
  namespace lh = crystal_ext::lm_head;
  if (cuda) return {lh::cuda_tiling::kMaxChunkRows, lh::cuda_tiling::vocab_block(rows, vocab, hidden_dim)};
  return {lh::cpu_tiling::kMaxChunkRows, lh::cpu_tiling::vocab_block(rows, vocab)};
}

// The per-sample top-k selection of lm_head_losses (lm_head::select_topk, the same ATen code on
// every device) on given pair KLs [M] and a plan's sample_pairs, sample_k and kept_slots:
// (kl, coef).
std::tuple<at::Tensor, at::Tensor> lm_head_select_topk(const at::Tensor& pair_kl,
                                                       const at::Tensor& sample_pairs,
                                                       const at::Tensor& sample_k,
                                                       const at::Tensor& kept_slots) {
  namespace lh = crystal_ext::lm_head;
  TORCH_CHECK(pair_kl.dim() == 1 && sample_pairs.dim() == 2 && sample_k.dim() == 1 &&
                  kept_slots.dim() == 1,
              "lm_head_select_topk: pair_kl [M], sample_pairs [S, W], sample_k [S], kept_slots [K]");
  const at::Tensor none = at::empty({0}, sample_pairs.options());
  const lh::LmHeadPlan plan{none, none, none, none, sample_pairs, sample_k, kept_slots, 0};
  lh::Problem p;
  p.n_pairs = pair_kl.size(0);
  p.n_samples = sample_pairs.size(0);
  p.max_pairs = sample_pairs.size(1);
  p.n_kept = kept_slots.size(0);
  auto out = lh::select_topk(pair_kl, plan, p);
  return {out.first, out.second};
}

}  // namespace

void register_test_entry_points(pybind11::module_& m) {
  m.def("parallel_for_threads", &parallel_for_threads,
        "Internal, for tests: distinct threads that ran an at::parallel_for over n items",
        pybind11::arg("n"));
  m.def("cpu_rows_exp", &crystal_ext::cpu_rows::exp_for_tests,
        "Internal, for tests: exp of a float32 tensor by the LM-head op's AVX-512 row passes",
        pybind11::arg("x"));
  m.def("cpu_gemm_bf16", &cpu_gemm_bf16,
        "Internal, for tests: a x B in bf16 with fp32 output on the CPU's AVX512-BF16 kernel",
        pybind11::arg("a"), pybind11::arg("w"), pybind11::arg("transposed"),
        pybind11::arg("out") = pybind11::none(), pybind11::arg("a2") = pybind11::none());
  m.def("cpu_gemm_sweep", &cpu_gemm_sweep,
        "Internal, for tests: the LM-head op's one-pass kept pairs' sweep with a known D, "
        "(S, D w)",
        pybind11::arg("a"), pybind11::arg("w"), pybind11::arg("d_rows"));
  m.def("cpu_gemm_sweep_available", &crystal_ext::cpu_gemm::sweep_available,
        "Internal, for tests: whether the one-pass sweep runs for m rows, d_rows rows of D and k",
        pybind11::arg("m"), pybind11::arg("d_rows"), pybind11::arg("k"));
  m.def("cpu_gemm_two_a_share_one_pass", &crystal_ext::cpu_gemm::two_a_share_one_pass,
        "Internal, for tests: whether m rows of the LM-head op's P W take two A's in one pass "
        "(else its bf16 path sweeps the kept pairs' rows for their KL gradient)",
        pybind11::arg("m"));
  m.def("lm_head_losses_tiling", &lm_head_losses_tiling,
        "Internal, for tests: (max_chunk_rows, vocab_block) of lm_head_losses on a device",
        pybind11::arg("cuda"), pybind11::arg("rows"), pybind11::arg("vocab"),
        pybind11::arg("hidden_dim"));
  m.def("lm_head_select_topk", &lm_head_select_topk,
        "Internal, for tests: lm_head_losses' per-sample top-k selection, (kl, coef)",
        pybind11::arg("pair_kl"), pybind11::arg("sample_pairs"), pybind11::arg("sample_k"),
        pybind11::arg("kept_slots"));
}

}  // namespace testing
}  // namespace crystal_ext
