// RMSNorm forward and backward on the CPU (crystal_ext/ops/rms_norm.py), in the order of
// transformers' Llama / Qwen2 RMSNorm:
//   n = x * rstd,  rstd = 1 / sqrt(mean(x^2) + eps)     (in the accumulate type)
//   y = round(w * round(n))                               (round: to x's dtype)
// The backward treats the roundings as the identity, as autograd does:
//   dw = sum over rows of g * round(n),  dx = rstd * (g w - n * mean(g w n)).
// Each row is read once per direction; torch's composite norm makes about ten passes over the
// [rows, H] activations (fp32 copies, pow, mean, two products, and their gradients), which on
// the development CPU cost more than the step's attention forward (a Qwen-7B row block of
// 787 x 3584 bf16: 15 ms forward + backward against 2-3 ms here).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "rms_norm_checks.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CRYSTAL_HAVE_RMS_SIMD 1
#include <immintrin.h>
#define CRYSTAL_RMS_AVX512 __attribute__((target("avx512f,avx512bw")))
#else
#define CRYSTAL_HAVE_RMS_SIMD 0
#endif

namespace crystal_ext {
namespace rms_norm {
namespace {

// Rows per task: enough for two threads to split a short sequence, few enough to keep a
// thread's rows of x in its caches between the two loops of a row.
constexpr int64_t kRowGrain = 8;

template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

// The generic kernels (every dtype; the bf16 SIMD kernels below do the same in 16 lanes).
template <typename scalar_t>
void forward_rows(const scalar_t* x, const scalar_t* w, scalar_t* y, acc_t<scalar_t>* rstd,
                  int64_t begin, int64_t end, int64_t h, double eps) {
  using acc = acc_t<scalar_t>;
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* xr = x + r * h;
    acc squares = 0;
    for (int64_t i = 0; i < h; ++i) squares += acc(xr[i]) * acc(xr[i]);
    const acc inv = acc(1) / std::sqrt(squares / acc(h) + acc(eps));
    rstd[r] = inv;
    scalar_t* yr = y + r * h;
    for (int64_t i = 0; i < h; ++i) yr[i] = scalar_t(acc(w[i]) * acc(scalar_t(acc(xr[i]) * inv)));
  }
}

template <typename scalar_t>
void backward_rows(const scalar_t* g, const scalar_t* x, const scalar_t* w,
                   const acc_t<scalar_t>* rstd, scalar_t* dx, acc_t<scalar_t>* dw, int64_t begin,
                   int64_t end, int64_t h) {
  using acc = acc_t<scalar_t>;
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* xr = x + r * h;
    const scalar_t* gr = g + r * h;
    const acc inv = rstd[r];
    acc dot = 0;
    for (int64_t i = 0; i < h; ++i) {
      const acc n = acc(xr[i]) * inv;
      dot += acc(gr[i]) * acc(w[i]) * n;
      if (dw != nullptr) dw[i] += acc(gr[i]) * acc(scalar_t(n));
    }
    const acc mean_dot = dot / acc(h);
    scalar_t* dxr = dx + r * h;
    for (int64_t i = 0; i < h; ++i) {
      const acc n = acc(xr[i]) * inv;
      dxr[i] = scalar_t(inv * (acc(gr[i]) * acc(w[i]) - n * mean_dot));
    }
  }
}

#if CRYSTAL_HAVE_RMS_SIMD
bool simd_available() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  const char* env = std::getenv("CRYSTAL_EXT_CPU_RMS_NORM_SIMD");
  return ok && (env == nullptr || std::strcmp(env, "0") != 0);
}

CRYSTAL_RMS_AVX512 inline __m512 load_bf16(const at::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// Round to nearest even, NaN to 0x7FC0: c10::BFloat16's own rounding, bit for bit.
CRYSTAL_RMS_AVX512 inline __m512 round_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  rounded = _mm512_and_si512(rounded, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC00000));
  return _mm512_castsi512_ps(rounded);
}

