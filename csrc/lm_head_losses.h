// Arithmetic of the fused LM-head losses, shared by the CPU kernel
// (csrc/cpu/lm_head_losses.cpp) and the CUDA kernel (csrc/cuda/lm_head_losses.cu), so the CPU
// tests exercise the maths the GPU runs.
//
// Notation. Row r of hidden has logits z_r = softcap(scale (W h_r + b)) over the vocabulary, the
// model's own logits (never stored in full: they arrive one vocabulary block at a time); the
// scale and the soft-cap cap * tanh(u / cap) are the model's (1 and off for a bare head). Per row we keep an online log-sum-exp
// (running max m_r, running sum Z_r = sum_v exp(z_rv - m_r)) and, when gradients to hidden are
// wanted, the running expectation O_r = sum_v exp(z_rv - m_r) W_v, rescaled like Z_r when the
// max grows (the flash-attention trick with W in the role of V). At the end
//   lse_r = m_r + log Z_r,   E_r = O_r / Z_r = sum_v p_rv W_v = E_{p_r}[W_v].
// Cross entropy of a targeted row: ce_r = lse_r - z_{r,t};  d ce_r / d h_r = E_r - W_t.
// KL of a pair (teacher a, student s), teacher detached:
//   KL = sum_v p_av (z_av - z_sv) - lse_a + lse_s = A / Z_a - lse_a + lse_s,
//   with A = sum_v exp(z_av - m_a) (z_av - z_sv), accumulated online like Z_a;
//   d KL / d z_s = p_s - p_a,   d KL / d h_s = E_s - E_a.
// With the model's transform, d z_v / d h = scale g_v W_v, g_v = 1 - (z_v / cap)^2 (1 without a
// cap), so the expectations become E_r = sum_v p_rv g_rv W_v, the CE gradient
// scale (E_r - g_rt W_t), and the KL gradient scale (E_s - X_i) with the pair's cross
// expectation X_i = sum_v p_av g_sv W_v (teacher probabilities, student slopes; X_i = E_a
// without a cap, so only a soft-cap needs it).
// So one pass over the vocabulary yields the losses AND the gradients to hidden of every row
// (before the top-k selection is known, because the KL gradient is E_s - E_a per pair).
// The weight / bias gradients need p itself (exp(z - lse) with the final lse), hence a
// second sweep in the backward, only when they are wanted.
#pragma once

#include <cstdint>

#include "common_math.h"

