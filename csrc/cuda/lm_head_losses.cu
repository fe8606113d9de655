// CUDA kernel of the fused LM-head losses. Same algorithm as csrc/cpu/lm_head_losses.cpp
// (see its header comment and csrc/lm_head_losses.h): rows that need logits in row chunks,
// the vocabulary in blocks; per block the logits GEMM (ATen / cuBLAS on the current stream;
// bf16/fp16 inputs use the bf16/fp16 GEMM with float32 output, so the logits are never
// rounded to bf16), then our kernels for the model's logit transform, the online softmax
// statistics and the KL cross term,
// then the expectation GEMM O += P W_blk (for bf16/fp16 inputs on the half-precision weight
// block with float32 output, P split into a half-precision hi part and the remainder lo, so
// that P keeps about fp32 accuracy and the weight block is never copied to fp32). The per-row
// and per-pair arithmetic comes from the shared header.
//
// Override rows (csrc/lm_head_override.h): every block runs two small kernels that overwrite the
// override columns' logits with h . R_j and take their entries out of P, then O += P[:, ids] R;
// an id outside the block changes nothing, so the ids are never read on the host and the weight
// is only read.
//
// No value is read on the host: the rows, targets and pairs come from the caller's plan,
// already on the device (crystal_ext/ops/lm_head_plan.py), the per-sample top-k selection runs
// in ATen ops on the device (select_topk, lm_head_losses_host.h), and the weight sweep picks
// the kept pairs and their lse on the device too. So neither direction waits for the GPU.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "lm_head_losses.h"
#include "lm_head_losses_checks.h"
#include "lm_head_losses_host.h"
#include "lm_head_losses_tiling.h"
#include "lm_head_override.h"