// v must already be a bf16 value (round_bf16): its high halves are stored.
CRYSTAL_RMS_AVX512 inline void store_bf16(at::BFloat16* p, __m512 v) {
  const __m256i half = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), half);
}

CRYSTAL_RMS_AVX512 void forward_rows_bf16(const at::BFloat16* x, const at::BFloat16* w,
                                          at::BFloat16* y, float* rstd, int64_t begin,
                                          int64_t end, int64_t h, double eps) {
  const int64_t body = h - h % 16;
  for (int64_t r = begin; r < end; ++r) {
    const at::BFloat16* xr = x + r * h;
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < body; i += 16) {
      const __m512 v = load_bf16(xr + i);
      sum = _mm512_fmadd_ps(v, v, sum);
    }
    float squares = _mm512_reduce_add_ps(sum);
    for (int64_t i = body; i < h; ++i) squares += float(xr[i]) * float(xr[i]);
    const float inv = 1.0f / std::sqrt(squares / float(h) + float(eps));
    rstd[r] = inv;
    const __m512 inv_v = _mm512_set1_ps(inv);
    at::BFloat16* yr = y + r * h;
    for (int64_t i = 0; i < body; i += 16) {
      const __m512 n = round_bf16(_mm512_mul_ps(load_bf16(xr + i), inv_v));
      store_bf16(yr + i, round_bf16(_mm512_mul_ps(load_bf16(w + i), n)));
    }
    for (int64_t i = body; i < h; ++i)
      yr[i] = at::BFloat16(float(w[i]) * float(at::BFloat16(float(xr[i]) * inv)));
  }
}

CRYSTAL_RMS_AVX512 void backward_rows_bf16(const at::BFloat16* g, const at::BFloat16* x,
                                           const at::BFloat16* w, const float* rstd,
                                           at::BFloat16* dx, float* dw, int64_t begin,
                                           int64_t end, int64_t h) {
  const int64_t body = h - h % 16;
  for (int64_t r = begin; r < end; ++r) {
    const at::BFloat16* xr = x + r * h;
    const at::BFloat16* gr = g + r * h;
    const float inv = rstd[r];
    const __m512 inv_v = _mm512_set1_ps(inv);
    __m512 dot_v = _mm512_setzero_ps();
    for (int64_t i = 0; i < body; i += 16) {
      const __m512 n = _mm512_mul_ps(load_bf16(xr + i), inv_v);
      const __m512 gv = load_bf16(gr + i);
      dot_v = _mm512_fmadd_ps(_mm512_mul_ps(gv, load_bf16(w + i)), n, dot_v);
      if (dw != nullptr)
        _mm512_storeu_ps(dw + i, _mm512_fmadd_ps(gv, round_bf16(n), _mm512_loadu_ps(dw + i)));
    }
    float dot = _mm512_reduce_add_ps(dot_v);
    for (int64_t i = body; i < h; ++i) {
      const float n = float(xr[i]) * inv;
      dot += float(gr[i]) * float(w[i]) * n;
      if (dw != nullptr) dw[i] += float(gr[i]) * float(at::BFloat16(n));
    }
    const float mean_dot = dot / float(h);
    const __m512 mean_v = _mm512_set1_ps(mean_dot);
    at::BFloat16* dxr = dx + r * h;
    for (int64_t i = 0; i < body; i += 16) {
      const __m512 n = _mm512_mul_ps(load_bf16(xr + i), inv_v);
      const __m512 gw = _mm512_mul_ps(load_bf16(gr + i), load_bf16(w + i));
      store_bf16(dxr + i, round_bf16(_mm512_mul_ps(inv_v, _mm512_fnmadd_ps(n, mean_v, gw))));
    }
    for (int64_t i = body; i < h; ++i) {
      const float n = float(xr[i]) * inv;
      dxr[i] = at::BFloat16(inv * (float(gr[i]) * float(w[i]) - n * mean_dot));
    }
  }
}
#else
bool simd_available() { return false; }
#endif

