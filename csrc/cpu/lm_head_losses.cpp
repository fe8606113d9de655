// CPU kernel of the fused LM-head losses (cross entropy + top-k paired KL).
//
// Forward: the rows that need logits (CE rows, teacher rows, student rows; each once) are cut
// into row chunks (the first chunk holds every paired row, so a pair's two rows are always in
// the same chunk) and the vocabulary into blocks of Vb entries. For each (chunk, block):
//   S = H_chunk W_blk^T (+ b_blk)          one GEMM, fp32 out (fp64 for fp64 inputs)
//   rows  (at::parallel_for): online max / sum, P = exp(S - running max), target logit,
//                             rescale of the running expectation O
//   pairs (at::parallel_for): KL cross term A += sum_v P_teacher (S_teacher - S_student)
//   O += P W_blk                           one GEMM (only when hidden needs a gradient)
// so the forward does two GEMM passes over the head (the same as a plain linear +
// cross-entropy forward and its hidden-gradient backward; on the bf16 path with many rows, a
// third for the kept pairs' rows only, below) and ends with the losses
// AND d ce / d hidden, d KL_i / d hidden for every pair (csrc/lm_head_losses.h). The top-k
// selection then only picks coefficients; the backward multiplies by the upstream gradients
// and never recomputes logits for hidden. Only when weight (or bias) requires grad does the
// backward sweep the vocabulary again (logits of the CE rows and of the kept pairs' rows,
// with the saved lse), one more GEMM for d weight per block: nothing of that runs for a
// frozen head.
//
// bf16 inputs on a CPU with AVX512-BF16 take both GEMMs through csrc/cpu/gemm_bf16 (bf16
// operands, fp32 accumulation and output) instead of an fp32 GEMM on converted copies: the
// logits are the same fp32 values, at bf16 GEMM speed. There P enters the second GEMM as bf16,
// as in FlashAttention's P V product. A pair's KL gradient E_s - E_teacher is a difference of
// nearly equal expectations, which P in bf16 would leave ~15x less accurate, so it is formed
// one of three ways. Where each student row belongs to one pair and is no pair's teacher (the
// dual-path layout), the student's row of P holds the pair's difference p~_s - r p~_teacher at
// the student's running max, r the running ratio of the two rows' sums, rounded to bf16 once;
// a per-pair fp32 term u = sum over blocks of r times the teacher's block expectation makes
// O_s + u the student's own sum_v p~_s W_v exactly, whatever r is, and r keeps the row a small
// difference when the distributions agree up to a shift (difference_rows). So P W has no more
// rows than the logits and nothing sweeps W again (Chunk::pair_diff;
// CRYSTAL_EXT_CPU_PAIR_DIFF_ROWS=0 takes the two ways below: the op on inputs captured from the
// benchmark's steps, 7B widths, 2 threads, measured 0.175 vs 0.210 s at |E| = 24, 0.412 vs
// 0.490 s at |E| = 96 and 1.006 vs 1.096 s at |E| = 384). Otherwise, where the chunk's
// rows are few enough for the k-outer P W (the GEMM packs
// each block of W once for two A operands: cpu_gemm::two_a_share_one_pass), P of every paired
// row is split into bf16 hi + lo parts (error ~2^-17 instead of 2^-9 relative) that ride in
// that pass. With more rows the lo parts would cost P W a GEMM of their own (a third of the
// op at 205 and 781 logit rows), so instead, once the top-k has picked its pairs (10% of them
// under the published setting), one more sweep over the vocabulary for the kept pairs' rows
// only forms D = p_student - p_teacher in fp32 from the known lse and rounds it to bf16 once
// (as the weight-gradient sweep does with its D), then O_diff += D W_blk: the difference keeps
// bf16's accuracy relative to itself. With AMX that sweep is one pass over W: each thread takes
// a block of W's rows through both products while it is in L2
// (cpu_gemm::sweep_logits_then_product). CRYSTAL_EXT_CPU_BF16_GEMM=0 turns the bf16 path off
// (ATen fp32 GEMMs on converted blocks, as for fp16 inputs).
//
// Override rows (csrc/lm_head_override.h): the ids are read on the host, and in each block that
// holds some, their columns of S are overwritten with h . R_j (+ bias) before the transform, and
// their entries of P are taken out before the expectation GEMM and multiply R_j instead
// (O += P[:, ids] R, a small GEMM): the weight is only read.
//
// Workspace: two [rows_in_chunk, Vb] fp32 blocks (S and P, about 4 MB each; P in bf16 on the
// bf16 path, plus lo rows for the paired rows), the running expectation [rows_in_chunk, Hd]
// fp32, a copy of the chunk's hidden rows and, for bf16/fp16 without the bf16 GEMM, one fp32
// weight block (with it, the weight block packed twice in bf16). Never [N, V].
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/gemm_bf16.h"
#include "cpu/vocab_rows.h"
#include "lm_head_losses.h"
#include "lm_head_losses_checks.h"
#include "lm_head_losses_host.h"
#include "lm_head_losses_tiling.h"
#include "lm_head_override.h"