namespace crystal_ext {
namespace lm_head {
namespace {

constexpr int kThreads = 256;
using cuda_tiling::kMaxChunkRows;
using cuda_tiling::vocab_block;

at::Tensor front(const at::Tensor& flat, int64_t rows, int64_t cols) {
  return flat.narrow(0, 0, rows * cols).view({rows, cols});
}

// ---- block reductions (kThreads threads) ----

template <typename T>
__device__ T warp_max(T x) {
  for (int o = 16; o > 0; o >>= 1) {
    const T y = __shfl_xor_sync(0xffffffffu, x, o);
    x = y > x ? y : x;
  }
  return x;
}

template <typename T>
__device__ T warp_sum(T x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Reduces x over the block; every thread gets the result. `shared` holds kThreads / 32 values.
template <typename T, bool kMax>
__device__ T block_reduce(T x, T* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  x = kMax ? warp_max(x) : warp_sum(x);
  __syncthreads();  // shared may still be read by a previous reduction
  if (lane == 0) shared[warp] = x;
  __syncthreads();
  T r = shared[0];
  for (int w = 1; w < kThreads / 32; ++w) r = kMax ? (shared[w] > r ? shared[w] : r) : r + shared[w];
  return r;
}

// One block per row of the chunk: bias, the model's logit transform (S is overwritten with the
// model's logits), online max / sum, P = exp(S - max) times the soft-cap's slope (what the
// expectation GEMM takes), target logit and the rescale of the running expectation row.
template <typename acc_t>
__global__ void row_block_kernel(acc_t* __restrict__ S, acc_t* __restrict__ P,
                                 const acc_t* __restrict__ bias, bool transformed, acc_t scale,
                                 acc_t cap, int64_t vb, int64_t v0,
                                 const int64_t* __restrict__ target, acc_t* __restrict__ run_max,
                                 acc_t* __restrict__ run_sum, acc_t* __restrict__ alpha,
                                 acc_t* __restrict__ target_logit, acc_t* __restrict__ expect,
                                 int64_t hidden_dim) {
  __shared__ acc_t shared[kThreads / 32];
  const int64_t j = blockIdx.x;
  acc_t* s = S + j * vb;
  acc_t* pr = P + j * vb;
  const acc_t old_max = run_max[j];
  acc_t m = old_max;
  for (int64_t v = threadIdx.x; v < vb; v += kThreads) {
    acc_t z = s[v];
    if (bias != nullptr) z += bias[v];
    if (transformed) z = model_logit(z, scale, cap);
    if (bias != nullptr || transformed) s[v] = z;
    m = z > m ? z : m;
  }
  m = block_reduce<acc_t, true>(m, shared);
  const acc_t shift = exp_shift(m);
  acc_t sum = acc_t(0);
  for (int64_t v = threadIdx.x; v < vb; v += kThreads) {
    const acc_t e = unnormalised_prob(s[v], shift);
    pr[v] = e * softcap_slope(s[v], cap);
    sum += e;
  }
  sum = block_reduce<acc_t, false>(sum, shared);
  const acc_t a = block_rescale(old_max, m);
  if (expect != nullptr && a != acc_t(1)) {
    acc_t* e = expect + j * hidden_dim;
    for (int64_t d = threadIdx.x; d < hidden_dim; d += kThreads) e[d] *= a;
  }
  if (threadIdx.x == 0) {
    run_sum[j] = run_sum[j] * a + sum;
    run_max[j] = m;
    alpha[j] = a;
    const int64_t t = target[j] - v0;
    if (t >= 0 && t < vb) target_logit[j] = s[t];
  }
}

// One block per pair: A_i = A_i * alpha_teacher + sum_v P_teacher (S_teacher - S_student), with
// P_teacher recomputed from the teacher's running max (the block's P holds slope-weighted
// values under a soft-cap). Under a soft-cap (Pc not null) also the pair's row of
// P_teacher * g_student for the cross expectation X_i (csrc/lm_head_losses.h).
template <typename acc_t>
__global__ void pair_cross_kernel(const acc_t* __restrict__ S, int64_t vb,
                                  const int64_t* __restrict__ pair_t,
                                  const int64_t* __restrict__ pair_s,
                                  const acc_t* __restrict__ run_max,
                                  const acc_t* __restrict__ alpha, acc_t cap,
                                  acc_t* __restrict__ cross, acc_t* __restrict__ Pc) {
  __shared__ acc_t shared[kThreads / 32];
  const int64_t i = blockIdx.x;
  const acc_t* st = S + pair_t[i] * vb;
  const acc_t* ss = S + pair_s[i] * vb;
  acc_t* pc = Pc != nullptr ? Pc + i * vb : nullptr;
  const acc_t t_max = exp_shift(run_max[pair_t[i]]);
  acc_t sum = acc_t(0);
  for (int64_t v = threadIdx.x; v < vb; v += kThreads) {
    const acc_t e = unnormalised_prob(st[v], t_max);
    sum += kl_cross_term(e, st[v], ss[v]);
    if (pc != nullptr) pc[v] = e * softcap_slope(ss[v], cap);
  }
  sum = block_reduce<acc_t, false>(sum, shared);
  if (threadIdx.x == 0) cross[i] = cross[i] * alpha[pair_t[i]] + sum;
}

// One block per row: lse, CE term, E = O / Z, d ce / d h for targeted rows. target_rows [R, Hd]
// holds each row's W_t (the override row for an override id: target_weight_rows).
template <typename acc_t>
__global__ void row_finish_kernel(const int64_t* __restrict__ rows,
                                  const int64_t* __restrict__ target,
                                  const acc_t* __restrict__ run_max,
                                  const acc_t* __restrict__ run_sum,
                                  const acc_t* __restrict__ target_logit, acc_t* __restrict__ lse,
                                  acc_t* __restrict__ ce_terms, acc_t* __restrict__ expect,
                                  const acc_t* __restrict__ target_rows, acc_t inv_n, acc_t cap,
                                  acc_t* __restrict__ grad_ce, int64_t hidden_dim) {
  const int64_t j = blockIdx.x;
  const acc_t l = lse_finish(run_max[j], run_sum[j]);
  const int64_t t = target[j];
  if (threadIdx.x == 0) {
    lse[rows[j]] = l;
    ce_terms[j] = t == kIgnoreIndex ? acc_t(0) : ce_row(l, target_logit[j]);
  }
  if (expect == nullptr) return;
  acc_t* e = expect + j * hidden_dim;
  const acc_t inv_z = acc_t(1) / run_sum[j];
  const acc_t slope = t == kIgnoreIndex ? acc_t(0) : softcap_slope(target_logit[j], cap);
  for (int64_t d = threadIdx.x; d < hidden_dim; d += kThreads) {
    const acc_t ed = e[d] * inv_z;
    e[d] = ed;
    if (t != kIgnoreIndex)
      grad_ce[rows[j] * hidden_dim + d] =
          ce_hidden_grad(ed, slope * target_rows[j * hidden_dim + d], inv_n);
  }
}

template <typename acc_t>
__global__ void pair_kl_kernel(const acc_t* __restrict__ cross, const int64_t* __restrict__ pair_t,
                               const int64_t* __restrict__ pair_s, const int64_t* __restrict__ rows,
                               const acc_t* __restrict__ run_sum, const acc_t* __restrict__ lse,
                               acc_t* __restrict__ out, int64_t n_pairs) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n_pairs) return;
  const int64_t a = pair_t[i], s = pair_s[i];
  out[i] = pair_kl(cross[i], run_sum[a], lse[rows[a]], lse[rows[s]]);
}

// One block per pair: d kl / d h_student += scale coef_i (E_s - X_i), X_i the pair's cross
// expectation under a soft-cap (cross_expect, [M, Hd]) and E_teacher without one; pairs may
// share a student row, hence the atomics. rows maps local positions to rows of hidden.
template <typename acc_t>
__global__ void kl_grad_kernel(const acc_t* __restrict__ expect,
                               const acc_t* __restrict__ cross_expect,
                               const int64_t* __restrict__ pair_t,
                               const int64_t* __restrict__ pair_s,
                               const int64_t* __restrict__ rows,
                               const acc_t* __restrict__ coef, acc_t scale,
                               acc_t* __restrict__ grad_kl, int64_t hidden_dim) {
  const int64_t i = blockIdx.x;
  const acc_t c = scale * coef[i];
  if (c == acc_t(0)) return;
  const acc_t* es = expect + pair_s[i] * hidden_dim;
  const acc_t* et = cross_expect != nullptr ? cross_expect + i * hidden_dim
                                            : expect + pair_t[i] * hidden_dim;
  acc_t* g = grad_kl + rows[pair_s[i]] * hidden_dim;
  for (int64_t d = threadIdx.x; d < hidden_dim; d += kThreads)
    atomicAdd(g + d, kl_hidden_grad(es[d], et[d], c));
}

// Logit gradients of one vocabulary block for the weight / bias sweep: rows [0, n_ce) are CE
// rows, the rest kept pairs. S holds the head's raw output; the model's transform is applied
// here, and each gradient row is times the logit scale and its own row's soft-cap slope.
template <typename acc_t>
__global__ void logit_grad_kernel(const acc_t* __restrict__ S, int64_t vb, int64_t v0,
                                  const acc_t* __restrict__ bias, acc_t scale, acc_t cap,
                                  int64_t n_ce,
                                  const int64_t* __restrict__ d_a,  // CE: local row; KL: student
                                  const int64_t* __restrict__ d_b,  // CE: target; KL: teacher
                                  const acc_t* __restrict__ d_lse_a,
                                  const acc_t* __restrict__ d_lse_b,
                                  const acc_t* __restrict__ d_coef,
                                  const acc_t* __restrict__ grad_ce,
                                  const acc_t* __restrict__ grad_kl, acc_t* __restrict__ D) {
  const int64_t j = blockIdx.x;
  acc_t* drow = D + j * vb;
  const acc_t* sa = S + d_a[j] * vb;
  if (j < n_ce) {
    const acc_t c = scale * grad_ce[0] * d_coef[j];
    const int64_t t = d_b[j] - v0;
    for (int64_t v = threadIdx.x; v < vb; v += kThreads) {
      const acc_t z = model_logit(sa[v] + (bias ? bias[v] : acc_t(0)), scale, cap);
      drow[v] = ce_logit_grad(softmax_prob(z, d_lse_a[j]), v == t, c) * softcap_slope(z, cap);
    }
  } else {
    const acc_t c = scale * grad_kl[0] * d_coef[j];
    const acc_t* sb = S + d_b[j] * vb;
    for (int64_t v = threadIdx.x; v < vb; v += kThreads) {
      const acc_t bv = bias ? bias[v] : acc_t(0);
      const acc_t zs = model_logit(sa[v] + bv, scale, cap), zt = model_logit(sb[v] + bv, scale, cap);
      drow[v] = kl_logit_grad(softmax_prob(zs, d_lse_a[j]), softmax_prob(zt, d_lse_b[j]), c) *
                softcap_slope(zs, cap);
    }
  }
}

// Override columns of a block (csrc/lm_head_override.h), one thread per (row, override id); an
// id outside [v0, v0 + vb) does nothing. Writes the head's output h . rows[j] (raw: the bias and
// the model's transform are applied with the block's other logits) over the weight's.
template <typename acc_t>
__global__ void write_override_logits_kernel(acc_t* __restrict__ S, int64_t rows, int64_t vb,
                                             int64_t v0, const int64_t* __restrict__ ids,
                                             int64_t n, const acc_t* __restrict__ ov_logits) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e >= rows * n) return;
  const int64_t j = e / n, k = e % n;
  const int64_t col = block_column(ids[k], v0, vb);
  if (col >= 0) S[j * vb + col] = ov_logits[e];
}

