// Input validation of lm_head_losses, shared by the CPU and CUDA entry points. Every message
// names the argument and what was expected. Shape, dtype and value problems raise ValueError
// (TORCH_CHECK_VALUE); device problems RuntimeError (TORCH_CHECK).
//
// The op's index arguments are a plan (crystal_ext/ops/lm_head_plan.py, csrc/lm_head_plan.h)
// that the caller built once on the host, where the values of targets, teacher_rows,
// student_rows and pair_sample were checked. The op itself checks only the plan's shapes, dtypes
// and devices (no value is read, so on a GPU nothing waits for the device); the CPU kernel also
// reads the plan's values (a free host read there) and checks them, so that no kernel indexes
// out of bounds.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "common_host.h"
#include "lm_head_losses.h"
#include "lm_head_plan.h"

namespace crystal_ext {
namespace lm_head {

// What the op knows from metadata alone: the sizes of hidden and weight and, from the widths
// of the plan's tensors, the row, pair, sample and kept-pair counts.
struct Problem {
  int64_t n_rows = 0, hidden_dim = 0, vocab = 0;
  int64_t n_logit_rows = 0;   // R
  int64_t n_paired_rows = 0;  // the first n_paired_rows of the R rows are paired rows
  int64_t n_targeted = 0;     // T
  int64_t n_pairs = 0;        // M
  int64_t n_samples = 0;      // S
  int64_t max_pairs = 0;      // W
  int64_t n_kept = 0;         // K
  // The model's own logits: z = softcap(logit_scale * (h W^T + b)), logit_softcap 0 = no cap.
  double logit_scale = 1.0, logit_softcap = 0.0;
  bool transformed() const { return logit_scale != 1.0 || logit_softcap > 0.0; }
  bool capped() const { return logit_softcap > 0.0; }
};

// The model's logit transform: a finite scale > 0 and a soft-cap that is 0 (off) or finite > 0.
inline void check_logit_transform(double logit_scale, double logit_softcap) {
  TORCH_CHECK_VALUE(std::isfinite(logit_scale) && logit_scale > 0.0, "lm_head_losses: "
                    "logit_scale must be finite and > 0, got ", logit_scale);
  TORCH_CHECK_VALUE(logit_softcap == 0.0 || (std::isfinite(logit_softcap) && logit_softcap > 0.0),
                    "lm_head_losses: logit_softcap must be 0 (off) or finite and > 0, got ",
                    logit_softcap);
}

// Metadata checks of the op's arguments (shapes, dtypes, devices; no values).
inline Problem check_inputs(const at::Tensor& hidden, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, const LmHeadPlan& plan,
                            double logit_scale, double logit_softcap) {
  check_logit_transform(logit_scale, logit_softcap);
  TORCH_CHECK_VALUE(hidden.dim() == 2, "lm_head_losses: hidden must be 2-D [N, hidden_dim], "
                    "got shape ", hidden.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2, "lm_head_losses: weight must be 2-D [vocab, hidden_dim], "
                    "got shape ", weight.sizes());
  const auto dt = hidden.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf ||
                        dt == at::kDouble,
                    "lm_head_losses: hidden must be float32, bfloat16, float16 or float64, got ",
                    dt);
  TORCH_CHECK_VALUE(weight.scalar_type() == dt, "lm_head_losses: weight must have the dtype of "
                    "hidden (", dt, "), got ", weight.scalar_type());
  TORCH_CHECK(weight.device() == hidden.device(), "lm_head_losses: weight must be on the device "
              "of hidden (", hidden.device(), "), got ", weight.device());
  TORCH_CHECK_VALUE(weight.size(1) == hidden.size(1), "lm_head_losses: weight has hidden_dim ",
                    weight.size(1), " but hidden has hidden_dim ", hidden.size(1));
  TORCH_CHECK_VALUE(weight.size(0) >= 1, "lm_head_losses: weight must have at least one "
                    "vocabulary row, got shape ", weight.sizes());
  TORCH_CHECK_VALUE(hidden.size(1) >= 1, "lm_head_losses: hidden_dim must be >= 1, got shape ",
                    hidden.sizes());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0),
                      "lm_head_losses: bias must have shape [vocab=", weight.size(0), "], got ",
                      bias->sizes());
    TORCH_CHECK_VALUE(bias->scalar_type() == dt, "lm_head_losses: bias must have the dtype of "
                      "hidden (", dt, "), got ", bias->scalar_type());
    TORCH_CHECK(bias->device() == hidden.device(), "lm_head_losses: bias must be on the device "
                "of hidden (", hidden.device(), "), got ", bias->device());
  }
  check_plan_tensors(plan, hidden);
  const int64_t R = plan.rows.size(0);
  const int64_t S = plan.sample_pairs.size(0), W = plan.sample_pairs.size(1);
  Problem p;
  p.n_rows = hidden.size(0);
  p.hidden_dim = hidden.size(1);
  p.vocab = weight.size(0);
  p.n_logit_rows = R;
  p.n_paired_rows = plan.paired_rows;
  p.n_targeted = plan.ce_rows.size(0);
  p.n_pairs = plan.pair_rows.size(1);
  p.n_samples = S;
  p.max_pairs = W;
  p.n_kept = plan.kept_slots.size(0);
  p.logit_scale = logit_scale;
  p.logit_softcap = logit_softcap;
  TORCH_CHECK_VALUE(R <= p.n_rows && p.n_targeted <= R && p.n_paired_rows >= 0 &&
                        p.n_paired_rows <= R && p.n_paired_rows <= 2 * p.n_pairs &&
                        (p.n_pairs > 0) == (p.n_paired_rows > 0),
                    "lm_head_losses: the plan (rows ", plan.rows.sizes(), ", ce_rows ",
                    plan.ce_rows.sizes(), ", pair_rows ", plan.pair_rows.sizes(), ", paired_rows ",
                    p.n_paired_rows, ") does not fit hidden with ", p.n_rows,
                    " rows; build it with lm_head_plan");
  TORCH_CHECK_VALUE((p.n_pairs > 0) == (S > 0) && S <= p.n_pairs && W <= p.n_pairs &&
                        (S == 0 || W >= 1) && p.n_kept >= S && p.n_kept <= p.n_pairs,
                    "lm_head_losses: the plan's samples (sample_pairs ", plan.sample_pairs.sizes(),
                    ", kept_slots ", plan.kept_slots.sizes(), ") do not fit its ", p.n_pairs,
                    " pairs; build it with lm_head_plan");
  return p;
}

