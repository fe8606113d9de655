// CUDA kernel of the fused attention-alignment loss.
//
// The aligned rows (E for path 0, F for path 1) of every sample are gathered into a padded
// [B, H, maxE, d] block and the keys each path may see into [B, Hkv, maxK, d]; one batched
// GEMM per path (through ATen/cuBLAS, in fp32, grouped heads by reshaping q, never repeating
// k) gives the scores [B, H, maxE, maxK]. The per-row arithmetic (log-sum-exp, latent
// probabilities, KL, softmax backward) runs in the small kernels below and comes from
// csrc/attention_alignment_loss.h, the same code the CPU kernel runs.
// Work and memory are O(B * H * |E| * L); nothing of size L x L exists.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "attention_alignment_loss.h"
#include "attention_alignment_loss_checks.h"
#include "common_host.h"

namespace crystal_ext {
namespace attention_alignment {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kThreadsPerBlock = 256;

int64_t blocks_for(int64_t n, int64_t per_block) { return (n + per_block - 1) / per_block; }

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1)
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__device__ __forceinline__ void warp_lse_merge(T& m, T& z) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    const T m2 = __shfl_xor_sync(0xffffffffu, m, offset);
    const T z2 = __shfl_xor_sync(0xffffffffu, z, offset);
    lse_merge(m, z, m2, z2);
  }
}

// One warp per (sample b, head h, aligned row i) of `path`: the row's log-sum-exp over its
// visible prefix of the path's keys, stored at lse[b, h, packed row].
template <typename acc_t>
__global__ void row_lse_kernel(const acc_t* __restrict__ scores, const int64_t* __restrict__ layout,
                               int path, int64_t batch, int64_t heads, int64_t max_answer,
                               int64_t max_keys, int64_t length, acc_t* __restrict__ lse) {
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (warp >= batch * heads * max_answer) return;  // uniform across the warp
  const int64_t i = warp % max_answer;
  const int64_t h = (warp / max_answer) % heads;
  const int64_t b = warp / (max_answer * heads);
  const Segments seg = load_segments(layout + b * 12);
  if (i >= seg.n_answer()) return;
  acc_t m, z;
  lse_init(m, z);
  row_lse_partial(scores + warp * max_keys, visible_key_count(seg, path, i), lane, kWarpSize, m,
                  z);
  warp_lse_merge(m, z);
  if (lane == 0) lse[(b * heads + h) * length + path_row(seg, path, i)] = lse_finish(m, z);
}

// One thread per (b, h, i, latent c): prob[b, h, i, c] = p of latent key c (0 on padding).
// With `latent_keys_only` the score rows hold the latent keys only (offset 0); otherwise they
// hold the path's whole key list and the latent keys start at path_latent_offset.
template <typename acc_t>
__global__ void latent_prob_kernel(const acc_t* __restrict__ scores,
                                   const int64_t* __restrict__ layout, int path,
                                   bool latent_keys_only, int64_t batch, int64_t heads,
                                   int64_t max_answer, int64_t max_keys, int64_t max_latent,
                                   int64_t length, const acc_t* __restrict__ lse,
                                   acc_t* __restrict__ prob) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= batch * heads * max_answer * max_latent) return;
  const int64_t c = idx % max_latent;
  const int64_t row = idx / max_latent;  // (b, h, i) flattened
  const int64_t i = row % max_answer;
  const int64_t h = (row / max_answer) % heads;
  const int64_t b = row / (max_answer * heads);
  const Segments seg = load_segments(layout + b * 12);
  if (i >= seg.n_answer() || c >= seg.n_latent()) {
    prob[idx] = acc_t(0);
    return;
  }
  const int64_t offset = latent_keys_only ? 0 : path_latent_offset(seg, path);
  const acc_t row_lse = lse[(b * heads + h) * length + path_row(seg, path, i)];
  prob[idx] = key_probability(scores[row * max_keys + offset + c], row_lse);
}

