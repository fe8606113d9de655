// AVX-512 passes over a row of logits (see vocab_rows.h). Only these functions are compiled for
// AVX-512 (function target attributes); available() checks the CPU before anything calls them.
#include "vocab_rows.h"

#include <cmath>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CRYSTAL_HAVE_SIMD_ROWS 1
#include <immintrin.h>
#define CRYSTAL_AVX512_ROWS __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#else
#define CRYSTAL_HAVE_SIMD_ROWS 0
#endif

namespace crystal_ext {
namespace cpu_rows {

bool available() {
#if CRYSTAL_HAVE_SIMD_ROWS
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  const char* env = std::getenv("CRYSTAL_EXT_CPU_SIMD_ROWS");
  return ok && (env == nullptr || std::strcmp(env, "0") != 0);
#else
  return false;
#endif
}

#if CRYSTAL_HAVE_SIMD_ROWS
namespace {

constexpr int64_t kLanes = 16;

inline __mmask16 tail_mask(int64_t left) {
  return left >= kLanes ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
}

// Cephes expf: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by a degree-6 polynomial, times 2^n.
CRYSTAL_AVX512_ROWS inline __m512 exp16(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512 y = _mm512_scalef_ps(p, n);
  // Below -104 expf is 0 (under the smallest denormal): set it so, rather than rely on what
  // VSCALEFPS makes of the NaN that the reduction above gives at -inf.
  const __mmask16 zero = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-104.0f), _CMP_LT_OQ);
  return _mm512_mask_mov_ps(y, zero, _mm512_setzero_ps());
}

// The 16 bf16 bit patterns of a conversion result, as integers for the masked store.
CRYSTAL_AVX512_ROWS inline __m256i bits_of(__m256bh v) {
  __m256i out;
  std::memcpy(&out, &v, sizeof(out));
  return out;
}

// acc += the 16 floats of v, in double.
CRYSTAL_AVX512_ROWS inline void add_in_double(__m512 v, __m512d* lo, __m512d* hi) {
  *lo = _mm512_add_pd(*lo, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
  *hi = _mm512_add_pd(*hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
}

CRYSTAL_AVX512_ROWS inline double sum_of(__m512d lo, __m512d hi) {
  return _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));
}

CRYSTAL_AVX512_ROWS float max_of_avx512(const float* s, int64_t n, float init) {
  __m512 m = _mm512_set1_ps(init);
  for (int64_t v = 0; v < n; v += kLanes) {
    const __m512 x = _mm512_mask_loadu_ps(_mm512_set1_ps(init), tail_mask(n - v), s + v);
    m = _mm512_max_ps(x, m);  // max_ps returns its second operand when x is NaN
  }
  return _mm512_reduce_max_ps(m);
}

CRYSTAL_AVX512_ROWS double exp_to_bf16_avx512(const float* s, int64_t n, float shift,
                                              at::BFloat16* hi, at::BFloat16* lo) {
  const __m512 sh = _mm512_set1_ps(shift);
  __m512d acc_lo = _mm512_setzero_pd(), acc_hi = _mm512_setzero_pd();
  for (int64_t v = 0; v < n; v += kLanes) {
    const __mmask16 k = tail_mask(n - v);
    // Lanes past the row read -inf and give p = 0: nothing added, nothing stored.
    const __m512 x = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), k, s + v);
    const __m512 p = exp16(_mm512_sub_ps(x, sh));
    add_in_double(p, &acc_lo, &acc_hi);
    const __m256i p_hi = bits_of(_mm512_cvtneps_pbh(p));  // rounded to nearest even
    _mm256_mask_storeu_epi16(hi + v, k, p_hi);
    if (lo != nullptr) {
      const __m512 hi_f = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(p_hi), 16));
      const __m256i p_lo = bits_of(_mm512_cvtneps_pbh(_mm512_sub_ps(p, hi_f)));
      _mm256_mask_storeu_epi16(lo + v, k, p_lo);
    }
  }
  return sum_of(acc_lo, acc_hi);
}

