// CPU kernel of the fused attention-alignment loss.
//
// Work is split into (sample, kv head) tasks run by at::parallel_for. A task gathers the
// g = H / Hkv query heads that share kv head j, for the aligned rows of one path (E or F),
// and multiplies them with the keys that path may see (one GEMM, no repeated keys for
// grouped-query attention, no L x L matrix). Each row's log-sum-exp, probabilities and
// gradients come from the shared header, so these tests cover the maths the CUDA kernel runs.
// Peak workspace is one [g * |E|, keys] score block per thread.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "attention_alignment_loss.h"
#include "attention_alignment_loss_checks.h"

namespace crystal_ext {
namespace attention_alignment {
namespace {

// Packed columns of sample b's visible keys of `path` (or its latent keys), from the plan's
// index tensors: the first n entries of the sample's row.
at::Tensor key_columns(const at::Tensor& index, int64_t b, int64_t n) {
  return index.select(0, b).narrow(0, 0, n);
}

// Query rows of the g heads of kv group j for the path's aligned rows: [g * |E|, d] in acc.
at::Tensor group_queries(const at::Tensor& q, int64_t b, int64_t j, int64_t g,
                         const Segments& seg, int path, at::ScalarType acc) {
  const int64_t n = seg.n_answer();
  return q.select(0, b)
      .narrow(0, j * g, g)
      .narrow(1, path_row(seg, path, 0), n)
      .to(acc)
      .reshape({g * n, q.size(3)});
}

at::Tensor group_keys(const at::Tensor& k, int64_t b, int64_t j, const at::Tensor& columns,
                      at::ScalarType acc) {
  return k.select(0, b).select(0, j).index_select(0, columns).to(acc);
}

// Adds the per-head latent probabilities of the path's aligned rows into
// mass[b, j, path, i, :] (contiguous [B, Hkv, 2, maxE, maxD]). `scores` is [g * |E|, n_keys]
// and `latent_offset` the position of the first D key among its columns. When
// `write_lse` is true the rows' log-sum-exp (over their visible prefix) is computed and
// stored in lse[b, h, row]; otherwise it is read from there.
template <typename acc_t>
void accumulate_latent_mass(const at::Tensor& scores, int64_t latent_offset, bool write_lse,
                            const Problem& p, const Segments& seg, int64_t b, int64_t j, int path,
                            acc_t* lse, acc_t* mass) {
  const int64_t g = p.heads / p.kv_heads;
  const int64_t n_answer = seg.n_answer(), n_latent = seg.n_latent();
  const int64_t n_keys = scores.size(1);
  const acc_t* s = scores.data_ptr<acc_t>();
  for (int64_t hh = 0; hh < g; ++hh) {
    const int64_t h = j * g + hh;
    for (int64_t i = 0; i < n_answer; ++i) {
      const acc_t* row = s + (hh * n_answer + i) * n_keys;
      acc_t& row_lse = lse[(b * p.heads + h) * p.length + path_row(seg, path, i)];
      if (write_lse) {
        acc_t m, z;
        lse_init(m, z);
        row_lse_partial(row, visible_key_count(seg, path, i), 0, 1, m, z);
        row_lse = lse_finish(m, z);
      }
      acc_t* out = mass + (((b * p.kv_heads + j) * 2 + path) * p.max_answer + i) * p.max_latent;
      for (int64_t c = 0; c < n_latent; ++c)
        out[c] += key_probability(row[latent_offset + c], row_lse);
    }
  }
}

// Head-mean latent masses [B, 2, maxE, maxD] from the per-kv-group partial sums.
at::Tensor head_mean(const at::Tensor& mass_per_group, int64_t heads) {
  return mass_per_group.sum(1).div_(static_cast<double>(heads)).contiguous();
}

template <typename acc_t>
acc_t batch_loss(const at::Tensor& mass, const Problem& p, const HostSegments& h) {
  const acc_t* m = mass.data_ptr<acc_t>();
  acc_t total = acc_t(0);
  for (int64_t b = 0; b < p.batch; ++b) {
    const Segments& seg = h.segments[b];
    acc_t sample = acc_t(0);
    for (int64_t i = 0; i < seg.n_answer(); ++i) {
      const acc_t* teacher = m + ((b * 2 + 0) * p.max_answer + i) * p.max_latent;
      const acc_t* student = m + ((b * 2 + 1) * p.max_answer + i) * p.max_latent;
      sample += pair_kl(teacher, student, seg.n_latent());
    }
    total += sample / acc_t(seg.n_answer());  // 'batchmean' within the sample
  }
  return total / acc_t(p.batch);  // mean over samples
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                               at::TensorList plan_tensors, double scale) {
  const AlignmentPlan plan = unpack_plan(plan_tensors);
  const Problem p = check_inputs(q_in, k_in, plan, scale);
  const HostSegments h = host_segments(plan.layout, p);
  TORCH_CHECK(q_in.device().is_cpu(), "attention_alignment_loss: CPU kernel called with q on ",
              q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous();
  const auto acc = accumulate_type(q.scalar_type());
  const int64_t g = p.heads / p.kv_heads;
  at::Tensor lse = at::zeros({p.batch, p.heads, p.length}, q.options().dtype(acc));
  at::Tensor mass = at::zeros({p.batch, p.kv_heads, 2, p.max_answer, p.max_latent},
                              q.options().dtype(acc));
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES(acc, "attention_alignment_loss_fwd_cpu", [&] {
    scalar_t* lse_ptr = lse.data_ptr<scalar_t>();
    scalar_t* mass_ptr = mass.data_ptr<scalar_t>();
    at::parallel_for(0, p.batch * p.kv_heads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / p.kv_heads, j = task % p.kv_heads;
        const Segments& seg = h.segments[b];
        for (int path = 0; path < 2; ++path) {
          const at::Tensor qg = group_queries(q, b, j, g, seg, path, acc);
          const at::Tensor columns = key_columns(plan.path_keys(path), b, path_key_count(seg, path));
          const at::Tensor kg = group_keys(k, b, j, columns, acc);
          const at::Tensor scores = at::mm(qg, kg.t()).mul_(scale);
          accumulate_latent_mass<scalar_t>(scores, path_latent_offset(seg, path), true, p, seg, b,
                                           j, path, lse_ptr, mass_ptr);
        }
      }
    });
    loss = at::scalar_tensor(batch_loss<scalar_t>(head_mean(mass, p.heads), p, h),
                             q.options().dtype(acc));
  });
  return {loss, lse};
}

// Backward step 1: the latent masses of both paths from the saved log-sum-exp (only the D columns).
template <typename acc_t>
void latent_masses_from_lse(const at::Tensor& q, const at::Tensor& k, const AlignmentPlan& plan,
                            const Problem& p, const HostSegments& h, double scale,
                            at::ScalarType acc, acc_t* lse_ptr, acc_t* mass_ptr) {
  using scalar_t = acc_t;
  const int64_t g = p.heads / p.kv_heads;
  at::parallel_for(0, p.batch * p.kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / p.kv_heads, j = task % p.kv_heads;
      const Segments& seg = h.segments[b];
      const at::Tensor kg = group_keys(k, b, j, key_columns(plan.latent_keys, b, seg.n_latent()), acc);
      for (int path = 0; path < 2; ++path) {
        const at::Tensor scores =
            at::mm(group_queries(q, b, j, g, seg, path, acc), kg.t()).mul_(scale);
        accumulate_latent_mass<scalar_t>(scores, 0, false, p, seg, b, j, path, lse_ptr,
                                         mass_ptr);
      }
    }
  });
}

