// Arithmetic of the fused attention-alignment loss, shared by the CPU kernel
// (csrc/cpu/attention_alignment_loss.cpp) and the CUDA kernel
// (csrc/cuda/attention_alignment_loss.cu), so the CPU tests exercise the maths the GPU runs.
//
// Notation for one sample (docs/method.md). Segments A..F with (start, end) =
// (a0, a1) .. (f0, f1). Path 0 is the intact path (teacher rows E), path 1 the corrupted path
// (student rows F). The keys a path's aligned rows may see, in packed order:
//   path 0 (rows E): A, C, D, E  = [0, b0) ++ [c0, e1)
//   path 1 (rows F): A, B, D, F  = [0, c0) ++ [d0, d1) ++ [f0, f1)
// and row i of E (or F) sees the prefix of that list up to and including itself (causal).
// For each aligned row and head h, p_h = softmax over the visible keys of scale * q.k;
// m_c = mean_h p_h,c over latent columns c in D; the row distribution is m / (sum_D m + 1e-8).
// Per pair i: KL(T_i || S_i) = sum_c T_c (log T_c - log S_c), with 0 log 0 = 0.
#pragma once

#include <cstdint>

#include "common_math.h"

namespace crystal_ext {
namespace attention_alignment {

// Added to the sum of latent masses before renormalising (the published formula).
constexpr double kRenormEps = 1e-8;

struct Segments {
  int64_t a0, a1, b0, b1, c0, c1, d0, d1, e0, e1, f0, f1;
  CRYSTAL_HD int64_t n_latent() const { return d1 - d0; }
  CRYSTAL_HD int64_t n_answer() const { return e1 - e0; }
};

// `layout_row` points at one sample's [6, 2] block of the layout tensor.
CRYSTAL_HD Segments load_segments(const int64_t* layout_row) {
  const int64_t* l = layout_row;
  return Segments{l[0], l[1], l[2], l[3], l[4], l[5], l[6], l[7], l[8], l[9], l[10], l[11]};
}

// Number of keys in the path's list (the keys its last aligned row sees).
CRYSTAL_HD int64_t path_key_count(const Segments& s, int path) {
  return path == 0 ? s.b0 + (s.e1 - s.c0) : s.c0 + s.n_latent() + (s.f1 - s.f0);
}

// Packed column of the t-th key of the path's list.
CRYSTAL_HD int64_t path_key_column(const Segments& s, int path, int64_t t) {
  if (path == 0) return t < s.b0 ? t : s.c0 + (t - s.b0);
  if (t < s.c0) return t;
  t -= s.c0;
  if (t < s.n_latent()) return s.d0 + t;
  return s.f0 + (t - s.n_latent());
}

// Position in the path's key list of the first latent (D) key.
CRYSTAL_HD int64_t path_latent_offset(const Segments& s, int path) {
  return path == 0 ? s.b0 + (s.d0 - s.c0) : s.c0;
}

// Packed row of the i-th aligned row of the path (E for path 0, F for path 1).
CRYSTAL_HD int64_t path_row(const Segments& s, int path, int64_t i) {
  return (path == 0 ? s.e0 : s.f0) + i;
}

// How many keys of the path's list the i-th aligned row sees (a prefix, by causality).
CRYSTAL_HD int64_t visible_key_count(const Segments& s, int path, int64_t i) {
  return path == 0 ? s.b0 + (s.e0 + i + 1 - s.c0) : s.c0 + s.n_latent() + i + 1;
}

// ---- online log-sum-exp (a running max m and a sum z of exp(x - m)) ----

template <typename T>
CRYSTAL_HD void lse_init(T& m, T& z) {
  m = neg_inf<T>();
  z = T(0);
}

template <typename T>
CRYSTAL_HD void lse_push(T& m, T& z, T x) {
  if (x > m) {
    z = z * exp_acc(m - x) + T(1);  // exp(-inf) = 0 on the first push
    m = x;
  } else {
    z += exp_acc(x - m);
  }
}

template <typename T>
CRYSTAL_HD void lse_merge(T& m, T& z, T m2, T z2) {
  if (m2 == neg_inf<T>()) return;
  if (m == neg_inf<T>()) {
    m = m2;
    z = z2;
    return;
  }
  const T mx = m > m2 ? m : m2;
  z = z * exp_acc(m - mx) + z2 * exp_acc(m2 - mx);
  m = mx;
}

// Partial log-sum-exp of row[t] for t = lane, lane + stride, ... < n. The CPU calls it with
// (lane, stride) = (0, 1); a CUDA warp with (lane id, 32) and then merges the lanes.
template <typename T>
CRYSTAL_HD void row_lse_partial(const T* row, int64_t n, int64_t lane, int64_t stride, T& m,
                                T& z) {
  for (int64_t t = lane; t < n; t += stride) lse_push(m, z, row[t]);
}

// Probability of a key from its scaled score and the row's log-sum-exp.
template <typename T>
CRYSTAL_HD T key_probability(T score, T lse) {
  return exp_acc(score - lse);
}

// ---- per pair: renormalisation over D, the KL, and its gradient ----

template <typename T>
CRYSTAL_HD T renorm_denominator(const T* mass, int64_t n_latent) {
  T total = T(0);
  for (int64_t c = 0; c < n_latent; ++c) total += mass[c];
  return total + T(kRenormEps);
}

// KL(T || S) of one pair from the head-mean latent masses of its teacher and student rows.
template <typename T>
CRYSTAL_HD T pair_kl(const T* teacher_mass, const T* student_mass, int64_t n_latent) {
  const T zt = renorm_denominator(teacher_mass, n_latent);
  const T zs = renorm_denominator(student_mass, n_latent);
  T kl = T(0);
  for (int64_t c = 0; c < n_latent; ++c) {
    const T t = teacher_mass[c] / zt;
    if (t > T(0)) kl += t * (log_acc(t) - log_acc(student_mass[c] / zs));
  }
  return kl;
}

// grad[c] = coef * d KL / d student_mass[c]
//         = coef * ( -T_c / m_c + (sum_c' T_c') / (sum_c' m_c' + eps) ),
// since S_c = m_c / (sum m + eps) and only the student side carries gradient.
template <typename T>
CRYSTAL_HD void pair_kl_grad(const T* teacher_mass, const T* student_mass, int64_t n_latent,
                             T coef, T* grad) {
  const T zt = renorm_denominator(teacher_mass, n_latent);
  const T zs = renorm_denominator(student_mass, n_latent);
  T teacher_total = T(0);
  for (int64_t c = 0; c < n_latent; ++c) teacher_total += teacher_mass[c] / zt;
  for (int64_t c = 0; c < n_latent; ++c) {
    const T t = teacher_mass[c] / zt;
    const T direct = t > T(0) ? -t / student_mass[c] : T(0);
    grad[c] = coef * (direct + teacher_total / zs);
  }
}

// Softmax backward for one key of one (student row, head): with G_c = dLoss/dp_c (non-zero
// on latent keys only) and delta = sum_c p_c G_c, dLoss/d(q.k) = scale * p * (G - delta).
template <typename T>
CRYSTAL_HD T score_grad(T p, T grad_p, T delta, T scale) {
  return scale * p * (grad_p - delta);
}

}  // namespace attention_alignment
}  // namespace crystal_ext