// Takes the override columns out of P [rows, vb] (after the row statistics filled it): taken
// [rows, n] gets each entry (0 for an id outside the block), P a zero there, so the weight's
// expectation GEMM skips those columns and taken @ override_rows adds them.
template <typename acc_t>
__global__ void take_override_columns_kernel(acc_t* __restrict__ P, int64_t rows, int64_t vb,
                                             int64_t v0, const int64_t* __restrict__ ids,
                                             int64_t n, acc_t* __restrict__ taken) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e >= rows * n) return;
  const int64_t j = e / n, k = e % n;
  const int64_t col = block_column(ids[k], v0, vb);
  acc_t value = acc_t(0);
  if (col >= 0) {
    value = P[j * vb + col];
    P[j * vb + col] = acc_t(0);
  }
  taken[e] = value;
}

int64_t grid_for(int64_t n, int64_t threads) { return (n + threads - 1) / threads; }

// Logits of rows h [R, Hd] (input dtype) against weight rows [v0, v0 + vb), in acc_t.
void block_logits(at::Tensor& S, const at::Tensor& h, const at::Tensor& w_blk, at::ScalarType acc) {
  if (h.scalar_type() == at::kHalf || h.scalar_type() == at::kBFloat16) {
    S.copy_(at::mm(h, w_blk.t(), acc));  // fp32 output of the half-precision GEMM
  } else {
    at::mm_out(S, h, w_blk.t());
  }
}