namespace crystal_ext {
namespace lm_head {

constexpr int64_t kIgnoreIndex = -100;

// ---- the model's own logits ----

// z = softcap(scale * raw) with softcap(u) = cap * tanh(u / cap), off when cap == 0. A -inf raw
// logit becomes -cap under a cap, as in the models' own forward.
template <typename T>
CRYSTAL_HD T model_logit(T raw, T scale, T cap) {
  const T u = raw * scale;
  return cap > T(0) ? cap * tanh_acc(u / cap) : u;
}

// d z / d u of the soft-cap, from z itself: 1 - tanh(u / cap)^2 = (1 - z / cap)(1 + z / cap);
// 1 without a cap. (The scale, the same for every entry, multiplies the gradients once.)
template <typename T>
CRYSTAL_HD T softcap_slope(T z, T cap) {
  if (!(cap > T(0))) return T(1);
  const T t = z / cap;
  return (T(1) - t) * (T(1) + t);
}

// ---- online log-sum-exp over vocabulary blocks ----
// Per block: new_max = max(m, block max); alpha = exp(m - new_max) rescales everything that
// was accumulated relative to the old max (Z, O, A); then p~ = exp(z - new_max) is added.

template <typename T>
CRYSTAL_HD T block_rescale(T old_max, T new_max) {
  // exp(-inf - finite) = 0 on the first block; new_max is finite whenever a block is seen.
  return old_max == neg_inf<T>() ? T(0) : exp_acc(old_max - new_max);
}

// What a block's logits are exponentiated against: the running max, except while a row's
// logits have all been -inf so far (a -inf bias over a whole block), where exp(-inf - -inf)
// would be NaN; against 0 they give exp(-inf) = 0. Decided once per row and block, outside
// the loops over the vocabulary.
template <typename T>
CRYSTAL_HD T exp_shift(T running_max) {
  return running_max == neg_inf<T>() ? T(0) : running_max;
}

template <typename T>
CRYSTAL_HD T unnormalised_prob(T z, T running_max) {
  return exp_acc(z - running_max);
}

// Term of A (the KL cross term) for one vocabulary entry of a pair.
template <typename T>
CRYSTAL_HD T kl_cross_term(T teacher_unnormalised_prob, T z_teacher, T z_student) {
  // 0 * (-inf - -inf) would be NaN for a vocabulary entry both rows exclude (-inf bias).
  return teacher_unnormalised_prob == T(0) ? T(0)
                                           : teacher_unnormalised_prob * (z_teacher - z_student);
}

// ---- override columns (csrc/lm_head_override.h) ----

// The column of vocabulary id `id` in the block [v0, v0 + vb), or -1 when it lies outside.
CRYSTAL_HD int64_t block_column(int64_t id, int64_t v0, int64_t vb) {
  return id >= v0 && id < v0 + vb ? id - v0 : -1;
}

// What the expectation GEMM's P holds for a logit z: its unnormalised probability against the
// row's shift, times the soft-cap's slope (1 without a cap). An override column's entry is taken
// out of P and multiplies the override row instead of the weight's.
template <typename T>
CRYSTAL_HD T expectation_weight(T z, T shift, T cap) {
  return unnormalised_prob(z, shift) * softcap_slope(z, cap);
}

// ---- losses per row / pair ----

template <typename T>
CRYSTAL_HD T ce_row(T lse, T target_logit) {
  return lse - target_logit;
}

// KL(teacher || student) of one pair from its accumulated cross term A and the two rows'
// (m, Z). Clamped at 0: it is non-negative in exact arithmetic, rounding can push a
// vanishing KL slightly below. A NaN stays NaN.
template <typename T>
CRYSTAL_HD T pair_kl(T cross, T teacher_sum, T teacher_lse, T student_lse) {
  const T kl = cross / teacher_sum - teacher_lse + student_lse;
  return kl < T(0) ? T(0) : kl;
}

// ---- gradients ----

// Probability of a vocabulary entry from its logit and the row's final log-sum-exp.
template <typename T>
CRYSTAL_HD T softmax_prob(T z, T lse) {
  return exp_acc(z - lse);
}

// coef * d ce / d z_v = coef * (p_v - [v == target]).
template <typename T>
CRYSTAL_HD T ce_logit_grad(T p, bool is_target, T coef) {
  return coef * (is_target ? p - T(1) : p);
}

// coef * d KL / d z_student,v = coef * (p_student,v - p_teacher,v).
template <typename T>
CRYSTAL_HD T kl_logit_grad(T p_student, T p_teacher, T coef) {
  return coef * (p_student - p_teacher);
}

// One element of d ce / d h_r = coef * (E_r - W_target).
template <typename T>
CRYSTAL_HD T ce_hidden_grad(T expectation, T target_weight, T coef) {
  return coef * (expectation - target_weight);
}

// One element of d KL / d h_s = coef * (E_s - E_teacher).
template <typename T>
CRYSTAL_HD T kl_hidden_grad(T student_expectation, T teacher_expectation, T coef) {
  return coef * (student_expectation - teacher_expectation);
}

// ---- top-k selection ----

// k = max(1, int(fraction * n)), the published rule (int() truncates; the product is computed
// in double exactly as Python does).
CRYSTAL_HD int64_t topk_count(double fraction, int64_t n_pairs) {
  const int64_t k = static_cast<int64_t>(fraction * static_cast<double>(n_pairs));
  return k < 1 ? 1 : k;
}

}  // namespace lm_head
}  // namespace crystal_ext