// Backward step 2: dLoss / dp for each student row and latent key (the same for every head:
// 1/H of dLoss / d(mean over heads)).
template <typename acc_t>
void student_mass_grads(const at::Tensor& mass, const Problem& p, const HostSegments& h, acc_t go,
                        at::Tensor& grad_mass) {
  using scalar_t = acc_t;
  const at::Tensor mean_mass = head_mean(mass, p.heads);
  const scalar_t* mm_ptr = mean_mass.data_ptr<scalar_t>();
  scalar_t* gm_ptr = grad_mass.data_ptr<scalar_t>();
  for (int64_t b = 0; b < p.batch; ++b) {
    const Segments& seg = h.segments[b];
    const scalar_t coef = go / scalar_t(p.batch * seg.n_answer() * p.heads);
    for (int64_t i = 0; i < seg.n_answer(); ++i) {
      const scalar_t* teacher = mm_ptr + ((b * 2 + 0) * p.max_answer + i) * p.max_latent;
      const scalar_t* student = mm_ptr + ((b * 2 + 1) * p.max_answer + i) * p.max_latent;
      pair_kl_grad(teacher, student, seg.n_latent(), coef,
                   gm_ptr + (b * p.max_answer + i) * p.max_latent);
    }
  }
}

// Backward step 3: the student rows' scores recomputed and turned into score gradients in
// place, then two GEMMs give dq (F rows) and dk (the keys path 1 sees).
template <typename acc_t>
void student_row_grads(const at::Tensor& q, const at::Tensor& k, const AlignmentPlan& plan,
                       const Problem& p, const HostSegments& h, double scale, at::ScalarType acc,
                       const acc_t* lse_ptr, const acc_t* gm_ptr, at::Tensor& dq, at::Tensor& dk) {
  using scalar_t = acc_t;
  const int64_t g = p.heads / p.kv_heads;
  at::parallel_for(0, p.batch * p.kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / p.kv_heads, j = task % p.kv_heads;
      const Segments& seg = h.segments[b];
      const int path = 1;
      const int64_t n_answer = seg.n_answer(), n_latent = seg.n_latent();
      const at::Tensor columns = key_columns(plan.corrupted_keys, b, path_key_count(seg, path));
      const at::Tensor qg = group_queries(q, b, j, g, seg, path, acc);
      const at::Tensor kg = group_keys(k, b, j, columns, acc);
      at::Tensor scores = at::mm(qg, kg.t()).mul_(scale);
      const int64_t n_keys = scores.size(1);
      const int64_t offset = path_latent_offset(seg, path);
      scalar_t* s = scores.data_ptr<scalar_t>();
      for (int64_t hh = 0; hh < g; ++hh) {
        const int64_t h = j * g + hh;
        for (int64_t i = 0; i < n_answer; ++i) {
          scalar_t* row = s + (hh * n_answer + i) * n_keys;
          const scalar_t row_lse = lse_ptr[(b * p.heads + h) * p.length + path_row(seg, path, i)];
          const scalar_t* grad_p = gm_ptr + (b * p.max_answer + i) * p.max_latent;
          scalar_t delta = scalar_t(0);
          for (int64_t c = 0; c < n_latent; ++c)
            delta += key_probability(row[offset + c], row_lse) * grad_p[c];
          const int64_t visible = visible_key_count(seg, path, i);
          for (int64_t t = 0; t < n_keys; ++t) {
            if (t >= visible) {
              row[t] = scalar_t(0);
              continue;
            }
            const int64_t c = t - offset;
            const scalar_t gp = (c >= 0 && c < n_latent) ? grad_p[c] : scalar_t(0);
            row[t] = score_grad(key_probability(row[t], row_lse), gp, delta,
                                static_cast<scalar_t>(scale));
          }
        }
      }
      const at::Tensor dq_rows = at::mm(scores, kg).view({g, n_answer, p.head_dim});
      dq.select(0, b).narrow(0, j * g, g).narrow(1, seg.f0, n_answer).copy_(dq_rows);
      const at::Tensor dk_rows = at::mm(scores.t(), qg);
      dk.select(0, b).select(0, j).index_copy_(0, columns, dk_rows.to(dk.scalar_type()));
    }
  });
}

