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
// so the forward does exactly two GEMM passes over the head (the same as a plain
// linear + cross-entropy forward and its hidden-gradient backward) and ends with the losses
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
// as in FlashAttention's P V product; for the paired rows, whose KL gradient E_s - E_teacher
// is a difference of nearly equal expectations, P is split into bf16 hi + lo parts (two
// products, error ~2^-17 instead of 2^-9 relative) so that the difference keeps fp32 accuracy.
// The weight-gradient sweep uses it too. CRYSTAL_EXT_CPU_BF16_GEMM=0 turns the path off
// (ATen fp32 GEMMs on converted blocks, as for fp16 inputs).
//
// Workspace: two [rows_in_chunk, Vb] fp32 blocks (S and P, about 4 MB each; P in bf16 on the
// bf16 path, plus lo rows for the paired rows), the running expectation [rows_in_chunk, Hd]
// fp32, a copy of the chunk's hidden rows and, for bf16/fp16 without the bf16 GEMM, one fp32
// weight block (with it, the weight block packed twice in bf16). Never [N, V].
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/gemm_bf16.h"
#include "lm_head_losses.h"
#include "lm_head_losses_checks.h"
#include "lm_head_losses_host.h"
#include "lm_head_losses_plan.h"

namespace crystal_ext {
namespace lm_head {
namespace {

using cpu_plan::kMaxChunkRows;
using cpu_plan::vocab_block;

// bf16 inputs take the bf16 GEMM path where the CPU has it (see the top of the file), except
// under a logit soft-cap, whose slope-weighted P and per-pair cross expectations run on the
// fp32 GEMM path.
bool use_bf16_gemm(const at::Tensor& hidden, const Problem& p) {
  if (hidden.scalar_type() != at::kBFloat16 || !cpu_gemm::bf16_gemm_available() || p.capped())
    return false;
  const char* env = std::getenv("CRYSTAL_EXT_CPU_BF16_GEMM");
  return env == nullptr || std::strcmp(env, "0") != 0;
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

template <typename acc_t>
struct Forward {
  const Problem& p;
  const Plan& plan;
  const HostPlan& h_plan;
  const at::Tensor& hidden;  // contiguous, input dtype
  const at::Tensor& weight;  // contiguous, input dtype
  const c10::optional<at::Tensor>& bias;
  bool grad_hidden;
  at::ScalarType acc;

  // outputs
  acc_t ce = acc_t(0), kl = acc_t(0);
  at::Tensor lse, coef, grad_ce, grad_kl;

  void run() {
    const auto opts = hidden.options().dtype(acc);
    lse = at::zeros({p.n_rows}, opts);
    coef = at::zeros({p.n_pairs}, opts);
    grad_ce = grad_hidden ? at::zeros({p.n_rows, p.hidden_dim}, opts) : at::empty({0}, opts);
    grad_kl = grad_hidden ? at::zeros({p.n_rows, p.hidden_dim}, opts) : at::empty({0}, opts);
    double ce_sum = 0.0;
    for (const auto& chunk : row_chunks(p, kMaxChunkRows)) ce_sum += run_chunk(chunk.first, chunk.second);
    ce = p.n_targeted > 0 ? static_cast<acc_t>(ce_sum / static_cast<double>(p.n_targeted))
                          : acc_t(0);
  }

  // Returns the sum of the chunk's CE terms.
  double run_chunk(int64_t begin, int64_t end) {
    const int64_t R = end - begin, Hd = p.hidden_dim, V = p.vocab;
    const auto opts = hidden.options().dtype(acc);
    const std::vector<int64_t> chunk_rows(h_plan.rows.begin() + begin, h_plan.rows.begin() + end);
    const int64_t Vb = vocab_block(R, V);
    const at::Tensor s_buf = at::empty({R * Vb}, opts);
    // Pairs live in the first chunk (their rows come first in p.rows).
    const bool has_pairs = begin == 0 && p.n_pairs > 0;
    // bf16 path: the hidden rows and P as bf16 A operands; P has n_lo more rows, the lo parts
    // of the paired rows (local rows 0 .. n_lo - 1).
    const bool bf16_gemm = std::is_same<acc_t, float>::value && use_bf16_gemm(hidden, p);
    const int64_t n_lo = bf16_gemm && has_pairs ? p.n_paired_rows : 0;
    const at::Tensor chunk_hidden = hidden.index_select(0, long_tensor(chunk_rows));
    const at::Tensor h = bf16_gemm ? cpu_gemm::a_operand(chunk_hidden) : chunk_hidden.to(acc).contiguous();
    const int64_t lda_p = bf16_gemm ? cpu_gemm::operand_lda(Vb) : Vb;
    const at::Tensor p_buf = bf16_gemm ? at::empty({(R + n_lo) * lda_p}, hidden.options())
                                       : at::empty({R * Vb}, opts);
    cpu_gemm::PackedB packed_logits, packed_expect;
    at::Tensor expect = grad_hidden ? at::zeros({R, Hd}, opts) : at::Tensor();
    // The running sums, the KL cross terms and the log-sum-exps are kept in double: a pair's
    // KL is A / Z_a - lse_a + lse_s, a small difference of terms of size log V, so their float
    // rounding (~1e-7 absolute) would dominate the KL of two nearly equal rows.
    std::vector<double> run_sum(R, 0.0);
    std::vector<acc_t> run_max(R, neg_inf<acc_t>()),
        alpha(R, acc_t(0)), target_logit(R, acc_t(0));
    const std::vector<int64_t> target(h_plan.row_targets.begin() + begin,
                                      h_plan.row_targets.begin() + end);
    std::vector<double> cross(has_pairs ? p.n_pairs : 0, 0.0);
    // Under a soft-cap the KL gradient needs each pair's cross expectation
    // X_i = sum_v p_av g_sv W_v (csrc/lm_head_losses.h): its unnormalised rows, rescaled with
    // the teacher's running max, and their block of P_teacher * g_student.
    const bool cross_expect = has_pairs && grad_hidden && p.capped();
    const acc_t cap = static_cast<acc_t>(p.logit_softcap);
    at::Tensor x_expect = cross_expect ? at::zeros({p.n_pairs, Hd}, opts) : at::Tensor();
    const at::Tensor pc_buf = cross_expect ? at::empty({p.n_pairs * Vb}, opts) : at::Tensor();
    // Local positions of each pair's rows (the first chunk starts at position 0).
    const std::vector<int64_t>& pair_t = h_plan.pair_t;
    const std::vector<int64_t>& pair_s = h_plan.pair_s;

    for (int64_t v0 = 0; v0 < V; v0 += Vb) {
      const int64_t vb = std::min(Vb, V - v0);
      const at::Tensor S = front(s_buf, R, vb);
      const at::Tensor w = logits_block(S, h, weight, bias, v0, vb, bf16_gemm, &packed_logits, acc);
      if (bf16_gemm && grad_hidden) cpu_gemm::pack_into(weight.narrow(0, v0, vb), &packed_expect);
      acc_t* s_ptr = S.data_ptr<acc_t>();
      transform_rows(s_ptr, R, vb, p);
      acc_t* p_ptr = bf16_gemm ? nullptr : p_buf.data_ptr<acc_t>();
      at::BFloat16* p16_ptr = bf16_gemm ? p_buf.data_ptr<at::BFloat16>() : nullptr;
      acc_t* e_ptr = grad_hidden ? expect.data_ptr<acc_t>() : nullptr;
      at::parallel_for(0, R, 16, [&](int64_t rb, int64_t re) {
        for (int64_t j = rb; j < re; ++j) {
          const acc_t* s = s_ptr + j * vb;
          acc_t bmax = run_max[j];
          for (int64_t v = 0; v < vb; ++v) bmax = s[v] > bmax ? s[v] : bmax;
          const acc_t a = block_rescale(run_max[j], bmax);
          const acc_t shift = exp_shift(bmax);
          // A block's sums in double too: added one by one, thousands of similar terms (a flat
          // distribution) would lose about 1e-5 relative in float.
          double sum = 0.0;
          if (!bf16_gemm) {
            // P enters the expectation GEMM: p~ times the soft-cap's slope (1 without a cap).
            acc_t* pr = p_ptr + j * vb;
            for (int64_t v = 0; v < vb; ++v) {
              pr[v] = unnormalised_prob(s[v], shift);
              sum += pr[v];
            }
            if (p.capped())
              for (int64_t v = 0; v < vb; ++v) pr[v] *= softcap_slope(s[v], cap);
          } else {
            at::BFloat16* hi = p16_ptr + j * lda_p;
            at::BFloat16* lo = j < n_lo ? p16_ptr + (R + j) * lda_p : nullptr;
            for (int64_t v = 0; v < vb; ++v) {
              const float pv = static_cast<float>(unnormalised_prob(s[v], shift));
              sum += pv;
              hi[v] = at::BFloat16(pv);
              if (lo != nullptr) lo[v] = at::BFloat16(pv - static_cast<float>(hi[v]));
            }
            // The A operand's pad columns meet zeros of B, but must not be NaN.
            for (int64_t v = vb; v < lda_p; ++v) {
              hi[v] = at::BFloat16(0.0f);
              if (lo != nullptr) lo[v] = at::BFloat16(0.0f);
            }
          }
          run_sum[j] = run_sum[j] * static_cast<double>(a) + sum;
          run_max[j] = bmax;
          alpha[j] = a;
          if (target[j] >= v0 && target[j] < v0 + vb) target_logit[j] = s[target[j] - v0];
          if (e_ptr != nullptr && a != acc_t(1)) {
            acc_t* e = e_ptr + j * Hd;
            for (int64_t d = 0; d < Hd; ++d) e[d] *= a;
          }
        }
      });
      if (has_pairs) {
        at::parallel_for(0, p.n_pairs, 4, [&](int64_t ib, int64_t ie) {
          for (int64_t i = ib; i < ie; ++i) {
            const acc_t* st = s_ptr + pair_t[i] * vb;
            const acc_t* ss = s_ptr + pair_s[i] * vb;
            // The teacher's unnormalised probabilities again, in acc_t (P may be bf16).
            const acc_t t_max = exp_shift(run_max[pair_t[i]]);
            acc_t* pc = cross_expect ? pc_buf.data_ptr<acc_t>() + i * vb : nullptr;
            double sum = 0.0;  // in double, as the row sums above
            for (int64_t v = 0; v < vb; ++v) {
              const acc_t e = unnormalised_prob(st[v], t_max);
              sum += kl_cross_term(e, st[v], ss[v]);
              if (pc != nullptr) pc[v] = e * softcap_slope(ss[v], cap);
            }
            cross[i] = cross[i] * static_cast<double>(alpha[pair_t[i]]) + sum;
            if (cross_expect && alpha[pair_t[i]] != acc_t(1)) {
              acc_t* x = x_expect.data_ptr<acc_t>() + i * Hd;
              for (int64_t d = 0; d < Hd; ++d) x[d] *= alpha[pair_t[i]];
            }
          }
        });
      }
      if (grad_hidden && bf16_gemm) {
        if constexpr (std::is_same<acc_t, float>::value) {  // (bf16_gemm implies acc_t float)
          // O += P_hi W for every row, then O += P_lo W for the paired rows (0 .. n_lo - 1).
          cpu_gemm::gemm_bf16_f32(p16_ptr, lda_p, R, packed_expect, e_ptr, Hd, /*accumulate=*/true);
          if (n_lo > 0)
            cpu_gemm::gemm_bf16_f32(p16_ptr + R * lda_p, lda_p, n_lo, packed_expect, e_ptr, Hd,
                                    /*accumulate=*/true);
        }
      } else if (grad_hidden) {
        expect.addmm_(front(p_buf, R, vb), w);
      }
      if (cross_expect) x_expect.addmm_(front(pc_buf, p.n_pairs, vb), w);
    }

    // Finish: lse, CE terms, expectations E = O / Z.
    acc_t* lse_ptr = lse.data_ptr<acc_t>();
    std::vector<double> chunk_lse(R);
    double ce_sum = 0.0;
    for (int64_t j = 0; j < R; ++j) {
      chunk_lse[j] = lse_finish(static_cast<double>(run_max[j]), run_sum[j]);
      lse_ptr[chunk_rows[j]] = static_cast<acc_t>(chunk_lse[j]);
      if (target[j] != kIgnoreIndex)
        ce_sum += ce_row(chunk_lse[j], static_cast<double>(target_logit[j]));
    }
    if (grad_hidden) {
      acc_t* e_ptr = expect.data_ptr<acc_t>();
      acc_t* g_ptr = grad_ce.data_ptr<acc_t>();
      // The logit scale multiplies every hidden gradient once, here.
      const acc_t inv_n = p.n_targeted > 0
                              ? static_cast<acc_t>(p.logit_scale) / acc_t(p.n_targeted)
                              : acc_t(0);
      at::parallel_for(0, R, 16, [&](int64_t rb, int64_t re) {
        for (int64_t j = rb; j < re; ++j) {
          acc_t* e = e_ptr + j * Hd;
          const acc_t inv_z = static_cast<acc_t>(1.0 / run_sum[j]);
          for (int64_t d = 0; d < Hd; ++d) e[d] *= inv_z;
        }
      });
      if (cross_expect) {
        acc_t* x_ptr = x_expect.data_ptr<acc_t>();
        for (int64_t i = 0; i < p.n_pairs; ++i) {
          const acc_t inv_z = static_cast<acc_t>(1.0 / run_sum[pair_t[i]]);
          for (int64_t d = 0; d < Hd; ++d) x_ptr[i * Hd + d] *= inv_z;
        }
      }
      // d ce / d h_r = scale (E_r - g_rt W_t) / n_targeted, for the chunk's targeted rows (the
      // target rows of W gathered once, in acc_t).
      std::vector<int64_t> safe_target(R);
      for (int64_t j = 0; j < R; ++j) safe_target[j] = target[j] == kIgnoreIndex ? 0 : target[j];
      const at::Tensor wt = weight.index_select(0, long_tensor(safe_target)).to(acc).contiguous();
      const acc_t* wt_ptr = wt.data_ptr<acc_t>();
      at::parallel_for(0, R, 16, [&](int64_t rb, int64_t re) {
        for (int64_t j = rb; j < re; ++j) {
          if (target[j] == kIgnoreIndex) continue;
          const acc_t* w = wt_ptr + j * Hd;
          const acc_t* e = e_ptr + j * Hd;
          const acc_t slope = softcap_slope(target_logit[j], cap);
          acc_t* g = g_ptr + chunk_rows[j] * Hd;
          for (int64_t d = 0; d < Hd; ++d) g[d] = ce_hidden_grad(e[d], slope * w[d], inv_n);
        }
      });
    }

    if (has_pairs) {
      at::Tensor pair_kl_values = at::empty({p.n_pairs}, opts);
      acc_t* kl_ptr = pair_kl_values.data_ptr<acc_t>();
      for (int64_t i = 0; i < p.n_pairs; ++i)
        kl_ptr[i] = static_cast<acc_t>(
            pair_kl(cross[i], run_sum[pair_t[i]], chunk_lse[pair_t[i]], chunk_lse[pair_s[i]]));
      // The same ATen selection as on the GPU (lm_head_losses_host.h).
      auto selected = select_topk(pair_kl_values, plan, p);
      kl = selected.first.template item<acc_t>();
      coef = selected.second;
      const acc_t* c = coef.data_ptr<acc_t>();
      if (grad_hidden) {
        // d KL / d h_s = sum over kept pairs i with student s of scale coef_i (E_s - X_i),
        // X_i = E_teacher without a soft-cap.
        const acc_t* e_ptr = expect.data_ptr<acc_t>();
        const acc_t* x_ptr = cross_expect ? x_expect.data_ptr<acc_t>() : nullptr;
        acc_t* g_ptr = grad_kl.data_ptr<acc_t>();
        const std::vector<int64_t>& st = h_plan.student;
        const acc_t scale = static_cast<acc_t>(p.logit_scale);
        for (int64_t i = 0; i < p.n_pairs; ++i) {
          if (c[i] == acc_t(0)) continue;
          const acc_t* es = e_ptr + pair_s[i] * Hd;
          const acc_t* et = x_ptr != nullptr ? x_ptr + i * Hd : e_ptr + pair_t[i] * Hd;
          acc_t* g = g_ptr + st[i] * Hd;
          for (int64_t d = 0; d < Hd; ++d) g[d] += kl_hidden_grad(es[d], et[d], scale * c[i]);
        }
      }
    }
    return ce_sum;
  }
};

ForwardOutputs forward_sweep(const Problem& p, const Plan& plan, const at::Tensor& hidden,
                             const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                             bool grad_hidden, at::ScalarType acc) {
  ForwardOutputs o;
  const HostPlan h_plan = host_plan(plan, p);
  AT_DISPATCH_FLOATING_TYPES(acc, "lm_head_losses_fwd_cpu", [&] {
    Forward<scalar_t> f{p, plan, h_plan, hidden, weight, bias, grad_hidden, acc};
    f.run();
    o = {at::scalar_tensor(f.ce, hidden.options().dtype(acc)),
         at::scalar_tensor(f.kl, hidden.options().dtype(acc)), f.grad_ce, f.grad_kl, f.lse,
         f.coef};
  });
  return o;
}

// d weight and d bias: one more sweep over the vocabulary for the CE rows and the kept pairs'
// rows only, with the saved lse, writing each vocabulary block of the gradients once.
template <typename acc_t>
void weight_grad_sweep(const Problem& p, const HostPlan& h_plan, const at::Tensor& hidden,
                       const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       const at::Tensor& coef_t, const at::Tensor& lse_t, acc_t g_ce, acc_t g_kl,
                       at::ScalarType acc, at::Tensor* grad_weight, at::Tensor* grad_bias) {
  // Each hidden row's target, and each pair's teacher and student rows of hidden.
  std::vector<int64_t> targets(p.n_rows, kIgnoreIndex), teachers(p.n_pairs);
  for (int64_t j = 0; j < p.n_logit_rows; ++j) targets[h_plan.rows[j]] = h_plan.row_targets[j];
  for (int64_t i = 0; i < p.n_pairs; ++i) teachers[i] = h_plan.rows[h_plan.pair_t[i]];
  const int64_t* tg = targets.data();
  const int64_t* te = teachers.data();
  const int64_t* st = h_plan.student.data();
  const acc_t* coef = coef_t.data_ptr<acc_t>();
  const acc_t* lse = lse_t.data_ptr<acc_t>();
  // Rows whose logits are needed, and the rows of the logit-gradient matrix D.
  std::vector<int64_t> logit_rows, local(p.n_rows, -1);
  auto add = [&](int64_t r) {
    if (local[r] < 0) {
      local[r] = static_cast<int64_t>(logit_rows.size());
      logit_rows.push_back(r);
    }
  };
  std::vector<int64_t> d_hidden_rows;  // hidden row multiplying each D row
  std::vector<int64_t> ce_rows, kept;
  for (int64_t r = 0; r < p.n_rows; ++r)
    if (tg[r] != kIgnoreIndex) ce_rows.push_back(r);
  for (int64_t i = 0; i < p.n_pairs; ++i)
    if (coef[i] != acc_t(0)) kept.push_back(i);
  for (int64_t r : ce_rows) { add(r); d_hidden_rows.push_back(r); }
  for (int64_t i : kept) { add(te[i]); add(st[i]); d_hidden_rows.push_back(st[i]); }
  const int64_t Q = static_cast<int64_t>(logit_rows.size());
  const int64_t n_ce = static_cast<int64_t>(ce_rows.size());
  const int64_t n_d = static_cast<int64_t>(d_hidden_rows.size());
  const int64_t V = p.vocab;
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
  const at::Tensor logit_hidden = hidden.index_select(0, long_tensor(logit_rows));
  const at::Tensor d_hidden = hidden.index_select(0, long_tensor(d_hidden_rows));
  const at::Tensor h = bf16_gemm ? cpu_gemm::a_operand(logit_hidden) : logit_hidden.to(acc).contiguous();
  const at::Tensor hd = bf16_gemm ? at::Tensor() : d_hidden.to(acc).contiguous();
  cpu_gemm::PackedB packed_logits, packed_hd;
  if (bf16_gemm && grad_weight) cpu_gemm::pack_into(d_hidden.contiguous(), &packed_hd);
  const int64_t Vb = vocab_block(std::max(Q, n_d), V);
  const at::Tensor s_buf = at::empty({Q * Vb}, opts), d_buf = at::empty({n_d * Vb}, opts);
  const at::Tensor gw_buf = bf16_gemm && grad_weight ? at::empty({Vb * p.hidden_dim}, opts) : at::Tensor();
  // The logit scale multiplies every logit gradient; the soft-cap's slope is that of the row
  // whose gradient it is (the CE row, or the pair's student).
  const acc_t scale = static_cast<acc_t>(p.logit_scale), cap = static_cast<acc_t>(p.logit_softcap);
  const acc_t ce_coef = p.n_targeted > 0 ? scale * g_ce / acc_t(p.n_targeted) : acc_t(0);
  for (int64_t v0 = 0; v0 < V; v0 += Vb) {
    const int64_t vb = std::min(Vb, V - v0);
    const at::Tensor S = front(s_buf, Q, vb), D = front(d_buf, n_d, vb);
    logits_block(S, h, weight, bias, v0, vb, bf16_gemm, &packed_logits, acc);
    transform_rows(S.data_ptr<acc_t>(), Q, vb, p);
    const acc_t* s_ptr = S.data_ptr<acc_t>();
    acc_t* d_ptr = D.data_ptr<acc_t>();
    at::parallel_for(0, n_d, 16, [&](int64_t jb, int64_t je) {
      for (int64_t j = jb; j < je; ++j) {
        acc_t* drow = d_ptr + j * vb;
        if (j < n_ce) {
          const int64_t r = ce_rows[j];
          const acc_t* s = s_ptr + local[r] * vb;
          const int64_t t = tg[r] - v0;
          for (int64_t v = 0; v < vb; ++v)
            drow[v] = ce_logit_grad(softmax_prob(s[v], lse[r]), v == t, ce_coef) *
                      softcap_slope(s[v], cap);
        } else {
          const int64_t i = kept[j - n_ce];
          const acc_t* ss = s_ptr + local[st[i]] * vb;
          const acc_t* sa = s_ptr + local[te[i]] * vb;
          const acc_t c = scale * g_kl * coef[i];
          for (int64_t v = 0; v < vb; ++v)
            drow[v] = kl_logit_grad(softmax_prob(ss[v], lse[st[i]]),
                                    softmax_prob(sa[v], lse[te[i]]), c) *
                      softcap_slope(ss[v], cap);
        }
      }
    });
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

void weight_grads(const Problem& p, const Plan& plan, const at::Tensor& hidden,
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& rows, const at::Tensor& row_targets, const at::Tensor& ce_rows,
    const at::Tensor& pair_rows, const at::Tensor& sample_pairs, const at::Tensor& sample_k,
    const at::Tensor& kept_slots, int64_t paired_rows, double logit_scale, double logit_softcap,
    bool grad_hidden) {
  const Plan plan{rows, row_targets, ce_rows, pair_rows, sample_pairs, sample_k, kept_slots,
                  paired_rows};
  return host_forward(at::kCPU, &forward_sweep, hidden, weight, bias, plan, logit_scale,
                      logit_softcap, grad_hidden);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_ce, const at::Tensor& grad_kl, const at::Tensor& hidden,
    const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& rows,
    const at::Tensor& row_targets, const at::Tensor& ce_rows, const at::Tensor& pair_rows,
    const at::Tensor& sample_pairs, const at::Tensor& sample_k, const at::Tensor& kept_slots,
    int64_t paired_rows, double logit_scale, double logit_softcap,
    const at::Tensor& grad_hidden_ce, const at::Tensor& grad_hidden_kl, const at::Tensor& lse,
    const at::Tensor& coef, bool grad_hidden, bool grad_weight, bool grad_bias) {
  const Plan plan{rows, row_targets, ce_rows, pair_rows, sample_pairs, sample_k, kept_slots,
                  paired_rows};
  return host_backward(at::kCPU, &weight_grads, grad_ce, grad_kl, hidden, weight, bias, plan,
                       logit_scale, logit_softcap, grad_hidden_ce, grad_hidden_kl, lse, coef,
                       grad_hidden, grad_weight, grad_bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(crystal_ext, CPU, m) {
  m.impl("lm_head_losses_fwd", &forward_cpu);
  m.impl("lm_head_losses_bwd", &backward_cpu);
}

}  // namespace lm_head
}  // namespace crystal_ext