// Expectation GEMM O += P W_blk. For bf16/fp16 inputs P (float32, in [0, 1]) is split into
// hi = P rounded to the input type and lo = (P - hi) rounded, and both products run on the
// half-precision weight block with float32 output: P keeps about fp32 accuracy (the paired
// rows' KL gradient E_s - E_teacher is a difference of nearly equal expectations) and the
// weight block is never converted to fp32.
void expectation_update(at::Tensor& expect, const at::Tensor& P, const at::Tensor& w_blk,
                        at::ScalarType acc) {
  const auto half_type = w_blk.scalar_type();
  if (half_type == at::kHalf || half_type == at::kBFloat16) {
    const at::Tensor p_hi = P.to(half_type);
    const at::Tensor p_lo = (P - p_hi.to(acc)).to(half_type);
    expect.add_(at::mm(p_hi, w_blk, acc));
    expect.add_(at::mm(p_lo, w_blk, acc));
  } else {
    expect.addmm_(P, w_blk);
  }
}

// One row chunk of the forward sweep: its rows, buffers and running statistics, on the device.
struct ChunkCuda {
  int64_t begin = 0, R = 0, Vb = 0;
  bool has_pairs = false;  // pairs live in the first chunk (their rows come first in p.rows)
  // Under a soft-cap: each pair's cross expectation X_i (unnormalised, rescaled with the
  // teacher's running max) and its block of P_teacher * g_student.
  bool cross_expect = false;
  at::Tensor rows, target, h, s_buf, p_buf, expect, run_max, run_sum, alpha, target_logit;
  // Override rows: the override columns' raw logits h . rows[j] [R, n] and, per block, their
  // entries taken out of P [R, n] and out of the pairs' cross block [M, n].
  at::Tensor ov_logits, ov_p, ov_pc;
  // Local positions of each pair's rows (the first chunk starts at position 0).
  at::Tensor cross, pair_t, pair_s, x_expect, pc_buf;
};

template <typename scalar_t, typename acc_t>
struct ForwardCuda {
  const Problem& p;
  const LmHeadPlan& plan;
  const at::Tensor& hidden;
  const at::Tensor& weight;  // only read
  const c10::optional<at::Tensor>& bias;
  const Override& ov;
  bool grad_hidden;
  at::ScalarType acc;
  at::Tensor lse, coef, grad_ce, grad_kl, ce_terms, kl;
  at::Tensor ov_rows;  // the override rows in acc_t [n, Hd]