std::tuple<at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad_loss,
                                                const at::Tensor& q_in, const at::Tensor& k_in,
                                                at::TensorList plan_tensors,
                                                const at::Tensor& lse_in, double scale) {
  const AlignmentPlan plan = unpack_plan(plan_tensors);
  const Problem p = check_inputs(q_in, k_in, plan, scale);
  const HostSegments h = host_segments(plan.layout, p);
  check_saved_lse(lse_in, p);
  TORCH_CHECK(q_in.device().is_cpu(), "attention_alignment_loss: CPU kernel called with q on ",
              q_in.device());
  TORCH_CHECK_VALUE(grad_loss.numel() == 1, "attention_alignment_loss backward: grad_loss must "
                    "be a scalar, got shape ", grad_loss.sizes());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous();
  const auto acc = accumulate_type(q.scalar_type());
  const at::Tensor lse = lse_in.to(acc).contiguous();
  // Gradients in the strides of the inputs (q is often a transposed view).
  at::Tensor dq = at::zeros_like(q_in);
  at::Tensor dk = at::zeros_like(k_in);
  at::Tensor mass = at::zeros({p.batch, p.kv_heads, 2, p.max_answer, p.max_latent},
                              q.options().dtype(acc));
  at::Tensor grad_mass = at::zeros({p.batch, p.max_answer, p.max_latent}, q.options().dtype(acc));

  AT_DISPATCH_FLOATING_TYPES(acc, "attention_alignment_loss_bwd_cpu", [&] {
    scalar_t* lse_ptr = const_cast<scalar_t*>(lse.data_ptr<scalar_t>());
    scalar_t* mass_ptr = mass.data_ptr<scalar_t>();
    const scalar_t go = grad_loss.to(at::kCPU).to(acc).item<scalar_t>();

    // 1-3: the latent masses, their gradient, then the student rows' dq and dk.
    latent_masses_from_lse<scalar_t>(q, k, plan, p, h, scale, acc, lse_ptr, mass_ptr);
    student_mass_grads<scalar_t>(mass, p, h, go, grad_mass);
    student_row_grads<scalar_t>(q, k, plan, p, h, scale, acc, lse_ptr,
                                grad_mass.data_ptr<scalar_t>(), dq, dk);
  });
  return {dq, dk};
}