namespace crystal_ext {
namespace lm_head {
namespace {

using cpu_tiling::kMaxChunkRows;
using cpu_tiling::vocab_block;

// bf16 inputs take the bf16 GEMM path where the CPU has it (see the top of the file), except
// under a logit soft-cap, whose slope-weighted P and per-pair cross expectations run on the
// fp32 GEMM path.
bool use_bf16_gemm(const at::Tensor& hidden, const Problem& p) {
  if (hidden.scalar_type() != at::kBFloat16 || !cpu_gemm::bf16_gemm_available() || p.capped())
    return false;
  const char* env = std::getenv("CRYSTAL_EXT_CPU_BF16_GEMM");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

// The rows' passes over a block on AVX-512 (csrc/cpu/vocab_rows.h) for float accumulation.
template <typename acc_t>
bool simd_rows() {
  return std::is_same<acc_t, float>::value && cpu_rows::available();
}

// max(init, the row's logits), NaN ignored.
template <typename acc_t>
acc_t row_max(const acc_t* s, int64_t vb, acc_t init, bool simd) {
  if constexpr (std::is_same<acc_t, float>::value) {
    if (simd) return cpu_rows::max_of(s, vb, init);
  }
  acc_t m = init;
  for (int64_t v = 0; v < vb; ++v) m = s[v] > m ? s[v] : m;
  return m;
}

// S = H W_blk^T (+ b_blk) for the vocabulary block [v0, v0 + vb): fp32 out (fp64 for fp64).
// On the bf16 path h is an A operand (cpu_gemm::a_operand) and the block is packed into
// *packed; otherwise h is in acc and the block, converted to acc, is returned for the
// caller's second GEMM (undefined on the bf16 path).
at::Tensor logits_block(const at::Tensor& S, const at::Tensor& h, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias, int64_t v0, int64_t vb,
                        bool bf16_gemm, cpu_gemm::PackedB* packed, at::ScalarType acc) {
  const bool has_bias = bias.has_value() && bias->defined();
  if (bf16_gemm) {
    cpu_gemm::pack_transposed_into(weight.narrow(0, v0, vb), packed);
    cpu_gemm::gemm_bf16_f32(h.data_ptr<at::BFloat16>(), h.size(1), h.size(0), *packed,
                            S.data_ptr<float>(), vb, /*accumulate=*/false);
    if (has_bias) S.add_(bias->narrow(0, v0, vb).to(acc));
    return at::Tensor();
  }
  at::Tensor w = weight.narrow(0, v0, vb).to(acc);  // no copy for fp32 / fp64
  at::Tensor out = S;  // addmm_out / mm_out take a non-const out
  if (has_bias) {
    at::addmm_out(out, bias->narrow(0, v0, vb).to(acc), h, w.t());
  } else {
    at::mm_out(out, h, w.t());
  }
  return w;
}

// The model's logits from the head's raw output, in place on the rows [0, rows) of S [rows, vb].
template <typename acc_t>
void transform_rows(acc_t* s_ptr, int64_t rows, int64_t vb, const Problem& p) {
  if (!p.transformed()) return;
  const acc_t scale = static_cast<acc_t>(p.logit_scale), cap = static_cast<acc_t>(p.logit_softcap);
  at::parallel_for(0, rows, 16, [&](int64_t rb, int64_t re) {
    for (int64_t j = rb; j < re; ++j) {
      acc_t* s = s_ptr + j * vb;
      for (int64_t v = 0; v < vb; ++v) s[v] = model_logit(s[v], scale, cap);
    }
  });
}

at::Tensor long_tensor(const std::vector<int64_t>& v) {
  at::Tensor t = at::empty({static_cast<int64_t>(v.size())}, at::kLong);
  std::copy(v.begin(), v.end(), t.data_ptr<int64_t>());
  return t;
}

// Contiguous [rows, cols] view of the front of a flat buffer (reused across blocks).
at::Tensor front(const at::Tensor& flat, int64_t rows, int64_t cols) {
  return flat.narrow(0, 0, rows * cols).view({rows, cols});
}

// One row chunk of the forward sweep: its rows, buffers and running statistics. The running
// sums, the KL cross terms and the log-sum-exps are kept in double: a pair's KL is
// A / Z_a - lse_a + lse_s, a small difference of terms of size log V, so their float rounding
// (~1e-7 absolute) would dominate the KL of two nearly equal rows.
template <typename acc_t>
struct Chunk {
  int64_t begin = 0, R = 0, Vb = 0;
  bool has_pairs = false;  // pairs live in the first chunk (their rows come first in p.rows)
  // bf16 path: the hidden rows and P as bf16 A operands; P has n_lo more rows, the lo parts of
  // the paired rows (local rows 0 .. n_lo - 1).
  bool bf16_gemm = false;
  int64_t n_lo = 0, lda_p = 0;
  // bf16 path where the lo rows would cost P W a GEMM of their own: no lo parts; the kept pairs'
  // KL gradient comes from a sweep of their own rows after the top-k (kept_pair_differences).
  bool kl_grad_sweep = false;
  // bf16 path where each pair has a student row of its own (pair_difference_rows): that row's P
  // holds p~_s - r_i p~_teacher (both at the student's running max, r_i close to the pair's
  // running ratio of sums Z_s / Z_teacher), so its expectation O_s gathers the pair's
  // difference, at bf16's accuracy relative to the difference itself; u [M, Hd] adds back
  // sum over blocks of r_i T_i (T_i: the teacher's block expectation at the student's max), so
  // that O_s + u_i = sum_v p~_s W_v exactly, whatever the r_i.
  bool pair_diff = false;
  std::vector<int64_t> diff_pair;  // local row -> the pair whose student it is (pair_diff), or -1
  std::vector<float> ratio;        // per pair: the r_i of the rows so far
  at::Tensor u;                    // [M, Hd] fp32, at the student's running max
  // Under a soft-cap the KL gradient needs each pair's cross expectation
  // X_i = sum_v p_av g_sv W_v (csrc/lm_head_losses.h): its unnormalised rows, rescaled with
  // the teacher's running max, and their block of P_teacher * g_student.
  bool cross_expect = false;
  std::vector<int64_t> rows, target;  // the chunk's rows of hidden and their targets
  at::Tensor h, s_buf, p_buf, expect, x_expect, pc_buf;
  // Override rows: the override columns' head output h . rows[j] + b[ids[j]], [R, n] in acc_t.
  at::Tensor ov_logits;
  cpu_gemm::PackedB packed_logits, packed_expect;
  std::vector<double> run_sum, cross, lse;
  std::vector<acc_t> run_max, alpha, target_logit;
};

// P for the expectation GEMM on the fp32 / fp64 path: p~ = exp(s - shift) times the soft-cap's
// slope (1 without a cap). Returns the block's sum of p~, in double too: added one by one,
// thousands of similar terms (a flat distribution) would lose about 1e-5 relative in float.
template <typename acc_t>
double fill_p_row(acc_t* pr, const acc_t* s, int64_t vb, acc_t shift, const Problem& p) {
  double sum = 0.0;
  for (int64_t v = 0; v < vb; ++v) {
    pr[v] = unnormalised_prob(s[v], shift);
    sum += pr[v];
  }
  const acc_t cap = static_cast<acc_t>(p.logit_softcap);
  if (p.capped())
    for (int64_t v = 0; v < vb; ++v) pr[v] *= softcap_slope(s[v], cap);
  return sum;
}

// P on the bf16 path: p~ rounded to bf16 (hi) and, for a paired row (lo not null), the
// remainder rounded (lo). Returns the block's sum of p~ in double.
inline double fill_p_row_bf16(at::BFloat16* hi, at::BFloat16* lo, const float* s, int64_t vb,
                              float shift, int64_t lda_p, bool simd) {
  double sum = 0.0;
  if (simd) {
    sum = cpu_rows::exp_to_bf16(s, vb, shift, hi, lo);
  } else {
    for (int64_t v = 0; v < vb; ++v) {
      const float pv = static_cast<float>(unnormalised_prob(s[v], shift));
      sum += pv;
      hi[v] = at::BFloat16(pv);
      if (lo != nullptr) lo[v] = at::BFloat16(pv - static_cast<float>(hi[v]));
    }
  }
  // The A operand's pad columns meet zeros of B, but must not be NaN.
  for (int64_t v = vb; v < lda_p; ++v) {
    hi[v] = at::BFloat16(0.0f);
    if (lo != nullptr) lo[v] = at::BFloat16(0.0f);
  }
  return sum;
}

// The override columns of one vocabulary block: (j, column) for each ids[j] inside it.
using BlockColumns = std::vector<std::pair<int64_t, int64_t>>;

template <typename acc_t>
struct Forward {
  const Problem& p;
  const LmHeadPlan& plan;
  const HostPlan& h_plan;
  const at::Tensor& hidden;  // contiguous, input dtype
  const at::Tensor& weight;  // contiguous, input dtype, only read
  const c10::optional<at::Tensor>& bias;
  const Override& ov;
  bool grad_hidden;
  at::ScalarType acc;

  // outputs
  acc_t ce = acc_t(0), kl = acc_t(0);
  at::Tensor lse, coef, grad_ce, grad_kl;

  // Override rows on the host side: their ids, and the rows in acc_t [n, Hd].
  std::vector<int64_t> ov_ids;
  at::Tensor ov_rows;

  void run() {
    const auto opts = hidden.options().dtype(acc);
    if (ov.given()) {
      ov_ids = host_values(ov.ids);
      ov_rows = ov.rows.to(acc).contiguous();
    }
    lse = at::zeros({p.n_rows}, opts);
    coef = at::zeros({p.n_pairs}, opts);
    grad_ce = grad_hidden ? at::zeros({p.n_rows, p.hidden_dim}, opts) : at::empty({0}, opts);
    grad_kl = grad_hidden ? at::zeros({p.n_rows, p.hidden_dim}, opts) : at::empty({0}, opts);
    double ce_sum = 0.0;
    for (const auto& chunk : row_chunks(p, kMaxChunkRows)) ce_sum += run_chunk(chunk.first, chunk.second);
    ce = p.n_targeted > 0 ? static_cast<acc_t>(ce_sum / static_cast<double>(p.n_targeted))
                          : acc_t(0);
  }

  // The pairs' student rows as difference rows (Chunk::pair_diff): each student row belongs to one
  // pair and is no pair's teacher (the dual-path layout: answer row F_i pairs with E_i alone), and
  // CRYSTAL_EXT_CPU_PAIR_DIFF_ROWS is not "0" (read at each call: the tests compare both ways).
  bool pair_difference_rows(int64_t R) const {
    const char* env = std::getenv("CRYSTAL_EXT_CPU_PAIR_DIFF_ROWS");
    if (env != nullptr && std::strcmp(env, "0") == 0) return false;
    std::vector<char> role(R, 0);  // bit 1: a teacher, bit 2: a student
    for (int64_t i = 0; i < p.n_pairs; ++i) role[h_plan.pair_t[i]] |= 1;
    for (int64_t i = 0; i < p.n_pairs; ++i) {
      char& r = role[h_plan.pair_s[i]];
      if (r != 0) return false;  // a teacher, or the student of an earlier pair
      r = 2;
    }
    return true;
  }

  // Returns the sum of the chunk's CE terms.
  double run_chunk(int64_t begin, int64_t end) {
    Chunk<acc_t> c = start_chunk(begin, end);
    for (int64_t v0 = 0; v0 < p.vocab; v0 += c.Vb) sweep_block(c, v0);
    const double ce_sum = finish_rows(c);
    if (grad_hidden) finish_expectations(c);
    if (c.has_pairs) finish_pairs(c);
    return ce_sum;
  }

  Chunk<acc_t> start_chunk(int64_t begin, int64_t end) {
    Chunk<acc_t> c;
    const int64_t R = end - begin, Hd = p.hidden_dim;
    const auto opts = hidden.options().dtype(acc);
    c.begin = begin;
    c.R = R;
    c.rows.assign(h_plan.rows.begin() + begin, h_plan.rows.begin() + end);
    c.target.assign(h_plan.row_targets.begin() + begin, h_plan.row_targets.begin() + end);
    c.Vb = vocab_block(R, p.vocab);
    c.s_buf = at::empty({R * c.Vb}, opts);
    c.has_pairs = begin == 0 && p.n_pairs > 0;
    c.bf16_gemm = std::is_same<acc_t, float>::value && use_bf16_gemm(hidden, p);
    c.pair_diff = c.bf16_gemm && c.has_pairs && grad_hidden && pair_difference_rows(R);
    c.kl_grad_sweep = c.bf16_gemm && c.has_pairs && grad_hidden && !c.pair_diff &&
                      !cpu_gemm::two_a_share_one_pass(R);
    c.n_lo = c.bf16_gemm && c.has_pairs && grad_hidden && !c.pair_diff && !c.kl_grad_sweep
                 ? p.n_paired_rows
                 : 0;
    if (c.pair_diff) {
      c.diff_pair.assign(R, -1);
      for (int64_t i = 0; i < p.n_pairs; ++i) c.diff_pair[h_plan.pair_s[i]] = i;
      c.ratio.assign(p.n_pairs, 0.0f);
      c.u = at::zeros({p.n_pairs, Hd}, opts);
    }
    const at::Tensor chunk_hidden = hidden.index_select(0, long_tensor(c.rows));
    c.h = c.bf16_gemm ? cpu_gemm::a_operand(chunk_hidden) : chunk_hidden.to(acc).contiguous();
    if (ov.given()) {
      c.ov_logits = override_raw_logits(c.bf16_gemm ? chunk_hidden.to(acc) : c.h, ov, acc);
      if (bias.has_value() && bias->defined())
        c.ov_logits.add_(bias->index_select(0, ov.ids).to(acc));
    }
    c.lda_p = c.bf16_gemm ? cpu_gemm::operand_lda(c.Vb) : c.Vb;
    c.p_buf = c.bf16_gemm ? at::empty({(R + c.n_lo) * c.lda_p}, hidden.options())
                          : at::empty({R * c.Vb}, opts);
    if (grad_hidden) c.expect = at::zeros({R, Hd}, opts);
    c.run_sum.assign(R, 0.0);
    c.run_max.assign(R, neg_inf<acc_t>());
    c.alpha.assign(R, acc_t(0));
    c.target_logit.assign(R, acc_t(0));
    c.cross.assign(c.has_pairs ? p.n_pairs : 0, 0.0);
    c.cross_expect = c.has_pairs && grad_hidden && p.capped();
    if (c.cross_expect) {
      c.x_expect = at::zeros({p.n_pairs, Hd}, opts);
      c.pc_buf = at::empty({p.n_pairs * c.Vb}, opts);
    }
    return c;
  }

  // One vocabulary block [v0, v0 + Vb): the logits GEMM (the override columns' logits written
  // over the weight's), the rows' online statistics, the pairs' cross terms, the expectation
  // GEMMs (the override columns' entries of P applied to their rows, not the weight's).
  void sweep_block(Chunk<acc_t>& c, int64_t v0) {
    const int64_t vb = std::min(c.Vb, p.vocab - v0);
    const at::Tensor S = front(c.s_buf, c.R, vb);
    const at::Tensor w = logits_block(S, c.h, weight, bias, v0, vb, c.bf16_gemm, &c.packed_logits, acc);
    if (c.bf16_gemm && grad_hidden) cpu_gemm::pack_into(weight.narrow(0, v0, vb), &c.packed_expect);
    acc_t* s_ptr = S.data_ptr<acc_t>();
    const BlockColumns columns = override_columns(v0, vb);
    write_override_logits(c.ov_logits, c.R, s_ptr, vb, columns);
    transform_rows(s_ptr, c.R, vb, p);
    row_statistics(c, s_ptr, vb, v0);
    if (c.has_pairs) pair_cross_terms(c, s_ptr, vb);
    at::Tensor p_cols, pc_cols, rows;
    if (grad_hidden && !columns.empty()) take_override_columns(c, s_ptr, vb, columns, &p_cols, &pc_cols, &rows);
    expectation_gemms(c, w, vb);
    if (rows.defined()) {
      c.expect.addmm_(p_cols, rows);
      if (c.cross_expect) c.x_expect.addmm_(pc_cols, rows);
    }
  }

  BlockColumns override_columns(int64_t v0, int64_t vb) const {
    BlockColumns columns;
    for (int64_t j = 0; j < static_cast<int64_t>(ov_ids.size()); ++j) {
      const int64_t col = block_column(ov_ids[j], v0, vb);
      if (col >= 0) columns.emplace_back(j, col);
    }
    return columns;
  }

  // The head's output of the override columns (ov_logits [rows, n]), before the model's transform.
  void write_override_logits(const at::Tensor& ov_logits, int64_t rows, acc_t* s_ptr, int64_t vb,
                             const BlockColumns& columns) {
    if (columns.empty()) return;
    const acc_t* ov_ptr = ov_logits.template data_ptr<acc_t>();
    const int64_t n = ov_logits.size(1);
    for (int64_t j = 0; j < rows; ++j)
      for (const auto& jc : columns) s_ptr[j * vb + jc.second] = ov_ptr[j * n + jc.first];
  }

  // Takes the override columns out of P (and, under a soft-cap, out of the pairs' P_teacher *
  // g_student block): their entries become *p_cols [R, n_blk] (*pc_cols [M, n_blk]) for the
  // override rows *rows [n_blk, Hd], and zeros in the buffers the weight's GEMM reads.
  void take_override_columns(Chunk<acc_t>& c, const acc_t* s_ptr, int64_t vb, const BlockColumns& columns,
                             at::Tensor* p_cols, at::Tensor* pc_cols, at::Tensor* rows) {
    const int64_t nb = static_cast<int64_t>(columns.size());
    const auto opts = hidden.options().dtype(acc);
    std::vector<int64_t> which;
    for (const auto& jc : columns) which.push_back(jc.first);
    *rows = ov_rows.index_select(0, long_tensor(which));
    *p_cols = at::empty({c.R, nb}, opts);
    acc_t* out = p_cols->template data_ptr<acc_t>();
    const acc_t cap = static_cast<acc_t>(p.logit_softcap);
    for (int64_t j = 0; j < c.R; ++j) {
      const acc_t shift = exp_shift(c.run_max[j]);
      const int64_t pair = c.pair_diff ? c.diff_pair[j] : -1;
      for (int64_t k = 0; k < nb; ++k) {
        const int64_t col = columns[k].second;
        out[j * nb + k] = expectation_weight(s_ptr[j * vb + col], shift, cap);
        if (pair >= 0)  // the difference row's entry (no soft-cap on the bf16 path)
          out[j * nb + k] -= c.ratio[pair] *
                             unnormalised_prob(s_ptr[h_plan.pair_t[pair] * vb + col], shift);
        if (c.bf16_gemm) {
          at::BFloat16* p16 = c.p_buf.template data_ptr<at::BFloat16>();
          p16[j * c.lda_p + col] = at::BFloat16(0.0f);
          if (j < c.n_lo) p16[(c.R + j) * c.lda_p + col] = at::BFloat16(0.0f);
        } else {
          c.p_buf.template data_ptr<acc_t>()[j * vb + col] = acc_t(0);
        }
      }
    }
    if (!c.cross_expect) return;
    *pc_cols = at::empty({p.n_pairs, nb}, opts);
    acc_t* pc_out = pc_cols->template data_ptr<acc_t>();
    acc_t* pc = c.pc_buf.template data_ptr<acc_t>();
    for (int64_t i = 0; i < p.n_pairs; ++i)
      for (int64_t k = 0; k < nb; ++k) {
        pc_out[i * nb + k] = pc[i * vb + columns[k].second];
        pc[i * vb + columns[k].second] = acc_t(0);
      }
  }

  // Per row: online max / sum, P, target logit, rescale of the running expectation O.
  void row_statistics(Chunk<acc_t>& c, const acc_t* s_ptr, int64_t vb, int64_t v0) {
    const bool simd = simd_rows<acc_t>();
    at::parallel_for(0, c.R, 16, [&](int64_t rb, int64_t re) {
      for (int64_t j = rb; j < re; ++j) {
        if (c.pair_diff && c.diff_pair[j] >= 0) continue;  // after their teachers, below
        const acc_t* s = s_ptr + j * vb;
        row_block(c, j, s, vb, v0, row_max(s, vb, c.run_max[j], simd), simd);
      }
    });
    if (c.pair_diff) difference_rows(c, s_ptr, vb, v0);
  }

  // Row j's part of a block with its running max grown to bmax: P (its row of p_buf, and its lo
  // row if it has one), the online sum and max, the target logit, the rescale of its O. Returns
  // the rescale factor.
  acc_t row_block(Chunk<acc_t>& c, int64_t j, const acc_t* s, int64_t vb, int64_t v0, acc_t bmax,
                  bool simd) {
    const acc_t a = block_rescale(c.run_max[j], bmax);
    const acc_t shift = exp_shift(bmax);
    double sum = 0.0;
    if (!c.bf16_gemm) {
      sum = fill_p_row(c.p_buf.template data_ptr<acc_t>() + j * vb, s, vb, shift, p);
    } else if constexpr (std::is_same<acc_t, float>::value) {  // (bf16_gemm implies float)
      at::BFloat16* p16_ptr = c.p_buf.template data_ptr<at::BFloat16>();
      at::BFloat16* lo = j < c.n_lo ? p16_ptr + (c.R + j) * c.lda_p : nullptr;
      sum = fill_p_row_bf16(p16_ptr + j * c.lda_p, lo, s, vb, shift, c.lda_p, simd);
    }
    c.run_sum[j] = c.run_sum[j] * static_cast<double>(a) + sum;
    c.run_max[j] = bmax;
    c.alpha[j] = a;
    const int64_t t = c.target[j];
    if (t >= v0 && t < v0 + vb) c.target_logit[j] = s[t - v0];
    if (grad_hidden && a != acc_t(1)) {
      acc_t* e = c.expect.template data_ptr<acc_t>() + j * p.hidden_dim;
      for (int64_t d = 0; d < p.hidden_dim; ++d) e[d] *= a;
    }
    return a;
  }

  // The students' rows of a block on the pair_diff path, once their teachers' statistics are
  // updated: the running max is the larger of the student's and its teacher's (so no exp of the
  // teacher's logits overflows), the sum Z_s as any row's, and P = p~_s - r_i p~_teacher.
  // Any r_i is exact: u_i = sum_b r_b T_b, kept by summation by parts as r_B S_B - sum over the
  // changes of r of (r_new - r_old) S (S: the teacher's O when r changes, before the block's
  // GEMM, at the student's max; r_B S_B is added in finish_expectations). r_i follows the running
  // ratio Z_s / Z_teacher at that max, so the row stays a small difference when the two
  // distributions agree up to a shift of every logit; it changes only when the running ratio has
  // moved by more than kRatioTolerance relative (each change reads the teacher's O and writes
  // u_i: per block at |E| = 384 that was as dear as the sweep it replaces). A lag of that size
  // leaves the row bf16's error times 2^-10 of p~ (the hi + lo split's ~2^-17 is of that size).
  static constexpr double kRatioTolerance = 1.0 / 1024;

  void difference_rows(Chunk<acc_t>& c, const acc_t* s_ptr, int64_t vb, int64_t v0) {
    if constexpr (std::is_same<acc_t, float>::value) {
      at::BFloat16* p16_ptr = c.p_buf.template data_ptr<at::BFloat16>();
      const float* e_ptr = c.expect.template data_ptr<float>();
      float* u_ptr = c.u.template data_ptr<float>();
      const int64_t Hd = p.hidden_dim;
      const bool simd = simd_rows<float>();
      at::parallel_for(0, p.n_pairs, 4, [&](int64_t ib, int64_t ie) {
        for (int64_t i = ib; i < ie; ++i) {
          const int64_t j = h_plan.pair_s[i], t = h_plan.pair_t[i];
          const float* s = s_ptr + j * vb;
          const float* st = s_ptr + t * vb;
          const float bmax = std::max(row_max(s, vb, c.run_max[j], simd), c.run_max[t]);
          // As any row's (P = p~_s for the moment, overwritten below), then u at the new max too.
          const float a = row_block(c, j, s, vb, v0, bmax, simd);
          if (a != 1.0f) {
            for (int64_t d = 0; d < Hd; ++d) u_ptr[i * Hd + d] *= a;
          }
          const float shift = exp_shift(bmax);
          at::BFloat16* row = p16_ptr + j * c.lda_p;
          const double t_scale = teacher_scale(c, t, shift);
          const double z_t = c.run_sum[t] * t_scale;
          const float r = z_t > 0.0 ? static_cast<float>(c.run_sum[j] / z_t) : 0.0f;
          const float r_new = std::isfinite(r) ? r : 0.0f;
          const float r_old = c.ratio[i];
          if (r_new != r_old && !(std::abs(static_cast<double>(r_new) - r_old) <= kRatioTolerance * r_old)) {
            const float f = static_cast<float>((static_cast<double>(r_old) - r_new) * t_scale);
            const float* e_t = e_ptr + t * Hd;  // S: the teacher's O before this block's GEMM
            if (f != 0.0f)
              for (int64_t d = 0; d < Hd; ++d) u_ptr[i * Hd + d] += f * e_t[d];
            c.ratio[i] = r_new;
          }
          // p~_s - r p~_t = exp(s - shift) - exp(st - (shift - log r)), rounded to bf16 once.
          const float lse_t = c.ratio[i] > 0.0f ? shift - std::log(c.ratio[i])
                                                : std::numeric_limits<float>::infinity();
          if (simd) {
            cpu_rows::prob_difference_to_bf16(s, st, vb, shift, lse_t, row);
          } else {
            for (int64_t v = 0; v < vb; ++v)
              row[v] = at::BFloat16(unnormalised_prob(s[v], shift) -
                                    c.ratio[i] * unnormalised_prob(st[v], shift));
          }
        }
      });
    }
  }

  // exp(m_teacher - shift): the teacher's sums and O (at its running max) at a student's shift;
  // 0 while the teacher's logits have all been -inf.
  static double teacher_scale(const Chunk<acc_t>& c, int64_t t, double shift) {
    return c.run_max[t] == neg_inf<acc_t>() ? 0.0 : std::exp(static_cast<double>(c.run_max[t]) - shift);
  }

  // Per pair: the KL cross term A += sum_v P_teacher (S_teacher - S_student) and, under a
  // soft-cap, the block of P_teacher * g_student (the pairs' rows are local positions: the first
  // chunk starts at position 0).
  void pair_cross_terms(Chunk<acc_t>& c, const acc_t* s_ptr, int64_t vb) {
    const std::vector<int64_t>& pair_t = h_plan.pair_t;
    const std::vector<int64_t>& pair_s = h_plan.pair_s;
    const acc_t cap = static_cast<acc_t>(p.logit_softcap);
    const int64_t Hd = p.hidden_dim;
    const bool simd = simd_rows<acc_t>();
    at::parallel_for(0, p.n_pairs, 4, [&](int64_t ib, int64_t ie) {
      for (int64_t i = ib; i < ie; ++i) {
        const acc_t* st = s_ptr + pair_t[i] * vb;
        const acc_t* ss = s_ptr + pair_s[i] * vb;
        // The teacher's unnormalised probabilities again, in acc_t (P may be bf16).
        const acc_t t_max = exp_shift(c.run_max[pair_t[i]]);
        acc_t* pc = c.cross_expect ? c.pc_buf.template data_ptr<acc_t>() + i * vb : nullptr;
        double sum = 0.0;  // in double, as the row sums
        if (simd && pc == nullptr) {
          if constexpr (std::is_same<acc_t, float>::value) sum = cpu_rows::kl_cross_sum(st, ss, vb, t_max);
        } else {
          for (int64_t v = 0; v < vb; ++v) {
            const acc_t e = unnormalised_prob(st[v], t_max);
            sum += kl_cross_term(e, st[v], ss[v]);
            if (pc != nullptr) pc[v] = e * softcap_slope(ss[v], cap);
          }
        }
        const acc_t a = c.alpha[pair_t[i]];
        c.cross[i] = c.cross[i] * static_cast<double>(a) + sum;
        if (c.cross_expect && a != acc_t(1)) {
          acc_t* x = c.x_expect.template data_ptr<acc_t>() + i * Hd;
          for (int64_t d = 0; d < Hd; ++d) x[d] *= a;
        }
      }
    });
  }

  // O += P W_blk (and X += Pc W_blk under a soft-cap); w is the block in acc_t off the bf16 path.
  void expectation_gemms(Chunk<acc_t>& c, const at::Tensor& w, int64_t vb) {
    if (grad_hidden && c.bf16_gemm) {
      if constexpr (std::is_same<acc_t, float>::value) {  // (bf16_gemm implies acc_t float)
        // O += P_hi W for every row and O += P_lo W for the paired rows (0 .. n_lo - 1), from
        // one pass over the block where the GEMM packs it itself.
        const at::BFloat16* p16_ptr = c.p_buf.template data_ptr<at::BFloat16>();
        cpu_gemm::gemm_bf16_f32_two(p16_ptr, c.lda_p, c.R, p16_ptr + c.R * c.lda_p, c.n_lo,
                                    c.packed_expect, c.expect.template data_ptr<float>(),
                                    p.hidden_dim, /*accumulate=*/true);
      }
    } else if (grad_hidden) {
      c.expect.addmm_(front(c.p_buf, c.R, vb), w);
    }
    if (c.cross_expect) c.x_expect.addmm_(front(c.pc_buf, p.n_pairs, vb), w);
  }

  // lse of the chunk's rows (into the output and c.lse); returns the sum of their CE terms.
  double finish_rows(Chunk<acc_t>& c) {
    acc_t* lse_ptr = lse.data_ptr<acc_t>();
    c.lse.resize(c.R);
    double ce_sum = 0.0;
    for (int64_t j = 0; j < c.R; ++j) {
      c.lse[j] = lse_finish(static_cast<double>(c.run_max[j]), c.run_sum[j]);
      lse_ptr[c.rows[j]] = static_cast<acc_t>(c.lse[j]);
      if (c.target[j] != kIgnoreIndex)
        ce_sum += ce_row(c.lse[j], static_cast<double>(c.target_logit[j]));
    }
    return ce_sum;
  }

  // E = O / Z (and X / Z_teacher), then d ce / d h_r = scale (E_r - g_rt W_t) / n_targeted for
  // the chunk's targeted rows (the target rows of W gathered once, in acc_t; an override row
  // for an override id).
  void finish_expectations(Chunk<acc_t>& c) {
    const int64_t Hd = p.hidden_dim;
    acc_t* e_ptr = c.expect.template data_ptr<acc_t>();
    if (c.pair_diff) {  // u_i += r_B S_B, the last term of u (difference_rows), before any E = O / Z
      acc_t* u_ptr = c.u.template data_ptr<acc_t>();
      for (int64_t i = 0; i < p.n_pairs; ++i) {
        const int64_t t = h_plan.pair_t[i];
        const double t_scale = teacher_scale(c, t, exp_shift(c.run_max[h_plan.pair_s[i]]));
        const acc_t f = static_cast<acc_t>(c.ratio[i] * t_scale);
        if (f == acc_t(0)) continue;
        for (int64_t d = 0; d < Hd; ++d) u_ptr[i * Hd + d] += f * e_ptr[t * Hd + d];
      }
    }
    at::parallel_for(0, c.R, 16, [&](int64_t rb, int64_t re) {
      for (int64_t j = rb; j < re; ++j) {
        acc_t* e = e_ptr + j * Hd;
        const acc_t inv_z = static_cast<acc_t>(1.0 / c.run_sum[j]);
        for (int64_t d = 0; d < Hd; ++d) e[d] *= inv_z;
        // A difference row's O_s + u_i is the student's own sum_v p~_s W_v (Chunk::pair_diff).
        const int64_t pair = c.pair_diff ? c.diff_pair[j] : -1;
        if (pair >= 0) {
          const acc_t* u = c.u.template data_ptr<acc_t>() + pair * Hd;
          for (int64_t d = 0; d < Hd; ++d) e[d] += u[d] * inv_z;
        }
      }
    });
    if (c.cross_expect) {
      acc_t* x_ptr = c.x_expect.template data_ptr<acc_t>();
      for (int64_t i = 0; i < p.n_pairs; ++i) {
        const acc_t inv_z = static_cast<acc_t>(1.0 / c.run_sum[h_plan.pair_t[i]]);
        for (int64_t d = 0; d < Hd; ++d) x_ptr[i * Hd + d] *= inv_z;
      }
    }
    // The logit scale multiplies every hidden gradient once, here.
    const acc_t inv_n = p.n_targeted > 0
                            ? static_cast<acc_t>(p.logit_scale) / acc_t(p.n_targeted)
                            : acc_t(0);
    const acc_t cap = static_cast<acc_t>(p.logit_softcap);
    const at::Tensor wt = target_weight_rows(weight, long_tensor(c.target), ov, acc);
    const acc_t* wt_ptr = wt.data_ptr<acc_t>();
    acc_t* g_ptr = grad_ce.data_ptr<acc_t>();
    at::parallel_for(0, c.R, 16, [&](int64_t rb, int64_t re) {
      for (int64_t j = rb; j < re; ++j) {
        if (c.target[j] == kIgnoreIndex) continue;
        const acc_t* w = wt_ptr + j * Hd;
        const acc_t* e = e_ptr + j * Hd;
        const acc_t slope = softcap_slope(c.target_logit[j], cap);
        acc_t* g = g_ptr + c.rows[j] * Hd;
        for (int64_t d = 0; d < Hd; ++d) g[d] = ce_hidden_grad(e[d], slope * w[d], inv_n);
      }
    });
  }

  // The pairs' KLs, the top-k selection (the same ATen code as on the GPU,
  // lm_head_losses_host.h) and, with grad_hidden, d kl / d h_s = sum over kept pairs i with
  // student s of scale coef_i (E_s - X_i), X_i = E_teacher without a soft-cap.
  void finish_pairs(Chunk<acc_t>& c) {
    const std::vector<int64_t>& pair_t = h_plan.pair_t;
    const std::vector<int64_t>& pair_s = h_plan.pair_s;
    at::Tensor pair_kl_values = at::empty({p.n_pairs}, hidden.options().dtype(acc));
    acc_t* kl_ptr = pair_kl_values.data_ptr<acc_t>();
    for (int64_t i = 0; i < p.n_pairs; ++i)
      kl_ptr[i] = static_cast<acc_t>(
          pair_kl(c.cross[i], c.run_sum[pair_t[i]], c.lse[pair_t[i]], c.lse[pair_s[i]]));
    auto selected = select_topk(pair_kl_values, plan, p);
    kl = selected.first.template item<acc_t>();
    coef = selected.second;
    if (!grad_hidden) return;
    const acc_t* co = coef.data_ptr<acc_t>();
    const int64_t Hd = p.hidden_dim;
    const acc_t scale = static_cast<acc_t>(p.logit_scale);
    if constexpr (std::is_same<acc_t, float>::value) {
      if (c.kl_grad_sweep) {
        std::vector<int64_t> kept;
        for (int64_t i = 0; i < p.n_pairs; ++i)
          if (co[i] != acc_t(0)) kept.push_back(i);
        if (kept.empty()) return;
        const at::Tensor diff = kept_pair_differences(c, kept);
        const float* d_ptr = diff.data_ptr<float>();
        float* g_ptr = grad_kl.data_ptr<float>();
        for (size_t k = 0; k < kept.size(); ++k) {  // d = E_s - E_teacher, formed by the sweep
          const int64_t i = kept[k];
          float* g = g_ptr + h_plan.student[i] * Hd;
          const float* d = d_ptr + static_cast<int64_t>(k) * Hd;
          for (int64_t x = 0; x < Hd; ++x) g[x] += scale * co[i] * d[x];
        }
        return;
      }
    }
    const acc_t* e_ptr = c.expect.template data_ptr<acc_t>();
    const acc_t* x_ptr = c.cross_expect ? c.x_expect.template data_ptr<acc_t>() : nullptr;
    acc_t* g_ptr = grad_kl.data_ptr<acc_t>();
    for (int64_t i = 0; i < p.n_pairs; ++i) {
      if (co[i] == acc_t(0)) continue;
      const acc_t* es = e_ptr + pair_s[i] * Hd;
      const acc_t* et = x_ptr != nullptr ? x_ptr + i * Hd : e_ptr + pair_t[i] * Hd;
      acc_t* g = g_ptr + h_plan.student[i] * Hd;
      for (int64_t d = 0; d < Hd; ++d) g[d] += kl_hidden_grad(es[d], et[d], scale * co[i]);
    }
  }

  // bf16 path: E_student - E_teacher of the kept pairs (the top of the file says why), [K, Hd].
  // One more sweep over the vocabulary for their two rows only, their lse known: each block's
  // logit rows D = p_student - p_teacher formed in float and rounded to bf16 once, then D W_blk.
  // With AMX, both products of a block run on one thread while its rows of W are in L2
  // (cpu_gemm::sweep_logits_then_product): W streams from memory once, not twice.
  at::Tensor kept_pair_differences(const Chunk<acc_t>& c, const std::vector<int64_t>& kept) {
    const int64_t K = static_cast<int64_t>(kept.size()), Hd = p.hidden_dim;
    const auto opts = hidden.options().dtype(acc);
    // Local rows: the teachers', then the students'.
    std::vector<int64_t> local(2 * K), hidden_rows(2 * K);
    std::vector<acc_t> row_lse(2 * K);
    for (int64_t k = 0; k < K; ++k) {
      local[k] = h_plan.pair_t[kept[k]];
      local[K + k] = h_plan.pair_s[kept[k]];
    }
    for (int64_t j = 0; j < 2 * K; ++j) {
      hidden_rows[j] = c.rows[local[j]];
      row_lse[j] = static_cast<acc_t>(c.lse[local[j]]);
    }
    const at::Tensor h = cpu_gemm::a_operand(hidden.index_select(0, long_tensor(hidden_rows)));
    const at::Tensor ov_logits =
        ov.given() ? c.ov_logits.index_select(0, long_tensor(local)) : at::Tensor();
    const bool has_bias = bias.has_value() && bias->defined();
    const at::Tensor bias_acc = has_bias ? bias->to(acc).contiguous() : at::Tensor();
    const acc_t* bias_ptr = has_bias ? bias_acc.template data_ptr<acc_t>() : nullptr;
    // The override columns' D [K, n_ov]: they multiply their rows, not the weight's (each
    // column lies in one block, so the blocks write disjoint entries).
    const int64_t n_ov = static_cast<int64_t>(ov_ids.size());
    at::Tensor d_ov = at::zeros({K, n_ov}, opts);
    acc_t* d_ov_ptr = d_ov.template data_ptr<acc_t>();
    const bool simd = simd_rows<acc_t>();
    // d = p_student - p_teacher for logit columns s (student) and t (teacher) of pair k.
    auto d_of = [&](int64_t k, acc_t s, acc_t t) {
      return kl_logit_grad(softmax_prob(s, row_lse[K + k]), softmax_prob(t, row_lse[k]), acc_t(1));
    };
    // The head's raw output of the block's 2K rows (s [2K, vb]) -> the pairs' rows of D at
    // stride ldd, the override columns' entries into d_ov.
    auto form_d = [&](int64_t v0, int64_t vb, acc_t* s_ptr, at::BFloat16* d_ptr, int64_t ldd) {
      if (has_bias)
        for (int64_t j = 0; j < 2 * K; ++j)
          for (int64_t v = 0; v < vb; ++v) s_ptr[j * vb + v] += bias_ptr[v0 + v];
      const BlockColumns columns = override_columns(v0, vb);
      write_override_logits(ov_logits, 2 * K, s_ptr, vb, columns);
      transform_rows(s_ptr, 2 * K, vb, p);
      at::parallel_for(0, K, 4, [&](int64_t kb, int64_t ke) {
        for (int64_t k = kb; k < ke; ++k) {
          const acc_t* st = s_ptr + k * vb;
          const acc_t* ss = s_ptr + (K + k) * vb;
          at::BFloat16* d = d_ptr + k * ldd;
          if (simd) {
            cpu_rows::prob_difference_to_bf16(ss, st, vb, row_lse[K + k], row_lse[k], d);
          } else {
            for (int64_t v = 0; v < vb; ++v) d[v] = at::BFloat16(d_of(k, ss[v], st[v]));
          }
        }
      });
      for (const auto& jc : columns)
        for (int64_t k = 0; k < K; ++k) {
          const acc_t s = s_ptr[(K + k) * vb + jc.second], t = s_ptr[k * vb + jc.second];
          d_ov_ptr[k * n_ov + jc.first] = d_of(k, s, t);
          d_ptr[k * ldd + jc.second] = at::BFloat16(0.0f);
        }
    };
    at::Tensor diff = at::zeros({K, Hd}, opts);
    if (cpu_gemm::sweep_available(2 * K, K, Hd)) {
      cpu_gemm::sweep_logits_then_product(h.data_ptr<at::BFloat16>(), h.size(1), 2 * K, weight, K,
                                          form_d, diff.template data_ptr<float>(), Hd);
    } else {
      const int64_t Vb = vocab_block(2 * K, p.vocab), lda = cpu_gemm::operand_lda(Vb);
      const at::Tensor s_buf = at::empty({2 * K * Vb}, opts);
      const at::Tensor d_buf = at::empty({K * lda}, hidden.options());
      cpu_gemm::PackedB packed_logits, packed_w;
      for (int64_t v0 = 0; v0 < p.vocab; v0 += Vb) {
        const int64_t vb = std::min(Vb, p.vocab - v0);
        const at::Tensor S = front(s_buf, 2 * K, vb);
        logits_block(S, h, weight, /*bias=*/c10::nullopt, v0, vb, /*bf16_gemm=*/true,
                     &packed_logits, acc);
        at::BFloat16* d_ptr = d_buf.data_ptr<at::BFloat16>();
        form_d(v0, vb, S.data_ptr<acc_t>(), d_ptr, lda);
        for (int64_t k = 0; k < K; ++k)  // pads meet zeros of B
          for (int64_t v = vb; v < lda; ++v) d_ptr[k * lda + v] = at::BFloat16(0.0f);
        cpu_gemm::pack_into(weight.narrow(0, v0, vb), &packed_w);
        cpu_gemm::gemm_bf16_f32(d_ptr, lda, K, packed_w, diff.template data_ptr<float>(), Hd,
                                /*accumulate=*/true);
      }
    }
    if (n_ov > 0) diff.addmm_(d_ov, ov_rows);
    return diff;
  }
};

ForwardOutputs forward_sweep(const Problem& p, const LmHeadPlan& plan, const at::Tensor& hidden,
                             const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                             const Override& ov, bool grad_hidden, at::ScalarType acc) {
  ForwardOutputs o;
  const HostPlan h_plan = host_plan(plan, p);
  AT_DISPATCH_FLOATING_TYPES(acc, "lm_head_losses_fwd_cpu", [&] {
    Forward<scalar_t> f{p, plan, h_plan, hidden, weight, bias, ov, grad_hidden, acc};
    f.run();
    o = {at::scalar_tensor(f.ce, hidden.options().dtype(acc)),
         at::scalar_tensor(f.kl, hidden.options().dtype(acc)), f.grad_ce, f.grad_kl, f.lse,
         f.coef};
  });
  return o;
}

// The rows of the weight-gradient sweep: the logit rows (each once) and the rows of the
// logit-gradient matrix D, the CE rows first, then one per kept pair.
struct WeightGradRows {
  std::vector<int64_t> targets;        // [N] each hidden row's target (-100: none)
  std::vector<int64_t> teachers;       // [M] each pair's teacher row of hidden
  std::vector<int64_t> logit_rows;     // [Q] rows of hidden whose logits are needed
  std::vector<int64_t> local;          // [N] position of a row of hidden in logit_rows, or -1
  std::vector<int64_t> ce_rows, kept;  // targeted rows of hidden; kept pairs
  std::vector<int64_t> d_hidden_rows;  // [n_d] hidden row multiplying each D row
  int64_t n_ce() const { return static_cast<int64_t>(ce_rows.size()); }
  int64_t n_d() const { return static_cast<int64_t>(d_hidden_rows.size()); }
  int64_t n_logit() const { return static_cast<int64_t>(logit_rows.size()); }
};

template <typename acc_t>
WeightGradRows weight_grad_rows(const Problem& p, const HostPlan& h_plan, const acc_t* coef) {
  WeightGradRows w;
  w.targets.assign(p.n_rows, kIgnoreIndex);
  w.teachers.resize(p.n_pairs);
  for (int64_t j = 0; j < p.n_logit_rows; ++j) w.targets[h_plan.rows[j]] = h_plan.row_targets[j];
  for (int64_t i = 0; i < p.n_pairs; ++i) w.teachers[i] = h_plan.rows[h_plan.pair_t[i]];
  w.local.assign(p.n_rows, -1);
  auto add = [&](int64_t r) {
    if (w.local[r] < 0) {
      w.local[r] = static_cast<int64_t>(w.logit_rows.size());
      w.logit_rows.push_back(r);
    }
  };
  for (int64_t r = 0; r < p.n_rows; ++r)
    if (w.targets[r] != kIgnoreIndex) w.ce_rows.push_back(r);
  for (int64_t i = 0; i < p.n_pairs; ++i)
    if (coef[i] != acc_t(0)) w.kept.push_back(i);
  for (int64_t r : w.ce_rows) {
    add(r);
    w.d_hidden_rows.push_back(r);
  }
  for (int64_t i : w.kept) {
    add(w.teachers[i]);
    add(h_plan.student[i]);
    w.d_hidden_rows.push_back(h_plan.student[i]);
  }
  return w;
}

// D [n_d, vb] of one vocabulary block from its logits S [Q, vb]: each row coef * d loss / d z
// times the logit scale and its own row's soft-cap slope (the CE row's, or the pair's
// student's).
template <typename acc_t>
void logit_grad_block(const Problem& p, const HostPlan& h_plan, const WeightGradRows& w,
                      const acc_t* s_ptr, acc_t* d_ptr, int64_t v0, int64_t vb, const acc_t* lse,
                      const acc_t* coef, acc_t g_ce, acc_t g_kl) {
  const acc_t scale = static_cast<acc_t>(p.logit_scale), cap = static_cast<acc_t>(p.logit_softcap);
  const acc_t ce_coef = p.n_targeted > 0 ? scale * g_ce / acc_t(p.n_targeted) : acc_t(0);
  const int64_t n_ce = w.n_ce();
  at::parallel_for(0, w.n_d(), 16, [&](int64_t jb, int64_t je) {
    for (int64_t j = jb; j < je; ++j) {
      acc_t* drow = d_ptr + j * vb;
      if (j < n_ce) {
        const int64_t r = w.ce_rows[j];
        const acc_t* s = s_ptr + w.local[r] * vb;
        const int64_t t = w.targets[r] - v0;
        for (int64_t v = 0; v < vb; ++v)
          drow[v] = ce_logit_grad(softmax_prob(s[v], lse[r]), v == t, ce_coef) *
                    softcap_slope(s[v], cap);
      } else {
        const int64_t i = w.kept[j - n_ce];
        const int64_t st = h_plan.student[i], te = w.teachers[i];
        const acc_t* ss = s_ptr + w.local[st] * vb;
        const acc_t* sa = s_ptr + w.local[te] * vb;
        const acc_t c = scale * g_kl * coef[i];
        for (int64_t v = 0; v < vb; ++v)
          drow[v] = kl_logit_grad(softmax_prob(ss[v], lse[st]), softmax_prob(sa[v], lse[te]), c) *
                    softcap_slope(ss[v], cap);
      }
    }
  });
}

// d weight and d bias: one more sweep over the vocabulary for the CE rows and the kept pairs'
// rows only, with the saved lse, writing each vocabulary block of the gradients once.
template <typename acc_t>
void weight_grad_sweep(const Problem& p, const HostPlan& h_plan, const at::Tensor& hidden,
                       const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       const at::Tensor& coef_t, const at::Tensor& lse_t, acc_t g_ce, acc_t g_kl,
                       at::ScalarType acc, at::Tensor* grad_weight, at::Tensor* grad_bias) {
  const acc_t* coef = coef_t.data_ptr<acc_t>();
  const acc_t* lse = lse_t.data_ptr<acc_t>();
  const WeightGradRows rows = weight_grad_rows(p, h_plan, coef);
  const int64_t Q = rows.n_logit(), n_d = rows.n_d(), V = p.vocab;
  const auto opts = hidden.options().dtype(acc);
  if (n_d == 0) {  // nothing targeted and no pairs: zero gradients
    if (grad_weight) *grad_weight = at::zeros_like(weight);
    if (grad_bias) *grad_bias = at::zeros({V}, weight.options());
    return;
  }
  // Every vocabulary block of the gradients is written exactly once below.
  if (grad_weight) *grad_weight = at::empty_like(weight);
  if (grad_bias) *grad_bias = at::empty({V}, opts);
  // bf16 path (see the top of the file): logits as in the forward; d weight = D^T H with D
  // (formed in fp32, the KL rows as the difference p_s - p_teacher) rounded to bf16, as a
  // bf16 autograd backward rounds its logit gradient; the result is stored in bf16 anyway.
  const bool bf16_gemm = std::is_same<acc_t, float>::value && use_bf16_gemm(hidden, p);
  const at::Tensor logit_hidden = hidden.index_select(0, long_tensor(rows.logit_rows));
  const at::Tensor d_hidden = hidden.index_select(0, long_tensor(rows.d_hidden_rows));
  const at::Tensor h = bf16_gemm ? cpu_gemm::a_operand(logit_hidden) : logit_hidden.to(acc).contiguous();
  const at::Tensor hd = bf16_gemm ? at::Tensor() : d_hidden.to(acc).contiguous();
  cpu_gemm::PackedB packed_logits, packed_hd;
  if (bf16_gemm && grad_weight) cpu_gemm::pack_into(d_hidden.contiguous(), &packed_hd);
  const int64_t Vb = vocab_block(std::max(Q, n_d), V);
  const at::Tensor s_buf = at::empty({Q * Vb}, opts), d_buf = at::empty({n_d * Vb}, opts);
  const at::Tensor gw_buf = bf16_gemm && grad_weight ? at::empty({Vb * p.hidden_dim}, opts) : at::Tensor();
  for (int64_t v0 = 0; v0 < V; v0 += Vb) {
    const int64_t vb = std::min(Vb, V - v0);
    const at::Tensor S = front(s_buf, Q, vb), D = front(d_buf, n_d, vb);
    logits_block(S, h, weight, bias, v0, vb, bf16_gemm, &packed_logits, acc);
    transform_rows(S.data_ptr<acc_t>(), Q, vb, p);
    logit_grad_block(p, h_plan, rows, S.data_ptr<acc_t>(), D.data_ptr<acc_t>(), v0, vb, lse, coef,
                     g_ce, g_kl);
    if (grad_weight && bf16_gemm) {
      const at::Tensor d_t = cpu_gemm::transposed_a_operand(D);  // D^T [vb, n_d] in bf16
      at::Tensor gw = front(gw_buf, vb, p.hidden_dim);
      cpu_gemm::gemm_bf16_f32(d_t.data_ptr<at::BFloat16>(), d_t.size(1), vb, packed_hd,
                              gw.data_ptr<float>(), p.hidden_dim, /*accumulate=*/false);
      grad_weight->narrow(0, v0, vb).copy_(gw);
    } else if (grad_weight) {
      grad_weight->narrow(0, v0, vb).copy_(at::mm(D.t(), hd));
    }
    if (grad_bias) grad_bias->narrow(0, v0, vb).copy_(D.sum(0));
  }
  if (grad_bias) *grad_bias = grad_bias->to(weight.scalar_type());
}

void weight_grads(const Problem& p, const LmHeadPlan& plan, const at::Tensor& hidden,
                  const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                  const at::Tensor& coef, const at::Tensor& lse, const at::Tensor& grad_ce,
                  const at::Tensor& grad_kl, at::ScalarType acc, at::Tensor* grad_weight,
                  at::Tensor* grad_bias) {
  const HostPlan h_plan = host_plan(plan, p);
  AT_DISPATCH_FLOATING_TYPES(acc, "lm_head_losses_bwd_cpu", [&] {
    weight_grad_sweep<scalar_t>(p, h_plan, hidden, weight, bias, coef, lse,
                                grad_ce.to(acc).item<scalar_t>(), grad_kl.to(acc).item<scalar_t>(),
                                acc, grad_weight, grad_bias);
  });
}

// The CPU kernels, for the shared entry points (lm_head_losses_host.h).
struct CpuDevice {
  static constexpr at::DeviceType kType = at::kCPU;
  struct Scope {
    explicit Scope(const at::Tensor&) {}
  };
  static constexpr ForwardKernel forward = &forward_sweep;
  static constexpr WeightGradKernel weight_grads = &lm_head::weight_grads;
};

}  // namespace

TORCH_LIBRARY_IMPL(crystal_ext, CPU, m) { register_kernels<CpuDevice>(m); }

}  // namespace lm_head
}  // namespace crystal_ext