CRYSTAL_AVX512_ROWS double kl_cross_sum_avx512(const float* st, const float* ss, int64_t n, float shift) {
  const __m512 sh = _mm512_set1_ps(shift);
  __m512d acc_lo = _mm512_setzero_pd(), acc_hi = _mm512_setzero_pd();
  for (int64_t v = 0; v < n; v += kLanes) {
    const __mmask16 k = tail_mask(n - v);
    const __m512 t = _mm512_maskz_loadu_ps(k, st + v), u = _mm512_maskz_loadu_ps(k, ss + v);
    const __m512 e = exp16(_mm512_sub_ps(t, sh));
    // e = 0 (a -inf teacher logit, or a lane past the row) contributes 0, not 0 * (-inf - -inf).
    const __mmask16 live = _mm512_mask_cmp_ps_mask(k, e, _mm512_setzero_ps(), _CMP_NEQ_UQ);
    add_in_double(_mm512_maskz_mul_ps(live, e, _mm512_sub_ps(t, u)), &acc_lo, &acc_hi);
  }
  return sum_of(acc_lo, acc_hi);
}

CRYSTAL_AVX512_ROWS void prob_difference_to_bf16_avx512(const float* ss, const float* st, int64_t n,
                                                         float lse_s, float lse_t, at::BFloat16* d) {
  const __m512 ls = _mm512_set1_ps(lse_s), lt = _mm512_set1_ps(lse_t);
  for (int64_t v = 0; v < n; v += kLanes) {
    const __mmask16 k = tail_mask(n - v);
    const __m512 ps = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, ss + v), ls));
    const __m512 pt = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, st + v), lt));
    _mm256_mask_storeu_epi16(d + v, k, bits_of(_mm512_cvtneps_pbh(_mm512_sub_ps(ps, pt))));
  }
}

CRYSTAL_AVX512_ROWS void exp_avx512(const float* x, float* y, int64_t n) {
  for (int64_t v = 0; v < n; v += kLanes) {
    const __mmask16 k = tail_mask(n - v);
    _mm512_mask_storeu_ps(y + v, k, exp16(_mm512_maskz_loadu_ps(k, x + v)));
  }
}

}  // namespace
#endif

float max_of(const float* s, int64_t n, float init) {
#if CRYSTAL_HAVE_SIMD_ROWS
  return max_of_avx512(s, n, init);
#else
  TORCH_CHECK(false, "cpu_rows: built without the AVX-512 passes");
#endif
}

double exp_to_bf16(const float* s, int64_t n, float shift, at::BFloat16* hi, at::BFloat16* lo) {
#if CRYSTAL_HAVE_SIMD_ROWS
  return exp_to_bf16_avx512(s, n, shift, hi, lo);
#else
  TORCH_CHECK(false, "cpu_rows: built without the AVX-512 passes");
#endif
}

double kl_cross_sum(const float* st, const float* ss, int64_t n, float shift) {
#if CRYSTAL_HAVE_SIMD_ROWS
  return kl_cross_sum_avx512(st, ss, n, shift);
#else
  TORCH_CHECK(false, "cpu_rows: built without the AVX-512 passes");
#endif
}

void prob_difference_to_bf16(const float* ss, const float* st, int64_t n, float lse_s, float lse_t,
                             at::BFloat16* d) {
#if CRYSTAL_HAVE_SIMD_ROWS
  prob_difference_to_bf16_avx512(ss, st, n, lse_s, lse_t, d);
#else
  TORCH_CHECK(false, "cpu_rows: built without the AVX-512 passes");
#endif
}

at::Tensor exp_for_tests(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), "cpu_rows: x must be a float32 CPU tensor");
  TORCH_CHECK(available(), "cpu_rows: this CPU has no AVX512-BF16 (or CRYSTAL_EXT_CPU_SIMD_ROWS=0)");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
#if CRYSTAL_HAVE_SIMD_ROWS
  exp_avx512(xc.data_ptr<float>(), y.data_ptr<float>(), xc.numel());
#endif
  return y;
}

}  // namespace cpu_rows
}  // namespace crystal_ext