// One thread per (b, pair i): weighted KL of the pair (0 on padding); the loss is their sum.
template <typename acc_t>
__global__ void pair_kl_kernel(const acc_t* __restrict__ teacher_mass,
                               const acc_t* __restrict__ student_mass,
                               const int64_t* __restrict__ layout, int64_t batch,
                               int64_t max_answer, int64_t max_latent, acc_t* __restrict__ out) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= batch * max_answer) return;
  const int64_t i = idx % max_answer, b = idx / max_answer;
  const Segments seg = load_segments(layout + b * 12);
  if (i >= seg.n_answer()) {
    out[idx] = acc_t(0);
    return;
  }
  const acc_t kl = pair_kl(teacher_mass + idx * max_latent, student_mass + idx * max_latent,
                           seg.n_latent());
  out[idx] = kl / acc_t(seg.n_answer() * batch);
}

// One thread per (b, pair i): dLoss/dp of each latent key of the student row, per head.
template <typename acc_t>
__global__ void pair_kl_grad_kernel(const acc_t* __restrict__ teacher_mass,
                                    const acc_t* __restrict__ student_mass,
                                    const int64_t* __restrict__ layout,
                                    const acc_t* __restrict__ grad_loss, int64_t batch,
                                    int64_t heads, int64_t max_answer, int64_t max_latent,
                                    acc_t* __restrict__ grad_prob) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= batch * max_answer) return;
  const int64_t i = idx % max_answer, b = idx / max_answer;
  const Segments seg = load_segments(layout + b * 12);
  if (i >= seg.n_answer()) return;  // grad_prob is zero-initialised
  const acc_t coef = grad_loss[0] / acc_t(batch * seg.n_answer() * heads);
  pair_kl_grad(teacher_mass + idx * max_latent, student_mass + idx * max_latent, seg.n_latent(),
               coef, grad_prob + idx * max_latent);
}

// One warp per (b, h, student row i): overwrite the row's scores with dLoss/d(q.k).
template <typename acc_t>
__global__ void score_grad_kernel(acc_t* __restrict__ scores, const int64_t* __restrict__ layout,
                                  const acc_t* __restrict__ lse,
                                  const acc_t* __restrict__ grad_prob, acc_t scale,
                                  int64_t batch, int64_t heads, int64_t max_answer,
                                  int64_t max_keys, int64_t max_latent, int64_t length) {
  const int path = 1;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (warp >= batch * heads * max_answer) return;
  const int64_t i = warp % max_answer;
  const int64_t h = (warp / max_answer) % heads;
  const int64_t b = warp / (max_answer * heads);
  const Segments seg = load_segments(layout + b * 12);
  acc_t* row = scores + warp * max_keys;
  if (i >= seg.n_answer()) {  // padding rows must contribute nothing to dq and dk
    for (int64_t t = lane; t < max_keys; t += kWarpSize) row[t] = acc_t(0);
    return;
  }
  const acc_t row_lse = lse[(b * heads + h) * length + path_row(seg, path, i)];
  const acc_t* gp = grad_prob + (b * max_answer + i) * max_latent;
  const int64_t offset = path_latent_offset(seg, path);
  const int64_t n_latent = seg.n_latent();
  acc_t delta = acc_t(0);
  for (int64_t c = lane; c < n_latent; c += kWarpSize)
    delta += key_probability(row[offset + c], row_lse) * gp[c];
  delta = warp_sum(delta);  // every lane has read its latent scores before any write below
  __syncwarp();            // ... and say so explicitly
  const int64_t visible = visible_key_count(seg, path, i);
  for (int64_t t = lane; t < max_keys; t += kWarpSize) {
    if (t >= visible) {
      row[t] = acc_t(0);
      continue;
    }
    const int64_t c = t - offset;
    const acc_t g = (c >= 0 && c < n_latent) ? gp[c] : acc_t(0);
    row[t] = score_grad(key_probability(row[t], row_lse), g, delta, scale);
  }
}

// x [B, heads, L, d] gathered along L at idx [B, n] -> [B, heads, n, d] in `acc`.
// x may have any strides (q is usually a transposed view): gather reads it in place.
at::Tensor gather_positions(const at::Tensor& x, const at::Tensor& idx, at::ScalarType acc) {
  const auto index = idx.reshape({idx.size(0), 1, idx.size(1), 1})
                         .expand({x.size(0), x.size(1), idx.size(1), x.size(3)});
  return x.gather(2, index).to(acc);
}

struct Gathered {
  at::Tensor queries;  // [B, Hkv, g * maxE, d]
  at::Tensor keys;     // [B, Hkv, maxK, d]
  at::Tensor scores;   // [B, Hkv, g * maxE, maxK] == [B, H, maxE, maxK]
};