// The op's index tensors from a host layout, after checking its values: answer_rows
// [2, B, maxE] (E rows, F rows), intact_keys [B, maxK0], corrupted_keys [B, maxK1],
// latent_keys [B, maxD], padded with 0 (never an aligned row; the kernels mask padding).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> build_indices(const at::Tensor& layout,
                                                                          int64_t length) {
  TORCH_CHECK_VALUE(layout.scalar_type() == at::kLong, "attention_alignment_loss: layout must "
                    "be int64 (torch.long), got ", layout.scalar_type());
  TORCH_CHECK_VALUE(layout.dim() == 3 && layout.size(0) >= 1 && layout.size(1) == 6 &&
                        layout.size(2) == 2,
                    "attention_alignment_loss: layout must have shape [batch, 6, 2] ((start, end) "
                    "of segments A..F), got ", layout.sizes());
  const at::Tensor layout_cpu = layout.contiguous();
  check_layout_values(layout_cpu, length);
  const int64_t batch = layout.size(0);
  std::vector<Segments> segs;
  int64_t max_answer = 0, max_latent = 0, max_keys[2] = {0, 0};
  for (int64_t b = 0; b < batch; ++b) {
    segs.push_back(load_segments(layout_cpu.data_ptr<int64_t>() + b * 12));
    max_answer = std::max(max_answer, segs.back().n_answer());
    max_latent = std::max(max_latent, segs.back().n_latent());
    for (int path = 0; path < 2; ++path)
      max_keys[path] = std::max(max_keys[path], path_key_count(segs.back(), path));
  }
  at::Tensor rows = at::zeros({2, batch, max_answer}, at::kLong);
  at::Tensor keys[2] = {at::zeros({batch, max_keys[0]}, at::kLong),
                        at::zeros({batch, max_keys[1]}, at::kLong)};
  at::Tensor latent = at::zeros({batch, max_latent}, at::kLong);
  int64_t* r = rows.data_ptr<int64_t>();
  int64_t* lat = latent.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    const Segments& seg = segs[b];
    for (int path = 0; path < 2; ++path) {
      for (int64_t i = 0; i < seg.n_answer(); ++i)
        r[(path * batch + b) * max_answer + i] = path_row(seg, path, i);
      int64_t* kp = keys[path].data_ptr<int64_t>() + b * max_keys[path];
      for (int64_t t = 0; t < path_key_count(seg, path); ++t) kp[t] = path_key_column(seg, path, t);
    }
    for (int64_t c = 0; c < seg.n_latent(); ++c) lat[b * max_latent + c] = seg.d0 + c;
  }
  return {rows, keys[0], keys[1], latent};
}

}  // namespace

// Host-only helper of crystal_ext.ops.attention_alignment_loss.alignment_indices (it reads the
// layout's values, so it has no CUDA or fake kernel).
TORCH_LIBRARY_FRAGMENT(crystal_ext, m) {
  m.def("attention_alignment_indices(Tensor layout, int length) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(crystal_ext, CPU, m) {
  m.impl("attention_alignment_indices", &build_indices);
  m.impl("attention_alignment_loss_fwd", &forward_cpu);
  m.impl("attention_alignment_loss_bwd", &backward_cpu);
}

}  // namespace attention_alignment
}  // namespace crystal_ext
