// Input validation of attention_alignment_loss, shared by the CPU and CUDA entry points.
// Every message names the argument and what was expected. Shape and value problems raise
// ValueError (TORCH_CHECK_VALUE); device problems RuntimeError (TORCH_CHECK).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#include "attention_alignment_loss.h"
#include "attention_alignment_plan.h"
#include "common_host.h"

namespace crystal_ext {
namespace attention_alignment {

// What the op knows from metadata alone (no tensor values are read, so nothing waits for the
// GPU): the shapes of q and k, and the batch maxima from the widths of the index tensors,
// which the caller's plan (crystal_ext.ops.attention_alignment_loss.alignment_indices) built
// once per layout on the host, where it also checked the layout's values.
struct Problem {
  int64_t batch, heads, kv_heads, length, head_dim;
  int64_t max_answer = 0;        // max |E| over the batch: width of answer_rows
  int64_t max_latent = 0;        // max |D| over the batch: width of latent_keys
  int64_t max_keys[2] = {0, 0};  // max path_key_count per path: widths of the key indices
};

// The CPU kernel also reads the layout's values (a free host read there): the per-sample
// segments, checked against the rules and against the widths of the index tensors.
struct HostSegments {
  std::vector<Segments> segments;
  at::Tensor layout_cpu;  // int64 [B, 6, 2], contiguous, on the CPU
};

inline const char* segment_name(int s) {
  static const char* names[6] = {"A (prefix)",       "B (corrupted image + prompt)",
                                 "C (intact image + prompt)", "D (latent block)",
                                 "E (answer, intact path)",   "F (answer, corrupted path)"};
  return names[s];
}

inline void check_layout_values(const at::Tensor& layout_cpu, int64_t length) {
  const int64_t batch = layout_cpu.size(0);
  const int64_t* l = layout_cpu.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t* row = l + b * 12;
    TORCH_CHECK_VALUE(row[0] == 0, "attention_alignment_loss: layout[", b,
                      "]: segment A must start at 0, got start ", row[0]);
    for (int s = 0; s < 6; ++s) {
      const int64_t start = row[2 * s], end = row[2 * s + 1];
      TORCH_CHECK_VALUE(start <= end, "attention_alignment_loss: layout[", b, "]: segment ",
                        segment_name(s), " has start ", start, " > end ", end);
      if (s < 5) {
        TORCH_CHECK_VALUE(end == row[2 * s + 2], "attention_alignment_loss: layout[", b,
                          "]: segments must be contiguous end to end, but ", segment_name(s),
                          " ends at ", end, " and ", segment_name(s + 1), " starts at ",
                          row[2 * s + 2]);
      }
    }
    TORCH_CHECK_VALUE(row[11] <= length, "attention_alignment_loss: layout[", b,
                      "]: segment F ends at ", row[11], ", beyond the sequence length ", length,
                      " of q and k");
    const Segments seg = load_segments(row);
    TORCH_CHECK_VALUE(seg.b1 - seg.b0 == seg.c1 - seg.c0, "attention_alignment_loss: layout[",
                      b, "]: |B| must equal |C| (both paths see the same prompt), got |B|=",
                      seg.b1 - seg.b0, " and |C|=", seg.c1 - seg.c0);
    TORCH_CHECK_VALUE(seg.n_latent() >= 1, "attention_alignment_loss: layout[", b,
                      "]: segment D (latent block) is empty; at least one latent token is "
                      "needed");
    TORCH_CHECK_VALUE(seg.n_answer() >= 1, "attention_alignment_loss: layout[", b,
                      "]: segment E (answer) is empty; at least one answer token is needed");
    TORCH_CHECK_VALUE(seg.f1 - seg.f0 == seg.n_answer(), "attention_alignment_loss: layout[",
                      b, "]: |E| must equal |F| (F copies the answer), got |E|=",
                      seg.n_answer(), " and |F|=", seg.f1 - seg.f0);
  }
}

inline void check_index(const at::Tensor& index, const char* name, const at::Tensor& q,
                        at::IntArrayRef leading) {
  TORCH_CHECK_VALUE(index.scalar_type() == at::kLong, "attention_alignment_loss: ", name,
                    " must be int64 (torch.long), got ", index.scalar_type());
  TORCH_CHECK(index.device() == q.device(), "attention_alignment_loss: ", name,
              " must be on the device of q (", q.device(), "), got ", index.device());
  const int64_t dims = static_cast<int64_t>(leading.size()) + 1;
  bool ok = index.dim() == dims && index.size(dims - 1) >= 1;
  for (int64_t d = 0; ok && d < dims - 1; ++d) ok = index.size(d) == leading[d];
  TORCH_CHECK_VALUE(ok, "attention_alignment_loss: ", name, " must have shape ", leading,
                    " + [width >= 1] (from alignment_indices), got ", index.sizes());
}

// Metadata checks of the op's arguments (shapes, dtypes, devices; no values).
inline Problem check_inputs(const at::Tensor& q, const at::Tensor& k, const AlignmentPlan& plan,
                            double scale) {
  const at::Tensor& layout = plan.layout;
  TORCH_CHECK_VALUE(q.dim() == 4, "attention_alignment_loss: q must be 4-D "
                    "[batch, heads, length, head_dim], got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 4, "attention_alignment_loss: k must be 4-D "
                    "[batch, kv_heads, length, head_dim], got shape ", k.sizes());
  const auto dt = q.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf ||
                        dt == at::kDouble,
                    "attention_alignment_loss: q must be float32, bfloat16, float16 or "
                    "float64, got ", dt);
  TORCH_CHECK_VALUE(k.scalar_type() == dt, "attention_alignment_loss: k must have the dtype of "
                    "q (", dt, "), got ", k.scalar_type());
  TORCH_CHECK(k.device() == q.device(), "attention_alignment_loss: k must be on the device of q (",
              q.device(), "), got ", k.device());
  TORCH_CHECK(layout.device() == q.device(), "attention_alignment_loss: layout must be on the "
              "device of q (", q.device(), "), got ", layout.device());
  TORCH_CHECK_VALUE(k.size(0) == q.size(0), "attention_alignment_loss: k has batch ", k.size(0),
                    " but q has batch ", q.size(0));
  TORCH_CHECK_VALUE(k.size(2) == q.size(2), "attention_alignment_loss: k has length ", k.size(2),
                    " but q has length ", q.size(2));
  TORCH_CHECK_VALUE(k.size(3) == q.size(3), "attention_alignment_loss: k has head_dim ",
                    k.size(3), " but q has head_dim ", q.size(3));
  TORCH_CHECK_VALUE(q.size(1) >= 1 && k.size(1) >= 1 && q.size(1) % k.size(1) == 0,
                    "attention_alignment_loss: the heads of q (", q.size(1),
                    ") must be a positive multiple of the kv_heads of k (", k.size(1), ")");
  TORCH_CHECK_VALUE(q.size(0) >= 1, "attention_alignment_loss: the batch must hold at least "
                    "one sample, got q of shape ", q.sizes());
  TORCH_CHECK_VALUE(q.size(3) >= 1, "attention_alignment_loss: head_dim must be >= 1");
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, "attention_alignment_loss: scale must "
                    "be a positive finite number, got ", scale);
  TORCH_CHECK_VALUE(layout.scalar_type() == at::kLong, "attention_alignment_loss: layout must "
                    "be int64 (torch.long), got ", layout.scalar_type());
  TORCH_CHECK_VALUE(layout.dim() == 3 && layout.size(0) == q.size(0) && layout.size(1) == 6 &&
                        layout.size(2) == 2,
                    "attention_alignment_loss: layout must have shape [batch=", q.size(0),
                    ", 6, 2] ((start, end) of segments A..F), got ", layout.sizes());
  const int64_t batch = q.size(0);
  check_index(plan.answer_rows, "answer_rows", q, {2, batch});
  check_index(plan.intact_keys, "intact_keys", q, {batch});
  check_index(plan.corrupted_keys, "corrupted_keys", q, {batch});
  check_index(plan.latent_keys, "latent_keys", q, {batch});

  Problem p;
  p.batch = batch;
  p.heads = q.size(1);
  p.kv_heads = k.size(1);
  p.length = q.size(2);
  p.head_dim = q.size(3);
  p.max_answer = plan.answer_rows.size(2);
  p.max_keys[0] = plan.intact_keys.size(1);
  p.max_keys[1] = plan.corrupted_keys.size(1);
  p.max_latent = plan.latent_keys.size(1);
  return p;
}