  void run() {
    const auto opts = hidden.options().dtype(acc);
    lse = at::zeros({p.n_rows}, opts);
    coef = at::zeros({p.n_pairs}, opts);
    kl = at::zeros({}, opts);
    grad_ce = grad_hidden ? at::zeros({p.n_rows, p.hidden_dim}, opts) : at::empty({0}, opts);
    grad_kl = grad_hidden ? at::zeros({p.n_rows, p.hidden_dim}, opts) : at::empty({0}, opts);
    ce_terms = at::zeros({p.n_logit_rows}, opts);
    if (ov.given()) ov_rows = ov.rows.to(acc).contiguous();
    for (const auto& chunk : row_chunks(p, kMaxChunkRows)) run_chunk(chunk.first, chunk.second);
  }

  void run_chunk(int64_t begin, int64_t end) {
    ChunkCuda c = start_chunk(begin, end);
    for (int64_t v0 = 0; v0 < p.vocab; v0 += c.Vb) sweep_block(c, v0);
    finish_rows(c);
    if (c.has_pairs) finish_pairs(c);
  }

  ChunkCuda start_chunk(int64_t begin, int64_t end) {
    ChunkCuda c;
    const int64_t R = end - begin, Hd = p.hidden_dim;
    const auto opts = hidden.options().dtype(acc);
    c.begin = begin;
    c.R = R;
    c.rows = plan.rows.narrow(0, begin, R).contiguous();
    c.target = plan.row_targets.narrow(0, begin, R).contiguous();
    const bool half = hidden.scalar_type() == at::kHalf || hidden.scalar_type() == at::kBFloat16;
    c.h = half ? hidden.index_select(0, c.rows).contiguous()
               : hidden.index_select(0, c.rows).to(acc).contiguous();
    c.Vb = vocab_block(R, p.vocab, Hd);
    if (ov.given() && ov.size() > 0) {
      c.ov_logits = override_raw_logits(half ? c.h.to(acc) : c.h, ov, acc);
      c.ov_p = at::empty({R, ov.size()}, opts);
    }
    c.s_buf = at::empty({R * c.Vb}, opts);
    c.p_buf = at::empty({R * c.Vb}, opts);
    if (grad_hidden) c.expect = at::zeros({R, Hd}, opts);
    c.run_max = at::full({R}, -std::numeric_limits<double>::infinity(), opts);
    c.run_sum = at::zeros({R}, opts);
    c.alpha = at::zeros({R}, opts);
    c.target_logit = at::zeros({R}, opts);
    c.has_pairs = begin == 0 && p.n_pairs > 0;
    if (c.has_pairs) {
      c.pair_t = plan.pair_rows.select(0, 0).contiguous();
      c.pair_s = plan.pair_rows.select(0, 1).contiguous();
      c.cross = at::zeros({p.n_pairs}, opts);
    }
    c.cross_expect = c.has_pairs && grad_hidden && p.capped();
    if (c.cross_expect) {
      c.x_expect = at::zeros({p.n_pairs, Hd}, opts);
      c.pc_buf = at::empty({p.n_pairs * c.Vb}, opts);
      if (c.ov_logits.defined()) c.ov_pc = at::empty({p.n_pairs, ov.size()}, opts);
    }
    return c;
  }