Gathered path_scores(const at::Tensor& q, const at::Tensor& k, const at::Tensor& rows,
                     const at::Tensor& keys, double scale, at::ScalarType acc) {
  Gathered g;
  const int64_t batch = q.size(0), kv_heads = k.size(1);
  g.queries = gather_positions(q, rows, acc).view({batch, kv_heads, -1, q.size(3)});
  g.keys = gather_positions(k, keys, acc);
  g.scores = at::matmul(g.queries, g.keys.transpose(-1, -2)).mul_(scale).contiguous();
  return g;
}

template <typename acc_t>
at::Tensor latent_mass(const at::Tensor& scores, const at::Tensor& layout, int path,
                       bool latent_keys_only, const Problem& p, const at::Tensor& lse) {
  at::Tensor prob = at::empty({p.batch, p.heads, p.max_answer, p.max_latent}, lse.options());
  const int64_t n = prob.numel();
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (n > 0) {
    latent_prob_kernel<acc_t><<<blocks_for(n, kThreadsPerBlock), kThreadsPerBlock, 0, stream>>>(
        scores.data_ptr<acc_t>(), layout.data_ptr<int64_t>(), path, latent_keys_only, p.batch,
        p.heads, p.max_answer, scores.size(-1), p.max_latent, p.length, lse.data_ptr<acc_t>(),
        prob.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return prob.sum(1).div_(static_cast<double>(p.heads)).contiguous();  // [B, maxE, maxD]
}

// Nothing in either direction reads a tensor's values on the host or copies between host and
// device: the layout and the index tensors arrive on the GPU (built once per layout by the
// caller's plan), the maxima come from their widths, and the layout's values were checked where
// the plan was built.
std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& q, const at::Tensor& k,
                                                at::TensorList plan_tensors, double scale) {
  const AlignmentPlan plan = unpack_plan(plan_tensors);
  const Problem p = check_inputs(q, k, plan, scale);
  TORCH_CHECK(q.is_cuda(), "attention_alignment_loss: CUDA kernel called with q on ", q.device());
  const c10::cuda::CUDAGuard guard(q.device());
  const Fp32GemmPrecisionGuard fp32_gemms;  // scores GEMMs in full fp32 whatever the TF32 flag
  const auto acc = accumulate_type(q.scalar_type());
  const at::Tensor layout = plan.layout.contiguous();
  at::Tensor lse = at::zeros({p.batch, p.heads, p.length}, q.options().dtype(acc));
  at::Tensor loss;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(acc, "attention_alignment_loss_fwd_cuda", [&] {
    at::Tensor mass[2];
    for (int path = 0; path < 2; ++path) {
      const Gathered g = path_scores(q, k, plan.answer_rows.select(0, path), plan.path_keys(path), scale, acc);
      const int64_t warps = p.batch * p.heads * p.max_answer;
      row_lse_kernel<scalar_t><<<blocks_for(warps, kWarpsPerBlock), kWarpsPerBlock * kWarpSize, 0,
                                 stream>>>(g.scores.data_ptr<scalar_t>(),
                                           layout.data_ptr<int64_t>(), path, p.batch, p.heads,
                                           p.max_answer, g.scores.size(-1), p.length,
                                           lse.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      mass[path] = latent_mass<scalar_t>(g.scores, layout, path, false, p, lse);
    }
    at::Tensor per_pair = at::empty({p.batch, p.max_answer}, lse.options());
    const int64_t n = per_pair.numel();
    pair_kl_kernel<scalar_t><<<blocks_for(n, kThreadsPerBlock), kThreadsPerBlock, 0, stream>>>(
        mass[0].data_ptr<scalar_t>(), mass[1].data_ptr<scalar_t>(), layout.data_ptr<int64_t>(),
        p.batch, p.max_answer, p.max_latent, per_pair.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    loss = per_pair.sum();
  });
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_loss,
                                                 const at::Tensor& q, const at::Tensor& k,
                                                 at::TensorList plan_tensors,
                                                 const at::Tensor& lse_in, double scale) {
  const AlignmentPlan plan = unpack_plan(plan_tensors);
  const Problem p = check_inputs(q, k, plan, scale);
  check_saved_lse(lse_in, p);
  TORCH_CHECK(q.is_cuda(), "attention_alignment_loss: CUDA kernel called with q on ", q.device());
  TORCH_CHECK_VALUE(grad_loss.numel() == 1, "attention_alignment_loss backward: grad_loss must "
                    "be a scalar, got shape ", grad_loss.sizes());
  TORCH_CHECK(grad_loss.device() == q.device(), "attention_alignment_loss backward: grad_loss "
              "must be on the device of q (", q.device(), "), got ", grad_loss.device());
  const c10::cuda::CUDAGuard guard(q.device());
  const Fp32GemmPrecisionGuard fp32_gemms;
  const auto acc = accumulate_type(q.scalar_type());
  const at::Tensor layout = plan.layout.contiguous();
  const at::Tensor lse = lse_in.to(acc).contiguous();
  const at::Tensor go = grad_loss.to(acc).reshape({1}).contiguous();
  at::Tensor dq, dk;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(acc, "attention_alignment_loss_bwd_cuda", [&] {
    // Teacher masses: E rows against the latent keys only, with the saved log-sum-exp.
    const Gathered teacher = path_scores(q, k, plan.answer_rows.select(0, 0), plan.latent_keys, scale, acc);
    const at::Tensor teacher_mass = latent_mass<scalar_t>(teacher.scores, layout, 0, true, p, lse);
    // Student rows: full visible key set (their scores become the score gradients).
    const at::Tensor student_rows = plan.answer_rows.select(0, 1);
    Gathered student = path_scores(q, k, student_rows, plan.corrupted_keys, scale, acc);
    const at::Tensor student_mass =
        latent_mass<scalar_t>(student.scores, layout, 1, false, p, lse);

    at::Tensor grad_prob = at::zeros({p.batch, p.max_answer, p.max_latent}, lse.options());
    const int64_t pairs = p.batch * p.max_answer;
    pair_kl_grad_kernel<scalar_t><<<blocks_for(pairs, kThreadsPerBlock), kThreadsPerBlock, 0,
                                    stream>>>(
        teacher_mass.data_ptr<scalar_t>(), student_mass.data_ptr<scalar_t>(),
        layout.data_ptr<int64_t>(), go.data_ptr<scalar_t>(), p.batch, p.heads, p.max_answer,
        p.max_latent, grad_prob.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    const int64_t warps = p.batch * p.heads * p.max_answer;
    score_grad_kernel<scalar_t><<<blocks_for(warps, kWarpsPerBlock), kWarpsPerBlock * kWarpSize, 0,
                                  stream>>>(
        student.scores.data_ptr<scalar_t>(), layout.data_ptr<int64_t>(), lse.data_ptr<scalar_t>(),
        grad_prob.data_ptr<scalar_t>(), static_cast<scalar_t>(scale), p.batch, p.heads,
        p.max_answer, student.scores.size(-1), p.max_latent, p.length);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    // dq of the F rows and dk of the keys path 1 sees, accumulated in fp32 for those rows only
    // ([B, H, maxE, d] and [B, Hkv, maxK, d]), rounded once to the input dtype and added into
    // zero gradients laid out like q and k. Every position gets at most one non-zero term (the
    // rows and keys of a sample are distinct; padding entries are exact zeros aimed at
    // position 0), so adding in the input dtype rounds nothing and the order does not matter.
    const at::Tensor dq_rows = at::matmul(student.scores, student.keys)
                                   .view({p.batch, p.heads, p.max_answer, p.head_dim})
                                   .to(q.scalar_type());
    const at::Tensor dk_keys = at::matmul(student.scores.transpose(-1, -2), student.queries)
                                   .to(k.scalar_type());
    dq = at::zeros_like(q);
    dk = at::zeros_like(k);
    dq.scatter_add_(2,
                    student_rows.reshape({p.batch, 1, p.max_answer, 1})
                        .expand({p.batch, p.heads, p.max_answer, p.head_dim}),
                    dq_rows);
    dk.scatter_add_(2,
                    plan.corrupted_keys.reshape({p.batch, 1, p.max_keys[1], 1})
                        .expand({p.batch, p.kv_heads, p.max_keys[1], p.head_dim}),
                    dk_keys);
  });
  return {dq, dk};
}

}  // namespace

TORCH_LIBRARY_IMPL(crystal_ext, CUDA, m) {
  m.impl("attention_alignment_loss_fwd", &forward_cuda);
  m.impl("attention_alignment_loss_bwd", &backward_cuda);
}

}  // namespace attention_alignment
}  // namespace crystal_ext