// The plan's values on the host, for the CPU kernel, checked (so that no kernel reads out of
// bounds with a hand-made plan): hidden rows of the logit rows, their targets, each pair's
// local teacher / student positions and hidden student row.
struct HostPlan {
  std::vector<int64_t> rows, row_targets, pair_t, pair_s, student;
};

inline std::vector<int64_t> host_values(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kCPU).contiguous();
  const int64_t* v = c.data_ptr<int64_t>();
  return std::vector<int64_t>(v, v + c.numel());
}

inline HostPlan host_plan(const LmHeadPlan& plan, const Problem& p) {
  HostPlan h;
  h.rows = host_values(plan.rows);
  h.row_targets = host_values(plan.row_targets);
  const std::vector<int64_t> ce = host_values(plan.ce_rows), pairs = host_values(plan.pair_rows);
  const std::vector<int64_t> samples = host_values(plan.sample_pairs),
                             ks = host_values(plan.sample_k), kept = host_values(plan.kept_slots);
  const char* rebuild = "; build the plan with lm_head_plan";
  std::vector<char> seen(p.n_rows, 0);
  for (int64_t j = 0; j < p.n_logit_rows; ++j) {
    const int64_t r = h.rows[j];
    TORCH_CHECK_VALUE(r >= 0 && r < p.n_rows && !seen[r], "lm_head_losses: plan rows[", j,
                      "] = ", r, " is not a distinct row of hidden (N=", p.n_rows, ")", rebuild);
    seen[r] = 1;
    const int64_t t = h.row_targets[j];
    TORCH_CHECK_VALUE(t == kIgnoreIndex || (t >= 0 && t < p.vocab), "lm_head_losses: plan "
                      "row_targets[", j, "] = ", t, " is outside [0, vocab=", p.vocab,
                      ") and is not the ignore index -100", rebuild);
  }
  int64_t targeted = 0;
  for (int64_t t : h.row_targets) targeted += t != kIgnoreIndex;
  TORCH_CHECK_VALUE(targeted == p.n_targeted, "lm_head_losses: plan ce_rows has ", p.n_targeted,
                    " entries but row_targets has ", targeted, " targeted rows", rebuild);
  for (int64_t j = 0; j < p.n_targeted; ++j)
    TORCH_CHECK_VALUE(ce[j] >= 0 && ce[j] < p.n_logit_rows &&
                          h.row_targets[ce[j]] != kIgnoreIndex,
                      "lm_head_losses: plan ce_rows[", j, "] = ", ce[j],
                      " is not the position of a targeted row", rebuild);
  h.pair_t.assign(pairs.begin(), pairs.begin() + p.n_pairs);
  h.pair_s.assign(pairs.begin() + p.n_pairs, pairs.end());
  for (int64_t i = 0; i < p.n_pairs; ++i) {
    TORCH_CHECK_VALUE(h.pair_t[i] >= 0 && h.pair_t[i] < p.n_paired_rows && h.pair_s[i] >= 0 &&
                          h.pair_s[i] < p.n_paired_rows,
                      "lm_head_losses: plan pair_rows[:, ", i, "] = (", h.pair_t[i], ", ",
                      h.pair_s[i], ") are not positions of paired rows (paired_rows=",
                      p.n_paired_rows, ")", rebuild);
    h.student.push_back(h.rows[h.pair_s[i]]);
  }
  std::vector<int64_t> pair_seen(p.n_pairs, 0);
  for (int64_t s = 0; s < p.n_samples; ++s) {
    int64_t count = 0;
    bool padding = false;
    for (int64_t j = 0; j < p.max_pairs; ++j) {
      const int64_t i = samples[s * p.max_pairs + j];
      if (i == -1) {
        padding = true;
        continue;
      }
      TORCH_CHECK_VALUE(!padding && i >= 0 && i < p.n_pairs && !pair_seen[i],
                        "lm_head_losses: plan sample_pairs[", s, ", ", j, "] = ", i,
                        " is not a new pair before the -1 padding", rebuild);
      pair_seen[i] = 1;
      ++count;
    }
    TORCH_CHECK_VALUE(ks[s] >= 1 && ks[s] <= count, "lm_head_losses: plan sample_k[", s, "] = ",
                      ks[s], " is outside [1, ", count, "]", rebuild);
  }
  for (int64_t i = 0; i < p.n_pairs; ++i)
    TORCH_CHECK_VALUE(pair_seen[i], "lm_head_losses: plan sample_pairs lacks pair ", i, rebuild);
  int64_t k_total = 0;
  for (int64_t s = 0; s < p.n_samples; ++s) {
    for (int64_t j = 0; j < ks[s]; ++j) {
      const int64_t at = k_total + j;
      TORCH_CHECK_VALUE(at < p.n_kept && kept[at] == s * p.max_pairs + j, "lm_head_losses: plan "
                        "kept_slots does not list the first sample_k ranks of each sample",
                        rebuild);
    }
    k_total += ks[s];
  }
  TORCH_CHECK_VALUE(k_total == p.n_kept, "lm_head_losses: plan kept_slots has ", p.n_kept,
                    " entries but sample_k sums to ", k_total, rebuild);
  return h;
}

// Row chunks over the R logit rows: the first chunk holds every paired row (and is at least
// `max_rows` long), the others at most `max_rows` rows. Returns (begin, end) pairs.
inline std::vector<std::pair<int64_t, int64_t>> row_chunks(const Problem& p, int64_t max_rows) {
  std::vector<std::pair<int64_t, int64_t>> chunks;
  const int64_t total = p.n_logit_rows;
  int64_t begin = 0;
  while (begin < total) {
    int64_t end = std::min(total, begin + max_rows);
    if (begin == 0) end = std::max(end, p.n_paired_rows);
    chunks.emplace_back(begin, end);
    begin = end;
  }
  return chunks;
}

}  // namespace lm_head
}  // namespace crystal_ext