// The SIMD kernels where they run (bf16 on AVX-512), the generic ones elsewhere.
template <typename scalar_t>
void forward_fastest(const scalar_t* x, const scalar_t* w, scalar_t* y, acc_t<scalar_t>* rstd,
                     int64_t begin, int64_t end, int64_t h, double eps) {
  forward_rows<scalar_t>(x, w, y, rstd, begin, end, h, eps);
}

template <typename scalar_t>
void backward_fastest(const scalar_t* g, const scalar_t* x, const scalar_t* w,
                      const acc_t<scalar_t>* rstd, scalar_t* dx, acc_t<scalar_t>* dw,
                      int64_t begin, int64_t end, int64_t h) {
  backward_rows<scalar_t>(g, x, w, rstd, dx, dw, begin, end, h);
}

#if CRYSTAL_HAVE_RMS_SIMD
template <>
void forward_fastest<at::BFloat16>(const at::BFloat16* x, const at::BFloat16* w, at::BFloat16* y,
                                   float* rstd, int64_t begin, int64_t end, int64_t h, double eps) {
  if (simd_available()) return forward_rows_bf16(x, w, y, rstd, begin, end, h, eps);
  forward_rows<at::BFloat16>(x, w, y, rstd, begin, end, h, eps);
}

template <>
void backward_fastest<at::BFloat16>(const at::BFloat16* g, const at::BFloat16* x,
                                    const at::BFloat16* w, const float* rstd, at::BFloat16* dx,
                                    float* dw, int64_t begin, int64_t end, int64_t h) {
  if (simd_available()) return backward_rows_bf16(g, x, w, rstd, dx, dw, begin, end, h);
  backward_rows<at::BFloat16>(g, x, w, rstd, dx, dw, begin, end, h);
}
#endif

int64_t row_count(const at::Tensor& x) { return x.numel() / x.size(-1); }

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                               double eps) {
  check_forward(x, weight, eps);
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const int64_t h = x.size(-1), rows = row_count(x);
  at::Tensor y = at::empty_like(xc);
  at::Tensor rstd = at::empty(x.sizes().slice(0, x.dim() - 1),
                              x.options().dtype(accumulate_dtype(x.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_fwd", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* wp = wc.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    acc* rp = rstd.data_ptr<acc>();
    at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
      forward_fastest(xp, wp, yp, rp, begin, end, h, eps);
    });
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                                const at::Tensor& weight, const at::Tensor& rstd,
                                                bool weight_grad) {
  check_backward(grad_y, x, weight, rstd);
  const at::Tensor gc = grad_y.contiguous(), xc = x.contiguous(), wc = weight.contiguous();
  const at::Tensor rc = rstd.contiguous();
  const int64_t h = x.size(-1), rows = row_count(x);
  at::Tensor dx = at::empty_like(xc);
  // The weight's gradient: one fp32 (fp64) partial per chunk of rows, summed in chunk order, so
  // the result does not depend on which thread ran which chunk.
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows));
  const auto acc_type = accumulate_dtype(x.scalar_type());
  at::Tensor partial = weight_grad ? at::zeros({chunks, h}, x.options().dtype(acc_type))
                                   : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_bwd", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* wp = wc.data_ptr<scalar_t>();
    const acc* rp = rc.data_ptr<acc>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    acc* pp = weight_grad ? partial.data_ptr<acc>() : nullptr;
    const int64_t per_chunk = (rows + chunks - 1) / chunks;
    at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
      for (int64_t c = chunk_begin; c < chunk_end; ++c) {
        const int64_t begin = c * per_chunk, end = std::min(rows, begin + per_chunk);
        acc* dw = pp == nullptr ? nullptr : pp + c * h;
        backward_fastest(gp, xp, wp, rp, dxp, dw, begin, end, h);
      }
    });
  });
  at::Tensor grad_weight = weight_grad ? partial.sum(0).to(weight.scalar_type())
                                       : at::empty({0}, weight.options());
  return {dx, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(crystal_ext, CPU, m) {
  m.impl("rms_norm_fwd", &forward_cpu);
  m.impl("rms_norm_bwd", &backward_cpu);
}

}  // namespace rms_norm
}  // namespace crystal_ext