// Host-side segments for the CPU kernel, with the layout's value checks and a check that the
// index tensors are as wide as the layout needs (so no kernel reads past them).
inline HostSegments host_segments(const at::Tensor& layout, const Problem& p) {
  HostSegments h;
  h.layout_cpu = layout.to(at::kCPU).contiguous();
  check_layout_values(h.layout_cpu, p.length);
  const int64_t* l = h.layout_cpu.data_ptr<int64_t>();
  int64_t max_answer = 0, max_latent = 0, max_keys[2] = {0, 0};
  for (int64_t b = 0; b < p.batch; ++b) {
    const Segments seg = load_segments(l + b * 12);
    h.segments.push_back(seg);
    max_answer = std::max(max_answer, seg.n_answer());
    max_latent = std::max(max_latent, seg.n_latent());
    for (int path = 0; path < 2; ++path)
      max_keys[path] = std::max(max_keys[path], path_key_count(seg, path));
  }
  TORCH_CHECK_VALUE(p.max_answer == max_answer, "attention_alignment_loss: answer_rows has width ",
                    p.max_answer, " but the layout's longest answer has ", max_answer,
                    " rows; build the indices with alignment_indices(layout, ...)");
  TORCH_CHECK_VALUE(p.max_keys[1] == max_keys[1], "attention_alignment_loss: corrupted_keys has "
                    "width ", p.max_keys[1], " but the layout needs ", max_keys[1],
                    "; build the indices with alignment_indices(layout, ...)");
  TORCH_CHECK_VALUE(p.max_keys[0] == max_keys[0],
                    "attention_alignment_loss: intact_keys has width ", p.max_keys[0],
                    " but the layout needs ", max_keys[0],
                    "; build the indices with alignment_indices(layout, ...)");
  TORCH_CHECK_VALUE(p.max_latent == max_latent,
                    "attention_alignment_loss: latent_keys has width ", p.max_latent,
                    " but the layout needs ", max_latent,
                    "; build the indices with alignment_indices(layout, ...)");
  return h;
}

inline void check_saved_lse(const at::Tensor& lse, const Problem& p) {
  TORCH_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == p.batch && lse.size(1) == p.heads &&
                        lse.size(2) == p.length,
                    "attention_alignment_loss backward: lse must have shape [", p.batch, ", ",
                    p.heads, ", ", p.length, "], got ", lse.sizes());
}

}  // namespace attention_alignment
}  // namespace crystal_ext
