// Input validation and host-side planning of lm_head_losses, shared by the CPU and CUDA entry
// points. Every message names the argument and what was expected. Shape, dtype and value
// problems raise ValueError (TORCH_CHECK_VALUE); device problems RuntimeError (TORCH_CHECK).
//
// The index tensors (targets, teacher_rows, student_rows, pair_sample) are small ([N], [M])
// and are read on the host: range checks, the list of rows that need logits, and the top-k
// selection (which needs all M pair KLs at once) all happen here.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <utility>
#include <vector>

#include "common_host.h"
#include "lm_head_losses.h"

namespace crystal_ext {
namespace lm_head {

struct Problem {
  int64_t n_rows = 0, hidden_dim = 0, vocab = 0, n_pairs = 0;
  int64_t n_targeted = 0;
  at::Tensor targets_cpu, teacher_cpu, student_cpu;  // int64, contiguous, CPU
  // Rows that need logits (CE rows, teacher rows, student rows), each once: paired rows
  // first, then CE-only rows. `local[r]` is the position of row r in `rows` (-1: unused).
  std::vector<int64_t> rows;
  std::vector<int64_t> local;
  int64_t n_paired_rows = 0;
  // Pair -> dense sample index (0 .. n_samples-1, in increasing pair_sample order).
  std::vector<int64_t> pair_sample_index;
  int64_t n_samples = 0;
};


inline void check_index_tensor(const at::Tensor& t, const char* name, const at::Tensor& hidden) {
  TORCH_CHECK_VALUE(t.dim() == 1, "lm_head_losses: ", name, " must be 1-D, got shape ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == at::kLong, "lm_head_losses: ", name,
                    " must be int64 (torch.long), got ", t.scalar_type());
  TORCH_CHECK(t.device() == hidden.device(), "lm_head_losses: ", name,
              " must be on the device of hidden (", hidden.device(), "), got ", t.device());
}

inline Problem check_inputs(const at::Tensor& hidden, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, const at::Tensor& targets,
                            const at::Tensor& teacher_rows, const at::Tensor& student_rows,
                            const at::Tensor& pair_sample, double topk_fraction) {
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
  check_index_tensor(targets, "targets", hidden);
  check_index_tensor(teacher_rows, "teacher_rows", hidden);
  check_index_tensor(student_rows, "student_rows", hidden);
  check_index_tensor(pair_sample, "pair_sample", hidden);
  TORCH_CHECK_VALUE(targets.size(0) == hidden.size(0), "lm_head_losses: targets has ",
                    targets.size(0), " entries but hidden has ", hidden.size(0), " rows");
  TORCH_CHECK_VALUE(student_rows.size(0) == teacher_rows.size(0),
                    "lm_head_losses: student_rows has ", student_rows.size(0),
                    " entries but teacher_rows has ", teacher_rows.size(0),
                    " (one entry per pair in each)");
  TORCH_CHECK_VALUE(pair_sample.size(0) == teacher_rows.size(0),
                    "lm_head_losses: pair_sample has ", pair_sample.size(0),
                    " entries but teacher_rows has ", teacher_rows.size(0),
                    " (one entry per pair in each)");
  TORCH_CHECK_VALUE(std::isfinite(topk_fraction) && topk_fraction > 0.0 && topk_fraction <= 1.0,
                    "lm_head_losses: topk_fraction must lie in (0, 1], got ", topk_fraction);

  Problem p;
  p.n_rows = hidden.size(0);
  p.hidden_dim = hidden.size(1);
  p.vocab = weight.size(0);
  p.n_pairs = teacher_rows.size(0);
  p.targets_cpu = targets.to(at::kCPU).contiguous();
  p.teacher_cpu = teacher_rows.to(at::kCPU).contiguous();
  p.student_cpu = student_rows.to(at::kCPU).contiguous();
  const at::Tensor sample_cpu = pair_sample.to(at::kCPU).contiguous();

  const int64_t* tg = p.targets_cpu.data_ptr<int64_t>();
  for (int64_t r = 0; r < p.n_rows; ++r) {
    TORCH_CHECK_VALUE(tg[r] == kIgnoreIndex || (tg[r] >= 0 && tg[r] < p.vocab),
                      "lm_head_losses: targets[", r, "] = ", tg[r], " is outside [0, vocab=",
                      p.vocab, ") and is not the ignore index -100");
    if (tg[r] != kIgnoreIndex) ++p.n_targeted;
  }
  const int64_t* te = p.teacher_cpu.data_ptr<int64_t>();
  const int64_t* st = p.student_cpu.data_ptr<int64_t>();
  for (int64_t i = 0; i < p.n_pairs; ++i) {
    TORCH_CHECK_VALUE(te[i] >= 0 && te[i] < p.n_rows, "lm_head_losses: teacher_rows[", i,
                      "] = ", te[i], " is not a row of hidden (N=", p.n_rows, ")");
    TORCH_CHECK_VALUE(st[i] >= 0 && st[i] < p.n_rows, "lm_head_losses: student_rows[", i,
                      "] = ", st[i], " is not a row of hidden (N=", p.n_rows, ")");
  }

  // Rows that need logits: paired rows first (so that a pair's two rows always sit in the
  // same row chunk), then the remaining CE rows.
  p.local.assign(p.n_rows, -1);
  auto add_row = [&](int64_t r) {
    if (p.local[r] < 0) {
      p.local[r] = static_cast<int64_t>(p.rows.size());
      p.rows.push_back(r);
    }
  };
  for (int64_t i = 0; i < p.n_pairs; ++i) {
    add_row(te[i]);
    add_row(st[i]);
  }
  p.n_paired_rows = static_cast<int64_t>(p.rows.size());
  for (int64_t r = 0; r < p.n_rows; ++r)
    if (tg[r] != kIgnoreIndex) add_row(r);

  const int64_t* ps = sample_cpu.data_ptr<int64_t>();
  std::map<int64_t, int64_t> sample_ids;
  for (int64_t i = 0; i < p.n_pairs; ++i) sample_ids.emplace(ps[i], 0);
  int64_t next = 0;
  for (auto& kv : sample_ids) kv.second = next++;
  p.n_samples = next;
  p.pair_sample_index.resize(p.n_pairs);
  for (int64_t i = 0; i < p.n_pairs; ++i) p.pair_sample_index[i] = sample_ids[ps[i]];
  return p;
}

// Row chunks over p.rows: the first chunk holds every paired row (and is at least
// `max_rows` long), the others at most `max_rows` rows. Returns (begin, end) pairs.
inline std::vector<std::pair<int64_t, int64_t>> row_chunks(const Problem& p, int64_t max_rows) {
  std::vector<std::pair<int64_t, int64_t>> chunks;
  const int64_t total = static_cast<int64_t>(p.rows.size());
  int64_t begin = 0;
  while (begin < total) {
    int64_t end = std::min(total, begin + max_rows);
    if (begin == 0) end = std::max(end, p.n_paired_rows);
    chunks.emplace_back(begin, end);
    begin = end;
  }
  return chunks;
}

// Top-k selection on the host. `pair_kl` holds each pair's KL (any floating type, on the CPU).
// Returns the KL loss (mean over samples of the mean of each sample's top k pairs) and fills
// `coef[i]` = d loss / d KL_i: 1 / (k_sample * n_samples) for kept pairs, 0 otherwise.
// Ties are broken towards the earlier pair.
template <typename T>
double select_topk(const Problem& p, const T* pair_kl, double topk_fraction, T* coef) {
  std::vector<std::vector<int64_t>> by_sample(p.n_samples);
  for (int64_t i = 0; i < p.n_pairs; ++i) by_sample[p.pair_sample_index[i]].push_back(i);
  for (int64_t i = 0; i < p.n_pairs; ++i) coef[i] = T(0);
  double total = 0.0;
  for (auto& members : by_sample) {
    // NaN ranks above every number, as in torch.topk.
    std::stable_sort(members.begin(), members.end(), [&](int64_t a, int64_t b) {
      const bool a_nan = std::isnan(static_cast<double>(pair_kl[a]));
      const bool b_nan = std::isnan(static_cast<double>(pair_kl[b]));
      return a_nan != b_nan ? a_nan : pair_kl[a] > pair_kl[b];
    });
    const int64_t k = topk_count(topk_fraction, static_cast<int64_t>(members.size()));
    double sample_sum = 0.0;
    for (int64_t j = 0; j < k; ++j) {
      sample_sum += static_cast<double>(pair_kl[members[j]]);
      coef[members[j]] = static_cast<T>(1.0 / (static_cast<double>(k) * p.n_samples));
    }
    total += sample_sum / static_cast<double>(k);
  }
  return p.n_samples > 0 ? total / static_cast<double>(p.n_samples) : 0.0;
}

}  // namespace lm_head
}  // namespace crystal_ext