  // Override ids may lie in any block: no host read says which, so every block runs the two
  // small kernels, and an id outside it changes nothing.
  void write_override_logits(ChunkCuda& c, at::Tensor& S, int64_t v0, int64_t vb) {
    const int64_t n = ov.size(), threads = kThreads;
    write_override_logits_kernel<acc_t>
        <<<grid_for(c.R * n, threads), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            S.data_ptr<acc_t>(), c.R, vb, v0, ov.ids.data_ptr<int64_t>(), n,
            c.ov_logits.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  void take_override_columns(at::Tensor& P, int64_t rows, int64_t v0, int64_t vb, at::Tensor& taken) {
    const int64_t n = ov.size(), threads = kThreads;
    take_override_columns_kernel<acc_t>
        <<<grid_for(rows * n, threads), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            P.data_ptr<acc_t>(), rows, vb, v0, ov.ids.data_ptr<int64_t>(), n,
            taken.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // One vocabulary block [v0, v0 + Vb): the logits GEMM (the override columns' logits written
  // over the weight's), the rows' online statistics, the pairs' cross terms, the expectation
  // GEMMs (the override columns' entries of P applied to their rows, not the weight's).
  void sweep_block(ChunkCuda& c, int64_t v0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const acc_t scale = static_cast<acc_t>(p.logit_scale), cap = static_cast<acc_t>(p.logit_softcap);
    const int64_t vb = std::min(c.Vb, p.vocab - v0);
    const at::Tensor w_blk = weight.narrow(0, v0, vb);
    at::Tensor S = front(c.s_buf, c.R, vb), P = front(c.p_buf, c.R, vb);
    block_logits(S, c.h, w_blk, acc);
    const bool overrides = c.ov_logits.defined();
    if (overrides) write_override_logits(c, S, v0, vb);
    at::Tensor b_blk;
    if (bias.has_value() && bias->defined()) b_blk = bias->narrow(0, v0, vb).to(acc).contiguous();
    row_block_kernel<acc_t><<<c.R, kThreads, 0, stream>>>(
        S.data_ptr<acc_t>(), P.data_ptr<acc_t>(), b_blk.defined() ? b_blk.data_ptr<acc_t>() : nullptr,
        p.transformed(), scale, cap, vb, v0, c.target.data_ptr<int64_t>(), c.run_max.data_ptr<acc_t>(),
        c.run_sum.data_ptr<acc_t>(), c.alpha.data_ptr<acc_t>(), c.target_logit.data_ptr<acc_t>(),
        grad_hidden ? c.expect.data_ptr<acc_t>() : nullptr, p.hidden_dim);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (c.has_pairs) {
      pair_cross_kernel<acc_t><<<p.n_pairs, kThreads, 0, stream>>>(
          S.data_ptr<acc_t>(), vb, c.pair_t.data_ptr<int64_t>(), c.pair_s.data_ptr<int64_t>(),
          c.run_max.data_ptr<acc_t>(), c.alpha.data_ptr<acc_t>(), cap, c.cross.data_ptr<acc_t>(),
          c.cross_expect ? c.pc_buf.data_ptr<acc_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (grad_hidden) {
      if (overrides) take_override_columns(P, c.R, v0, vb, c.ov_p);
      expectation_update(c.expect, P, w_blk, acc);
      if (overrides) c.expect.addmm_(c.ov_p, ov_rows);
    }
    if (c.cross_expect) {
      at::Tensor Pc = front(c.pc_buf, p.n_pairs, vb);
      c.x_expect.mul_(c.alpha.index_select(0, c.pair_t).unsqueeze(1));
      if (overrides) take_override_columns(Pc, p.n_pairs, v0, vb, c.ov_pc);
      expectation_update(c.x_expect, Pc, w_blk, acc);
      if (overrides) c.x_expect.addmm_(c.ov_pc, ov_rows);
    }
  }

  // lse, CE terms, E = O / Z and d ce / d hidden of the chunk's rows (and X / Z_teacher).
  void finish_rows(ChunkCuda& c) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    // The logit scale multiplies every hidden gradient once: in inv_n and in kl_grad_kernel.
    const acc_t inv_n =
        p.n_targeted > 0 ? static_cast<acc_t>(p.logit_scale) / acc_t(p.n_targeted) : acc_t(0);
    const at::Tensor target_rows =
        grad_hidden ? target_weight_rows(weight, c.target, ov, acc) : at::empty({0}, lse.options());
    row_finish_kernel<acc_t><<<c.R, kThreads, 0, stream>>>(
        c.rows.data_ptr<int64_t>(), c.target.data_ptr<int64_t>(), c.run_max.data_ptr<acc_t>(),
        c.run_sum.data_ptr<acc_t>(), c.target_logit.data_ptr<acc_t>(), lse.data_ptr<acc_t>(),
        ce_terms.data_ptr<acc_t>() + c.begin, grad_hidden ? c.expect.data_ptr<acc_t>() : nullptr,
        target_rows.data_ptr<acc_t>(), inv_n, static_cast<acc_t>(p.logit_softcap),
        grad_hidden ? grad_ce.data_ptr<acc_t>() : nullptr, p.hidden_dim);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (c.cross_expect) c.x_expect.div_(c.run_sum.index_select(0, c.pair_t).unsqueeze(1));
  }

  // The pairs' KLs, the top-k selection (lm_head_losses_host.h) and d kl / d hidden.
  void finish_pairs(ChunkCuda& c) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    at::Tensor pair_kl_values = at::empty({p.n_pairs}, hidden.options().dtype(acc));
    const int threads = 128;
    pair_kl_kernel<acc_t><<<(p.n_pairs + threads - 1) / threads, threads, 0, stream>>>(
        c.cross.data_ptr<acc_t>(), c.pair_t.data_ptr<int64_t>(), c.pair_s.data_ptr<int64_t>(),
        c.rows.data_ptr<int64_t>(), c.run_sum.data_ptr<acc_t>(), lse.data_ptr<acc_t>(),
        pair_kl_values.data_ptr<acc_t>(), p.n_pairs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    auto selected = select_topk(pair_kl_values, plan, p);
    kl = selected.first;
    coef = selected.second;
    if (!grad_hidden) return;
    kl_grad_kernel<acc_t><<<p.n_pairs, kThreads, 0, stream>>>(
        c.expect.data_ptr<acc_t>(), c.cross_expect ? c.x_expect.data_ptr<acc_t>() : nullptr,
        c.pair_t.data_ptr<int64_t>(), c.pair_s.data_ptr<int64_t>(), c.rows.data_ptr<int64_t>(),
        coef.data_ptr<acc_t>(), static_cast<acc_t>(p.logit_scale), grad_kl.data_ptr<acc_t>(),
        p.hidden_dim);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

ForwardOutputs forward_sweep(const Problem& p, const LmHeadPlan& plan, const at::Tensor& hidden,
                             const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                             const Override& ov, bool grad_hidden, at::ScalarType acc) {
  ForwardOutputs o;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(),
                                  "lm_head_losses_fwd_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    ForwardCuda<scalar_t, acc_t> f{p, plan, hidden, weight, bias, ov, grad_hidden, acc};
    f.run();
    o.ce = p.n_targeted > 0 ? f.ce_terms.sum().div_(static_cast<double>(p.n_targeted))
                            : at::zeros({}, hidden.options().dtype(acc));
    o.kl = f.kl;
    o.lse = f.lse;
    o.coef = f.coef;
    o.grad_ce = f.grad_ce;
    o.grad_kl = f.grad_kl;
  });
  return o;
}

// d weight and d bias: one more sweep over the vocabulary for the CE rows and the kept pairs'
// rows only, with the saved lse. Which pairs are kept is known on the device only (coef); how
// many (K) is known from the plan's shape, so the kept pairs are the K pairs with a nonzero
// coefficient, found by a top-k on the device. Logit rows: the T CE rows, then the K kept
// students, then the K kept teachers (a row can appear twice: no host read to deduplicate).
template <typename acc_t>
void weight_grad_sweep_cuda(const Problem& p, const LmHeadPlan& plan, const at::Tensor& hidden,
                            const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                            const at::Tensor& coef, const at::Tensor& lse, const at::Tensor& g_ce,
                            const at::Tensor& g_kl, at::ScalarType acc, at::Tensor* grad_weight,
                            at::Tensor* grad_bias) {
  const int64_t T = p.n_targeted, K = p.n_pairs > 0 ? p.n_kept : 0, V = p.vocab;
  const int64_t n_d = T + K, Q = T + 2 * K;
  const auto opts = hidden.options().dtype(acc);
  if (n_d == 0) {  // nothing targeted and no pairs: zero gradients
    if (grad_weight) *grad_weight = at::zeros_like(weight);
    if (grad_bias) *grad_bias = at::zeros({V}, weight.options());
    return;
  }
  // Every vocabulary block of the gradients is written exactly once below.
  if (grad_weight) *grad_weight = at::empty_like(weight);
  if (grad_bias) *grad_bias = at::empty({V}, opts);
  const auto long_opts = hidden.options().dtype(at::kLong);
  const at::Tensor ce_hidden = plan.rows.index_select(0, plan.ce_rows);  // [T] rows of hidden
  at::Tensor kept = at::empty({0}, long_opts), student = kept, teacher = kept;
  if (K > 0) {
    kept = std::get<1>(at::topk(coef, K));
    student = plan.rows.index_select(0, plan.pair_rows.select(0, 1).index_select(0, kept));
    teacher = plan.rows.index_select(0, plan.pair_rows.select(0, 0).index_select(0, kept));
  }
  const at::Tensor logit_rows = at::cat({ce_hidden, student, teacher});  // [Q]
  const at::Tensor d_hidden_rows = at::cat({ce_hidden, student});        // [n_d]
  // Per D row: a = the S row of its (student or CE) logits, b = the target (CE) or the S row
  // of the teacher (KL), their lse, and the coefficient.
  const at::Tensor positions = at::arange(Q, long_opts);
  const at::Tensor d_a = positions.narrow(0, 0, n_d).contiguous();
  const at::Tensor d_b = at::cat({plan.row_targets.index_select(0, plan.ce_rows),
                                  positions.narrow(0, T + K, K)});
  const at::Tensor d_lse_a = lse.index_select(0, d_hidden_rows).contiguous();
  const at::Tensor d_lse_b = at::cat({at::zeros({T}, opts), lse.index_select(0, teacher)});
  const at::Tensor d_coef =
      at::cat({at::full({T}, T > 0 ? 1.0 / static_cast<double>(T) : 0.0, opts),
               coef.index_select(0, kept)});
  const bool half = hidden.scalar_type() == at::kHalf || hidden.scalar_type() == at::kBFloat16;
  const at::Tensor h = half ? hidden.index_select(0, logit_rows).contiguous()
                            : hidden.index_select(0, logit_rows).to(acc).contiguous();
  const at::Tensor hd = hidden.index_select(0, d_hidden_rows).to(acc).contiguous();
  // The upstream gradients may arrive as CPU scalars in a direct op call: the kernels read them.
  const at::Tensor gce = g_ce.to(hidden.device(), acc).contiguous(),
                   gkl = g_kl.to(hidden.device(), acc).contiguous();
  const int64_t Vb = vocab_block(std::max(Q, n_d), V, hidden.size(1));
  const at::Tensor s_buf = at::empty({Q * Vb}, opts), d_buf = at::empty({n_d * Vb}, opts);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t v0 = 0; v0 < V; v0 += Vb) {
    const int64_t vb = std::min(Vb, V - v0);
    const at::Tensor w_blk = weight.narrow(0, v0, vb);
    at::Tensor S = front(s_buf, Q, vb), D = front(d_buf, n_d, vb);
    block_logits(S, h, w_blk, acc);
    at::Tensor b_blk;
    if (bias.has_value() && bias->defined()) b_blk = bias->narrow(0, v0, vb).to(acc).contiguous();
    logit_grad_kernel<acc_t><<<n_d, kThreads, 0, stream>>>(
        S.data_ptr<acc_t>(), vb, v0, b_blk.defined() ? b_blk.data_ptr<acc_t>() : nullptr,
        static_cast<acc_t>(p.logit_scale), static_cast<acc_t>(p.logit_softcap), T,
        d_a.data_ptr<int64_t>(), d_b.data_ptr<int64_t>(), d_lse_a.data_ptr<acc_t>(),
        d_lse_b.data_ptr<acc_t>(), d_coef.data_ptr<acc_t>(), gce.data_ptr<acc_t>(),
        gkl.data_ptr<acc_t>(), D.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (grad_weight) grad_weight->narrow(0, v0, vb).copy_(at::mm(D.t(), hd));
    if (grad_bias) grad_bias->narrow(0, v0, vb).copy_(D.sum(0));
  }
  if (grad_bias) *grad_bias = grad_bias->to(weight.scalar_type());
}

void weight_grads(const Problem& p, const LmHeadPlan& plan, const at::Tensor& hidden,
                  const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                  const at::Tensor& coef, const at::Tensor& lse, const at::Tensor& grad_ce,
                  const at::Tensor& grad_kl, at::ScalarType acc, at::Tensor* grad_weight,
                  at::Tensor* grad_bias) {
  AT_DISPATCH_FLOATING_TYPES(acc, "lm_head_losses_bwd_cuda", [&] {
    weight_grad_sweep_cuda<scalar_t>(p, plan, hidden, weight, bias, coef, lse, grad_ce, grad_kl,
                                     acc, grad_weight, grad_bias);
  });
}

// The CUDA kernels, for the shared entry points (lm_head_losses_host.h). Each call runs on
// hidden's device, its fp32 GEMMs in full fp32 whatever the global TF32 flag says
// (Fp32GemmPrecisionGuard).
struct CudaDevice {
  static constexpr at::DeviceType kType = at::kCUDA;
  struct Scope {
    explicit Scope(const at::Tensor& hidden) : device(hidden.device()) {}
    const c10::cuda::CUDAGuard device;
    const Fp32GemmPrecisionGuard fp32_gemms;
  };
  static constexpr ForwardKernel forward = &forward_sweep;
  static constexpr WeightGradKernel weight_grads = &lm_head::weight_grads;
};

}  // namespace

TORCH_LIBRARY_IMPL(crystal_ext, CUDA, m) { register_kernels<CudaDevice>(m); }

}  // namespace lm_head
}  // namespace crystal_ext
