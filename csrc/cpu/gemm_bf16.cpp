// bf16 x bf16 -> fp32 GEMM with AVX512-BF16 (see gemm_bf16.h for why it exists).
//
// Only the kernel functions are compiled for AVX512-BF16 (function target attributes), so the
// rest of the extension runs on any x86-64 CPU; bf16_gemm_available() checks the CPU at run
// time before anything calls them. Where the CPU has AMX, the same packed panels go through
// ATen's oneDNN brgemm ukernel instead (see amx_available()).
#include "gemm_bf16.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/Utils.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <utility>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CRYSTAL_HAVE_BF16_GEMM 1
#include <cpuid.h>
#include <immintrin.h>
#define CRYSTAL_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define CRYSTAL_AVX512BW __attribute__((target("avx512f,avx512bw")))
#else
#define CRYSTAL_HAVE_BF16_GEMM 0
#endif

#if CRYSTAL_HAVE_BF16_GEMM
// MKL's bf16 GEMM (the LP64 CBLAS interface: 32-bit ints, CblasRowMajor = 101, CblasNoTrans =
// 111, CblasTrans = 112). Declared weak: a libtorch_cpu built without MKL leaves it null, and
// mkl_gemm_available() is then false.
extern "C" void cblas_gemm_bf16bf16f32(int layout, int trans_a, int trans_b, int m, int n, int k,
                                       float alpha, const uint16_t* a, int lda, const uint16_t* b,
                                       int ldb, float beta, float* c, int ldc) __attribute__((weak));
#endif

namespace crystal_ext {
namespace cpu_gemm {

bool bf16_gemm_available() {
#if CRYSTAL_HAVE_BF16_GEMM
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}

bool amx_available() {
#if CRYSTAL_HAVE_BF16_GEMM
  static const bool ok = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    const bool amx_bf16 = (edx >> 22) & 1u, amx_tile = (edx >> 24) & 1u;
    // init_amx asks Linux for the tile state; without it the first tile instruction faults.
    return amx_bf16 && amx_tile && bf16_gemm_available() && at::cpu::init_amx();
  }();
  const char* env = std::getenv("CRYSTAL_EXT_CPU_AMX");
  return ok && (env == nullptr || std::strcmp(env, "0") != 0);
#else
  return false;
#endif
}

bool simd_pack_available() {
#if CRYSTAL_HAVE_BF16_GEMM
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  const char* env = std::getenv("CRYSTAL_EXT_CPU_SIMD_PACK");
  return ok && (env == nullptr || std::strcmp(env, "0") != 0);
#else
  return false;
#endif
}

bool mkl_gemm_available() {
#if CRYSTAL_HAVE_BF16_GEMM
  const char* env = std::getenv("CRYSTAL_EXT_CPU_MKL_GEMM");
  return cblas_gemm_bf16bf16f32 != nullptr && amx_available() &&
         (env == nullptr || std::strcmp(env, "0") != 0);
#else
  return false;
#endif
}

namespace {

constexpr int64_t kRows = 14;     // rows of C per micro-kernel call: 14 x 2 accumulators
// k-pairs per pass over c. One pass for the logits GEMM (k = hidden size): C is then written
// once instead of read and written per k block, which measured 25% faster at k = 896 than
// 128-pair blocks; a kPairBlock-pair micro-panel of B (up to 512 KB) stays in a 1-2 MB L2.
constexpr int64_t kPairBlock = 4096;
// Rows of A per brgemm call on the AMX path: 64 rows of a k = 3584 A (450 KB) stay in L2 while
// the thread's panels stream past them; measured faster than 32 (fewer, longer tile loops).
constexpr int64_t kAmxRows = 64;

// Buffers that AMX tiles load or store: 64-byte aligned, so that a tile row (64 bytes) is one
// cache line. std::vector's own memory is only 16-byte aligned: with the deferred pack's panels
// there, the LM-head op's logits GEMM (205 rows, 7B widths, 2 threads) took 0.21-0.25 s in some
// processes and 0.15 s in others, by where malloc put the buffer; 64-byte aligned, 0.15 s in each.
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(size_t n) {
    void* p = std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64);
    if (p == nullptr) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { std::free(p); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};
template <typename T>
using TileBuffer = std::vector<T, CacheLineAllocator<T>>;

void check_bf16_matrix(const at::Tensor& w, const char* what) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.is_contiguous() &&
                  w.device().is_cpu(),
              "cpu_gemm: ", what, " must be a contiguous 2-D bf16 CPU tensor, got ",
              w.scalar_type(), " ", w.sizes());
}

// The pack of w^T is deferred to the GEMM (see PackedB) when the GEMM will run on AMX tiles
// and the vector packs are there to pack panels on the way. The pack of w is not: a group of
// panels of w is a narrow column strip of every row of w, and reading it strip by strip
// measured 2x slower than the eager pack's walk along the rows (perf, 60 rows, 7B widths).
bool defer_pack() {
  const char* env = std::getenv("CRYSTAL_EXT_CPU_PACK_IN_GEMM");
  return simd_pack_available() && amx_available() && (env == nullptr || std::strcmp(env, "0") != 0);
}

// Sets out's shape; returns true when the pack is deferred (out->source = w), false when the
// caller must fill out->data (allocated here, reused when large enough).
bool shape_packed(PackedB* out, const at::Tensor& w, int64_t k, int64_t n, bool transposed) {
  out->k = k;
  out->n = n;
  out->k_pairs = (k + 1) / 2;
  out->n_panels = (n + kPanel - 1) / kPanel;
  out->source_transposed = transposed;
  // B = w goes to MKL; B = w^T keeps our deferred pack: with MKL for both, the op measured no
  // faster at 781 rows and 1.08x slower at 61 (7B widths, one thread).
  out->for_mkl = !transposed && mkl_gemm_available();
  if (out->for_mkl || (transposed && defer_pack())) {
    out->source = w;
    return true;
  }
  out->source = at::Tensor();
  const int64_t need = out->n_panels * out->k_pairs * kPanel * 2;
  if (!out->data.defined() || out->data.numel() < need) {
    out->data = at::empty({need}, at::TensorOptions().dtype(at::kBFloat16));
  }
  return false;
}

}  // namespace

// Panel j, pair p, column c: {B[2p][32j + c], B[2p + 1][32j + c]} at
// data[((j * k_pairs + p) * kPanel + c) * 2 + {0, 1}].
namespace {

// The packs move bf16 values and nothing else, so the vector and scalar packs write the same
// bits and the GEMM's results do not depend on which one ran.

// B = w^T for w [n, k]: B[kk][col] = w[col][kk], so a k-pair of one column is two adjacent
// values of a row of w and a panel is a transpose of 32-bit words.
void pack_transposed_scalar(const uint16_t* src, uint16_t* dst, int64_t n, int64_t k,
                            int64_t kp, int64_t n_panels) {
  at::parallel_for(0, n_panels, 1, [&](int64_t jb, int64_t je) {
    for (int64_t j = jb; j < je; ++j) {
      uint16_t* panel = dst + j * kp * kPanel * 2;
      for (int64_t c = 0; c < kPanel; ++c) {
        const int64_t col = j * kPanel + c;
        if (col >= n) {
          for (int64_t p = 0; p < kp; ++p) panel[(p * kPanel + c) * 2] = panel[(p * kPanel + c) * 2 + 1] = 0;
          continue;
        }
        const uint16_t* row = src + col * k;
        for (int64_t p = 0; p < k / 2; ++p) {
          std::memcpy(panel + (p * kPanel + c) * 2, row + 2 * p, 2 * sizeof(uint16_t));
        }
        if (k % 2) {
          panel[((kp - 1) * kPanel + c) * 2] = row[k - 1];
          panel[((kp - 1) * kPanel + c) * 2 + 1] = 0;
        }
      }
    }
  });
}

// B = w for w [k, n]: a k-pair interleaves two rows of w.
void pack_scalar(const uint16_t* src, uint16_t* dst, int64_t n, int64_t k, int64_t kp,
                 int64_t n_panels) {
  at::parallel_for(0, n_panels * kp, 64, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) {
      const int64_t j = t / kp, p = t % kp;
      uint16_t* dst_pair = dst + (j * kp + p) * kPanel * 2;
      const uint16_t* r0 = src + (2 * p) * n;
      const uint16_t* r1 = 2 * p + 1 < k ? src + (2 * p + 1) * n : nullptr;
      for (int64_t c = 0; c < kPanel; ++c) {
        const int64_t col = j * kPanel + c;
        const bool in = col < n;
        dst_pair[2 * c] = in ? r0[col] : 0;
        dst_pair[2 * c + 1] = in && r1 != nullptr ? r1[col] : 0;
      }
    }
  });
}

#if CRYSTAL_HAVE_BF16_GEMM
// r[i] holds row i of a 16 x 16 matrix of 32-bit words; afterwards r[i] holds column i. Two
// rounds of in-lane unpacks leave column 4L + q of rows 4g..4g+3 in lane L of r[4g + q]; two
// rounds of lane shuffles gather lane L of r[0 + q], r[4 + q], r[8 + q], r[12 + q].
CRYSTAL_AVX512BW inline void transpose_16x16_words(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int q = 0; q < 4; ++q) {
    t[q] = _mm512_shuffle_i32x4(r[q], r[4 + q], 0x88);       // lanes 0, 2
    t[4 + q] = _mm512_shuffle_i32x4(r[q], r[4 + q], 0xdd);   // lanes 1, 3
    t[8 + q] = _mm512_shuffle_i32x4(r[8 + q], r[12 + q], 0x88);
    t[12 + q] = _mm512_shuffle_i32x4(r[8 + q], r[12 + q], 0xdd);
  }
  for (int q = 0; q < 4; ++q) {
    r[q] = _mm512_shuffle_i32x4(t[q], t[8 + q], 0x88);
    r[8 + q] = _mm512_shuffle_i32x4(t[q], t[8 + q], 0xdd);
    r[4 + q] = _mm512_shuffle_i32x4(t[4 + q], t[12 + q], 0x88);
    r[12 + q] = _mm512_shuffle_i32x4(t[4 + q], t[12 + q], 0xdd);
  }
}

// The transposed pack of pairs [p_begin, p_end) of panel j into out (pair p at
// out[(p - p_begin) * kPanel * 2]), in 16 x 16 word tiles: 16 rows of w (columns of B) x 16
// k-pairs are loaded (masked at the last pairs, zeros past row n), transposed, and stored as
// 16 runs of 16 words. The panel's 32 rows of w are read front to back together.
CRYSTAL_AVX512BW void pack_transposed_panel_avx512(const uint16_t* src, int64_t n, int64_t k,
                                                   int64_t j, int64_t p_begin, int64_t p_end,
                                                   uint16_t* out) {
  const int64_t full = std::min(p_end, k / 2);  // pairs with two values of w
  __m512i r[16];
  for (int64_t p0 = p_begin; p0 < full; p0 += 16) {
    const int64_t cnt = std::min<int64_t>(16, full - p0);
    const __mmask16 mask = cnt == 16 ? __mmask16(0xFFFF) : __mmask16((1u << cnt) - 1);
    for (int64_t c0 = 0; c0 < kPanel; c0 += 16) {
      for (int i = 0; i < 16; ++i) {
        const int64_t col = j * kPanel + c0 + i;
        r[i] = col < n ? _mm512_maskz_loadu_epi32(mask, src + col * k + 2 * p0)
                       : _mm512_setzero_si512();
      }
      transpose_16x16_words(r);
      for (int64_t i = 0; i < cnt; ++i)
        _mm512_storeu_si512(out + ((p0 - p_begin + i) * kPanel + c0) * 2, r[i]);
    }
  }
  if (k % 2 && p_end == (k + 1) / 2) {  // an odd k's last pair: {w[col][k - 1], 0}
    uint16_t* pair = out + (p_end - 1 - p_begin) * kPanel * 2;
    for (int64_t c = 0; c < kPanel; ++c) {
      const int64_t col = j * kPanel + c;
      pair[2 * c] = col < n ? src[col * k + k - 1] : 0;
      pair[2 * c + 1] = 0;
    }
  }
}

void pack_transposed_avx512(const uint16_t* src, uint16_t* dst, int64_t n, int64_t k, int64_t kp,
                            int64_t n_panels) {
  at::parallel_for(0, n_panels, 1, [&](int64_t jb, int64_t je) {
    for (int64_t j = jb; j < je; ++j)
      pack_transposed_panel_avx512(src, n, k, j, 0, kp, dst + j * kp * kPanel * 2);
  });
}

// The two-source permute indices of pack_pairs_avx512: output value i is row (i & 1) of the
// pair, column i / 2 (of the panel's first 16 columns for lo, its last 16 for hi). Built once:
// the few-rows GEMM calls the pack once per pair of rows.
constexpr std::array<uint16_t, 32> interleave_indices(int first_column) {
  std::array<uint16_t, 32> idx{};
  for (int i = 0; i < 32; ++i) idx[i] = uint16_t(first_column + i / 2 + (i & 1) * 32);
  return idx;
}
alignas(64) constexpr std::array<uint16_t, 32> kInterleaveLoTable = interleave_indices(0);
alignas(64) constexpr std::array<uint16_t, 32> kInterleaveHiTable = interleave_indices(16);
const void* const kInterleaveLo = kInterleaveLoTable.data();
const void* const kInterleaveHi = kInterleaveHiTable.data();

// The straight pack of pairs [p_begin, p_end) of panels [j_begin, j_end) into out (panel j,
// pair p at out[((j - j_begin) * stride + p - p_begin) * kPanel * 2]): for each pair of rows of
// w and each panel, 32 values of both rows (masked past column n) are interleaved with one
// two-source permute per 32 output values; the rows are walked front to back.
CRYSTAL_AVX512BW void pack_pairs_avx512(const uint16_t* src, int64_t n, int64_t k, int64_t j_begin,
                                        int64_t j_end, int64_t p_begin, int64_t p_end,
                                        uint16_t* out, int64_t stride) {
  const __m512i idx_lo = _mm512_load_si512(kInterleaveLo), idx_hi = _mm512_load_si512(kInterleaveHi);
  for (int64_t j = j_begin; j < j_end; ++j) {
    const int64_t cnt = std::min(kPanel, n - j * kPanel);
    const __mmask32 mask = cnt == 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << cnt) - 1);
    for (int64_t p = p_begin; p < p_end; ++p) {
      const __m512i r0 = _mm512_maskz_loadu_epi16(mask, src + (2 * p) * n + j * kPanel);
      const __m512i r1 = 2 * p + 1 < k
                             ? _mm512_maskz_loadu_epi16(mask, src + (2 * p + 1) * n + j * kPanel)
                             : _mm512_setzero_si512();
      uint16_t* dst_pair = out + ((j - j_begin) * stride + p - p_begin) * kPanel * 2;
      _mm512_storeu_si512(dst_pair, _mm512_permutex2var_epi16(r0, idx_lo, r1));
      _mm512_storeu_si512(dst_pair + 32, _mm512_permutex2var_epi16(r0, idx_hi, r1));
    }
  }
}

void pack_avx512(const uint16_t* src, uint16_t* dst, int64_t n, int64_t k, int64_t kp,
                 int64_t n_panels) {
  constexpr int64_t kPairsPerTask = 8;  // 16 rows of w: 16 read streams, 1 KB runs written
  at::parallel_for(0, (kp + kPairsPerTask - 1) / kPairsPerTask, 1, [&](int64_t tb, int64_t te) {
    const int64_t p_begin = tb * kPairsPerTask, p_end = std::min(kp, te * kPairsPerTask);
    pack_pairs_avx512(src, n, k, 0, n_panels, p_begin, p_end, dst + p_begin * kPanel * 2, kp);
  });
}

// Pairs [p_begin, p_end) of panels [j_begin, j_end) of a deferred B into out, panel j at
// out + (j - j_begin) * (p_end - p_begin) * kPanel * 2 (the layout brgemm reads).
void pack_panels(const PackedB& b, int64_t j_begin, int64_t j_end, int64_t p_begin, int64_t p_end,
                 uint16_t* out) {
  const uint16_t* src = reinterpret_cast<const uint16_t*>(b.source.data_ptr<at::BFloat16>());
  const int64_t pairs = p_end - p_begin;
  if (b.source_transposed) {
    for (int64_t j = j_begin; j < j_end; ++j)
      pack_transposed_panel_avx512(src, b.n, b.k, j, p_begin, p_end,
                                   out + (j - j_begin) * pairs * kPanel * 2);
  } else {
    pack_pairs_avx512(src, b.n, b.k, j_begin, j_end, p_begin, p_end, out, pairs);
  }
}

// The eager pack of a deferred B (the GEMM runs without AMX after all).
void pack_eagerly(const PackedB& b, PackedB* out) {
  *out = b;
  out->source = at::Tensor();
  out->data = at::empty({b.n_panels * b.k_pairs * kPanel * 2}, at::TensorOptions().dtype(at::kBFloat16));
  pack_panels(b, 0, b.n_panels, 0, b.k_pairs, reinterpret_cast<uint16_t*>(out->data.data_ptr<at::BFloat16>()));
}
#endif

}  // namespace

void pack_transposed_into(const at::Tensor& w, PackedB* out) {
  check_bf16_matrix(w, "w");
  const int64_t n = w.size(0), k = w.size(1);
  if (shape_packed(out, w, k, n, /*transposed=*/true)) return;
  const uint16_t* src = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  uint16_t* dst = reinterpret_cast<uint16_t*>(out->data.data_ptr<at::BFloat16>());
#if CRYSTAL_HAVE_BF16_GEMM
  if (simd_pack_available()) {
    pack_transposed_avx512(src, dst, n, k, out->k_pairs, out->n_panels);
    return;
  }
#endif
  pack_transposed_scalar(src, dst, n, k, out->k_pairs, out->n_panels);
}

void pack_into(const at::Tensor& w, PackedB* out) {
  check_bf16_matrix(w, "w");
  const int64_t k = w.size(0), n = w.size(1);
  if (shape_packed(out, w, k, n, /*transposed=*/false)) return;
  const uint16_t* src = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  uint16_t* dst = reinterpret_cast<uint16_t*>(out->data.data_ptr<at::BFloat16>());
#if CRYSTAL_HAVE_BF16_GEMM
  if (simd_pack_available()) {
    pack_avx512(src, dst, n, k, out->k_pairs, out->n_panels);
    return;
  }
#endif
  pack_scalar(src, dst, n, k, out->k_pairs, out->n_panels);
}

PackedB pack_transposed(const at::Tensor& w) {
  PackedB out;
  pack_transposed_into(w, &out);
  return out;
}

PackedB pack(const at::Tensor& w) {
  PackedB out;
  pack_into(w, &out);
  return out;
}

int64_t operand_lda(int64_t k) {
  const int64_t even = k + (k % 2);
  // A row stride that is a multiple of 2 KB puts the 14 rows one micro-kernel broadcasts from
  // in two L1 sets (8-way): measured 61 ms instead of 47 ms for a [708 x 8192] A.
  return (even * 2) % 2048 == 0 ? even + 32 : even;
}

at::Tensor a_operand(const at::Tensor& a) {
  TORCH_CHECK(a.dim() == 2 && a.scalar_type() == at::kBFloat16,
              "cpu_gemm: a_operand needs a 2-D bf16 tensor");
  const int64_t k = a.size(1), lda = operand_lda(k);
  at::Tensor out = at::empty({a.size(0), lda}, a.options());
  out.narrow(1, 0, k).copy_(a);
  if (lda > k) out.narrow(1, k, lda - k).zero_();
  return out;
}

at::Tensor transposed_a_operand(const at::Tensor& d) {
  TORCH_CHECK(d.dim() == 2 && d.scalar_type() == at::kFloat && d.is_contiguous(),
              "cpu_gemm: transposed_a_operand needs a contiguous 2-D float32 tensor");
  const int64_t k = d.size(0), m = d.size(1), lda = operand_lda(k);
  at::Tensor out = at::empty({m, lda}, d.options().dtype(at::kBFloat16));
  const float* src = d.data_ptr<float>();
  at::BFloat16* dst = out.data_ptr<at::BFloat16>();
  constexpr int64_t kTile = 32;  // a 32 x 32 tile: 4 KB read, 2 KB written, both in L1
  at::parallel_for(0, (m + kTile - 1) / kTile, 1, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) {
      const int64_t i0 = t * kTile, i1 = std::min(m, i0 + kTile);
      for (int64_t j0 = 0; j0 < k; j0 += kTile) {
        const int64_t j1 = std::min(k, j0 + kTile);
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t j = j0; j < j1; ++j) dst[i * lda + j] = at::BFloat16(src[j * m + i]);
      }
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = k; j < lda; ++j) dst[i * lda + j] = at::BFloat16(0.0f);
    }
  });
  return out;
}

#if CRYSTAL_HAVE_BF16_GEMM
namespace {

// c[rows, cols <= 32] (+)= a[rows, 2 * pairs] * panel[pairs][32][2].
template <int kR>
CRYSTAL_AVX512BF16 void micro_kernel(const uint16_t* a, int64_t lda, const uint16_t* panel,
                                     int64_t pairs, float* c, int64_t ldc, int64_t cols,
                                     bool accumulate) {
  __m512 acc0[kR], acc1[kR];
  for (int i = 0; i < kR; ++i) {
    acc0[i] = _mm512_setzero_ps();
    acc1[i] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(panel + p * kPanel * 2);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(panel + p * kPanel * 2 + 32);
    for (int i = 0; i < kR; ++i) {
      int32_t pair;
      std::memcpy(&pair, a + i * lda + 2 * p, sizeof(pair));
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
      acc0[i] = _mm512_dpbf16_ps(acc0[i], av, b0);
      acc1[i] = _mm512_dpbf16_ps(acc1[i], av, b1);
    }
  }
  const __mmask16 m0 = cols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cols) - 1);
  const __mmask16 m1 = cols >= 32   ? __mmask16(0xFFFF)
                       : cols > 16 ? __mmask16((1u << (cols - 16)) - 1)
                                   : __mmask16(0);
  for (int i = 0; i < kR; ++i) {
    float* row = c + i * ldc;
    if (accumulate) {
      acc0[i] = _mm512_add_ps(acc0[i], _mm512_maskz_loadu_ps(m0, row));
      acc1[i] = _mm512_add_ps(acc1[i], _mm512_maskz_loadu_ps(m1, row + 16));
    }
    _mm512_mask_storeu_ps(row, m0, acc0[i]);
    _mm512_mask_storeu_ps(row + 16, m1, acc1[i]);
  }
}

using MicroKernel = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, float*, int64_t,
                             int64_t, bool);

template <int... R>
constexpr std::array<MicroKernel, sizeof...(R)> kernels_for(std::integer_sequence<int, R...>) {
  return {&micro_kernel<R + 1>...};
}

// kernel_for_rows[r - 1] handles r rows (1 <= r <= kRows).
constexpr auto kernel_for_rows = kernels_for(std::make_integer_sequence<int, kRows>{});

// The AMX path: a panel is [pairs][kPanel][2] bf16, the VNNI layout brgemm reads as a
// [2 * pairs x kPanel] B with ld_b = kPanel. Row blocks of A outside, the thread's panels
// inside, so a block of A is read from L2 once per panel; each thread writes only its panels'
// columns of c.
void gemm_amx(const at::BFloat16* a, int64_t lda, int64_t m, const PackedB& b, float* c,
              int64_t ldc, bool accumulate) {
  const at::BFloat16* data = b.data.data_ptr<at::BFloat16>();
  at::parallel_for(0, b.n_panels, 1, [&](int64_t jb, int64_t je) {
    for (int64_t pass = 0; pass * kPairBlock < b.k_pairs; ++pass) {
      const int64_t p0 = pass * kPairBlock, pairs = std::min(kPairBlock, b.k_pairs - p0);
      const bool add = accumulate || pass > 0;
      for (int64_t i0 = 0; i0 < m; i0 += kAmxRows) {
        const int64_t rows = std::min(kAmxRows, m - i0);
        for (int64_t j = jb; j < je; ++j) {
          const int64_t cols = std::min(kPanel, b.n - j * kPanel);
          at::native::cpublas::brgemm(rows, cols, 2 * pairs, lda, kPanel, ldc, add,
                                      a + i0 * lda + 2 * p0, data + (j * b.k_pairs + p0) * kPanel * 2,
                                      c + i0 * ldc + j * kPanel);
        }
      }
    }
    at::native::cpublas::brgemm_release();
  });
}

// The AMX path on a deferred B: each thread packs kGroupPanels panels (one k pass of them,
// about 0.9 MB at k = 3584) into its own buffer and runs every row block of A over them
// before the next group, so the buffer is read from L2. A itself is read again for every group,
// from L2 while it fits there and from L3 / memory beyond; still, with the buffers 64-byte
// aligned (TileBuffer) this path beat MKL's GEMM on the same B = w^T at every size measured
// (7B widths, a quarter of the vocabulary in blocks, 2 threads): 525 rows 0.081 vs 0.096 s, 781
// rows 0.111 vs 0.137 s, 1,500 rows 0.201 vs 0.252 s, 3,000 rows 0.448 vs 0.520 s; the LM-head op
// at |E| = 384 (781 logit rows) 1.03-1.09 vs 1.12-1.15 s.
constexpr int64_t kGroupPanels = 4;
void gemm_amx_deferred(const at::BFloat16* a, int64_t lda, int64_t m, const PackedB& b, float* c,
                       int64_t ldc, bool accumulate) {
  const int64_t groups = (b.n_panels + kGroupPanels - 1) / kGroupPanels;
  at::parallel_for(0, groups, 1, [&](int64_t gb, int64_t ge) {
    TileBuffer<uint16_t> buf(kGroupPanels * std::min(kPairBlock, b.k_pairs) * kPanel * 2);
    const at::BFloat16* panels = reinterpret_cast<const at::BFloat16*>(buf.data());
    for (int64_t g = gb; g < ge; ++g) {
      const int64_t j0 = g * kGroupPanels, j1 = std::min(b.n_panels, j0 + kGroupPanels);
      int64_t pairs = 0;
      for (int64_t p0 = 0; p0 < b.k_pairs; p0 += pairs) {
        pairs = std::min(kPairBlock, b.k_pairs - p0);
        pack_panels(b, j0, j1, p0, p0 + pairs, buf.data());
        const bool add = accumulate || p0 > 0;
        for (int64_t i0 = 0; i0 < m; i0 += kAmxRows) {
          const int64_t rows = std::min(kAmxRows, m - i0);
          for (int64_t j = j0; j < j1; ++j) {
            const int64_t cols = std::min(kPanel, b.n - j * kPanel);
            at::native::cpublas::brgemm(rows, cols, 2 * pairs, lda, kPanel, ldc, add,
                                        a + i0 * lda + 2 * p0, panels + (j - j0) * pairs * kPanel * 2,
                                        c + i0 * ldc + j * kPanel);
          }
        }
      }
    }
    at::native::cpublas::brgemm_release();
  });
}

// The AMX path for B = w with up to kKOuterRows rows of A, k-block outer: each thread packs its
// columns of kKOuterPairs pairs of w's rows (two row runs per pair, read once) into its buffer
// and runs every row of A over them before the next k-block, so w streams past once and nothing
// but this pack copies it. MKL's GEMM copies the whole block of w before the product, and at few
// rows that copy costs more than the product (perf at 61 rows, 7B widths: MKL's copy 51% of the
// LM-head op's samples, its AMX kernel 16%). P W over the 7B vocabulary with the op's hi + lo
// rows, here vs MKL: 2 threads, 61 + 48 rows 0.17 vs 0.31 s, 96 + 72 0.29 vs 0.32 s, 128 + 96
// 0.35 vs 0.34 s, 205 + 192 0.60 vs 0.43 s (1 thread: 0.57 vs 0.78 s; with two threads each
// reads half of every row of w). A second A (a2, m2 rows, same lda) adds into c's first m2 rows
// from the same packed panels: the LM-head op's lo parts of P, which MKL copies w again for.
constexpr int64_t kFewRows = 64, kKOuterRows = 96, kKOuterPairs = 128;
// Panels per brgemm call: one call spans kGroupPanelsKOuter panels ([pairs][kGroupPanelsKOuter
// * kPanel][2] in the buffer), as a call per 32-column panel spent more in the calls than in
// the tiles at 61 rows.
constexpr int64_t kGroupPanelsKOuter = 8;

// Pair p of w's rows, panels [j_begin, j_end), into the k-outer buffer: panel j's 64 values at
// group (j - j_begin) / kGroupPanelsKOuter, row p - p0 of that group's [pairs][group width][2].
CRYSTAL_AVX512BW void pack_pair_grouped(const uint16_t* src, int64_t n, int64_t k, int64_t p,
                                        int64_t j_begin, int64_t j_end, int64_t p0, int64_t pairs,
                                        uint16_t* out) {
  const __m512i idx_lo = _mm512_load_si512(kInterleaveLo), idx_hi = _mm512_load_si512(kInterleaveHi);
  const uint16_t* row0 = src + (2 * p) * n;
  const uint16_t* row1 = 2 * p + 1 < k ? src + (2 * p + 1) * n : nullptr;
  for (int64_t j = j_begin; j < j_end; ++j) {
    const int64_t cnt = std::min(kPanel, n - j * kPanel);
    const __mmask32 mask = cnt == 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << cnt) - 1);
    const __m512i r0 = _mm512_maskz_loadu_epi16(mask, row0 + j * kPanel);
    const __m512i r1 =
        row1 ? _mm512_maskz_loadu_epi16(mask, row1 + j * kPanel) : _mm512_setzero_si512();
    const int64_t q = j - j_begin, group = q / kGroupPanelsKOuter;
    const int64_t panel_slot = (group * pairs + p - p0) * kGroupPanelsKOuter + q % kGroupPanelsKOuter;
    uint16_t* dst = out + panel_slot * kPanel * 2;
    _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(r0, idx_lo, r1));
    _mm512_storeu_si512(dst + 32, _mm512_permutex2var_epi16(r0, idx_hi, r1));
  }
}

void gemm_amx_k_outer(const at::BFloat16* a, int64_t lda, int64_t m, const at::BFloat16* a2,
                      int64_t m2, const PackedB& b, float* c, int64_t ldc, bool accumulate) {
  const uint16_t* src = reinterpret_cast<const uint16_t*>(b.source.data_ptr<at::BFloat16>());
  const int64_t groups = (b.n_panels + kGroupPanelsKOuter - 1) / kGroupPanelsKOuter;
  at::parallel_for(0, groups, 1, [&](int64_t gb, int64_t ge) {
    const int64_t jb = gb * kGroupPanelsKOuter, je = std::min(b.n_panels, ge * kGroupPanelsKOuter);
    const int64_t width = kGroupPanelsKOuter * kPanel;  // the buffer's row of a group, in columns
    TileBuffer<uint16_t> buf((ge - gb) * std::min(kKOuterPairs, b.k_pairs) * width * 2);
    const at::BFloat16* packed = reinterpret_cast<const at::BFloat16*>(buf.data());
    for (int64_t p0 = 0; p0 < b.k_pairs; p0 += kKOuterPairs) {
      const int64_t pairs = std::min(kKOuterPairs, b.k_pairs - p0);
      for (int64_t p = p0; p < p0 + pairs; ++p)  // pair by pair: along w's rows
        pack_pair_grouped(src, b.n, b.k, p, jb, je, p0, pairs, buf.data());
      const bool add = accumulate || p0 > 0;
      for (int64_t g = gb; g < ge; ++g) {
        const int64_t col0 = g * width, cols = std::min(width, b.n - col0);
        const at::BFloat16* group = packed + (g - gb) * pairs * width * 2;
        for (int64_t i0 = 0; i0 < m; i0 += kAmxRows)
          at::native::cpublas::brgemm(std::min(kAmxRows, m - i0), cols, 2 * pairs, lda, width, ldc,
                                      add, a + i0 * lda + 2 * p0, group, c + i0 * ldc + col0);
        for (int64_t i0 = 0; i0 < m2; i0 += kAmxRows)  // the second A adds into the first rows
          at::native::cpublas::brgemm(std::min(kAmxRows, m2 - i0), cols, 2 * pairs, lda, width,
                                      ldc, /*add_C=*/true, a2 + i0 * lda + 2 * p0, group,
                                      c + i0 * ldc + col0);
      }
    }
    at::native::cpublas::brgemm_release();
  });
}

// The AMX path for B = w^T (w [n, k], k even) with few rows of A (m <= kFewRows): C^T = w a^T,
// with w itself as the tiles' A operand (its rows are k-contiguous, the layout AMX reads for
// A), so w is not packed at all; a^T (at most 64 columns) is packed into VNNI pairs once per
// call and each thread transposes its rows of C^T into c's columns. At few rows the pack of
// w^T cost as much as the tiles (perf, 61 rows, 7B widths: 14.5% of the LM-head op's samples).
constexpr int64_t kWRowsPerCall = 32;   // rows of w (columns of c) per brgemm call
constexpr int64_t kWRowsPerTask = 512;  // per parallel task: its C^T block is 128 KB in fp32

// a [m, k] (k even, row stride lda) as the B operand of C^T = w a^T: VNNI pairs [k / 2][cols][2],
// zeros past row m (cols: m rounded up to whole 16-column tiles).
TileBuffer<uint16_t> a_transposed_pairs(const at::BFloat16* a, int64_t lda, int64_t m, int64_t k,
                                        int64_t cols) {
  const uint16_t* a16 = reinterpret_cast<const uint16_t*>(a);
  TileBuffer<uint16_t> a_t(k / 2 * cols * 2, 0);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t q = 0; q < k; ++q) a_t[((q / 2) * cols + r) * 2 + q % 2] = a16[r * lda + q];
  return a_t;
}

// C^T [rows, cols] = w_rows a^T for `rows` consecutive rows of w [*, k] (k even), w's rows as the
// tiles' A operand as they lie; a_t from a_transposed_pairs.
void w_rows_times_a_t(const at::BFloat16* w_rows, int64_t rows, int64_t k,
                      const at::BFloat16* a_t, int64_t cols, float* c_t) {
  const int64_t k_pairs = k / 2;
  for (int64_t i0 = 0; i0 < rows; i0 += kWRowsPerCall) {
    const int64_t call_rows = std::min(kWRowsPerCall, rows - i0);
    int64_t pairs = 0;
    for (int64_t p0 = 0; p0 < k_pairs; p0 += pairs) {
      pairs = std::min(kPairBlock, k_pairs - p0);
      at::native::cpublas::brgemm(call_rows, cols, 2 * pairs, k, cols, cols, /*add_C=*/p0 > 0,
                                  w_rows + i0 * k + 2 * p0, a_t + p0 * cols * 2, c_t + i0 * cols);
    }
  }
}

void gemm_amx_w_as_a(const at::BFloat16* a, int64_t lda, int64_t m, const PackedB& b, float* c,
                     int64_t ldc, bool accumulate) {
  const int64_t cols = (m + 15) / 16 * 16;  // columns of C^T (rows of c), whole 16-column tiles
  const TileBuffer<uint16_t> a_t = a_transposed_pairs(a, lda, m, b.k, cols);
  const at::BFloat16* a_t_ptr = reinterpret_cast<const at::BFloat16*>(a_t.data());
  const at::BFloat16* w = b.source.data_ptr<at::BFloat16>();
  const int64_t tasks = (b.n + kWRowsPerTask - 1) / kWRowsPerTask;
  at::parallel_for(0, tasks, 1, [&](int64_t tb, int64_t te) {
    TileBuffer<float> c_t(kWRowsPerTask * cols);
    for (int64_t t = tb; t < te; ++t) {
      const int64_t v0 = t * kWRowsPerTask, rows = std::min(kWRowsPerTask, b.n - v0);
      w_rows_times_a_t(w + v0 * b.k, rows, b.k, a_t_ptr, cols, c_t.data());
      for (int64_t r = 0; r < m; ++r) {
        float* row = c + r * ldc + v0;
        if (accumulate) {
          for (int64_t i = 0; i < rows; ++i) row[i] += c_t[i * cols + r];
        } else {
          for (int64_t i = 0; i < rows; ++i) row[i] = c_t[i * cols + r];
        }
      }
    }
    at::native::cpublas::brgemm_release();
  });
}

// c (+)= a B through MKL on B as it is (b.source: w [n, k] for B = w^T, else w [k, n]).
void gemm_mkl(const at::BFloat16* a, int64_t lda, int64_t m, const PackedB& b, float* c, int64_t ldc,
              bool accumulate) {
  constexpr int64_t kIntMax = 2147483647;
  TORCH_CHECK(m <= kIntMax && b.n <= kIntMax && b.k <= kIntMax && lda <= kIntMax && ldc <= kIntMax,
              "cpu_gemm: a GEMM dimension exceeds MKL's 32-bit integers");
  const int ldb = static_cast<int>(b.source_transposed ? b.k : b.n);
  cblas_gemm_bf16bf16f32(/*CblasRowMajor*/ 101, /*CblasNoTrans*/ 111,
                         b.source_transposed ? /*CblasTrans*/ 112 : /*CblasNoTrans*/ 111,
                         static_cast<int>(m), static_cast<int>(b.n), static_cast<int>(b.k), 1.0f,
                         reinterpret_cast<const uint16_t*>(a), static_cast<int>(lda),
                         reinterpret_cast<const uint16_t*>(b.source.data_ptr<at::BFloat16>()), ldb,
                         accumulate ? 1.0f : 0.0f, c, static_cast<int>(ldc));
}

}  // namespace
#endif

void gemm_bf16_f32(const at::BFloat16* a, int64_t lda, int64_t m, const PackedB& b, float* c,
                   int64_t ldc, bool accumulate) {
  gemm_bf16_f32_two(a, lda, m, nullptr, 0, b, c, ldc, accumulate);
}

bool two_a_share_one_pass(int64_t m) {
  return m <= kKOuterRows && mkl_gemm_available() && defer_pack();
}

void gemm_bf16_f32_two(const at::BFloat16* a_in, int64_t lda, int64_t m, const at::BFloat16* a2,
                       int64_t m2, const PackedB& b, float* c, int64_t ldc, bool accumulate) {
  TORCH_CHECK(m2 >= 0 && m2 <= m, "cpu_gemm: the second A's rows ", m2, " not in [0, ", m, "]");
#if CRYSTAL_HAVE_BF16_GEMM
  TORCH_CHECK(bf16_gemm_available(), "cpu_gemm: this CPU has no AVX512-BF16");
  TORCH_CHECK(lda >= 2 * b.k_pairs, "cpu_gemm: lda ", lda, " < padded k ", 2 * b.k_pairs);
  if (m == 0 || b.n == 0) return;
  if (b.k_pairs == 0) {  // an empty sum
    if (!accumulate)
      for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + b.n, 0.0f);
    return;
  }
  const bool k_outer = b.for_mkl && two_a_share_one_pass(m);
  if (m2 > 0 && !k_outer) {  // only the k-outer product takes both A's over one pass of w
    gemm_bf16_f32(a_in, lda, m, b, c, ldc, accumulate);
    gemm_bf16_f32(a2, lda, m2, b, c, ldc, /*accumulate=*/true);
    return;
  }
  if (b.for_mkl) {
    if (k_outer) {
      gemm_amx_k_outer(a_in, lda, m, a2, m2, b, c, ldc, accumulate);
      return;
    }
    if (mkl_gemm_available()) {
      gemm_mkl(a_in, lda, m, b, c, ldc, accumulate);
      return;
    }
    // MKL turned off since B was taken: pack it now.
    const PackedB packed = b.source_transposed ? pack_transposed(b.source) : pack(b.source);
    gemm_bf16_f32(a_in, lda, m, packed, c, ldc, accumulate);
    return;
  }
  if (b.source.defined()) {
    if (amx_available() && b.source_transposed && m <= kFewRows && b.k % 2 == 0) {
      gemm_amx_w_as_a(a_in, lda, m, b, c, ldc, accumulate);
      return;
    }
    if (amx_available()) {
      gemm_amx_deferred(a_in, lda, m, b, c, ldc, accumulate);
      return;
    }
    // AMX turned off since the pack was deferred: pack now.
    PackedB eager;
    pack_eagerly(b, &eager);
    gemm_bf16_f32(a_in, lda, m, eager, c, ldc, accumulate);
    return;
  }
  if (amx_available()) {
    gemm_amx(a_in, lda, m, b, c, ldc, accumulate);
    return;
  }
  const uint16_t* a = reinterpret_cast<const uint16_t*>(a_in);
  const uint16_t* data = reinterpret_cast<const uint16_t*>(b.data.data_ptr<at::BFloat16>());
  // k in blocks of kPairBlock pairs (outer, sequential: each pass accumulates into c); the
  // column panels of one pass are split across threads, so no two threads write the same c.
  for (int64_t p0 = 0; p0 < b.k_pairs; p0 += kPairBlock) {
    const int64_t pairs = std::min(kPairBlock, b.k_pairs - p0);
    const bool acc = accumulate || p0 > 0;
    at::parallel_for(0, b.n_panels, 1, [&](int64_t jb, int64_t je) {
      for (int64_t j = jb; j < je; ++j) {
        const uint16_t* panel = data + (j * b.k_pairs + p0) * kPanel * 2;
        const int64_t cols = std::min(kPanel, b.n - j * kPanel);
        for (int64_t i0 = 0; i0 < m; i0 += kRows) {
          const int64_t rows = std::min(kRows, m - i0);
          kernel_for_rows[rows - 1](a + i0 * lda + 2 * p0, lda, panel, pairs,
                                    c + i0 * ldc + j * kPanel, ldc, cols, acc);
        }
      }
    });
  }
#else
  TORCH_CHECK(false, "cpu_gemm: built without the AVX512-BF16 kernel (not x86-64)");
#endif
}

// Rows of w per block of the sweep (459 KB at k = 3584, so that the pack of the second product
// reads them from L2). The LM-head op on inputs captured from the |E| = 96 step (7B widths, 205
// logit rows, 9 kept pairs, 2 threads, min of 10 alternated): 0.459 s with the sweep in one pass,
// 0.496 s with two GEMMs per block (the sweep about 0.075 against 0.11 s). Blocks of 32, 96, 128
// and 256 rows measured the same or slower.
constexpr int64_t kSweepBlock = 64;
// At most this many rows of a: C^T = w_blk a^T has them as its columns (tiles of 16).
constexpr int64_t kSweepRows = 128;

bool sweep_available(int64_t m, int64_t d_rows, int64_t k) {
  const char* env = std::getenv("CRYSTAL_EXT_CPU_ONE_PASS_SWEEP");
  return m > 0 && m <= kSweepRows && d_rows >= 0 && d_rows <= m && k > 0 && k % 2 == 0 &&
         amx_available() && simd_pack_available() && (env == nullptr || std::strcmp(env, "0") != 0);
}

void sweep_logits_then_product(const at::BFloat16* a, int64_t lda, int64_t m, const at::Tensor& w,
                               int64_t d_rows, const SweepFormD& form_d, float* c, int64_t ldc) {
#if CRYSTAL_HAVE_BF16_GEMM
  check_bf16_matrix(w, "w");
  const int64_t n = w.size(0), k = w.size(1);
  TORCH_CHECK(m > 0 && m <= kSweepRows, "cpu_gemm sweep: m (rows of a) must be in [1, ",
              kSweepRows, "], got ", m);
  TORCH_CHECK(d_rows >= 0 && d_rows <= m, "cpu_gemm sweep: d_rows must be in [0, m = ", m,
              "], got ", d_rows);
  TORCH_CHECK(k > 0 && k % 2 == 0, "cpu_gemm sweep: k (columns of w) must be even, got ", k);
  TORCH_CHECK(sweep_available(m, d_rows, k),
              "cpu_gemm sweep: needs AMX and the vector packs (and CRYSTAL_EXT_CPU_ONE_PASS_SWEEP "
              "not 0)");
  TORCH_CHECK(lda >= k && ldc >= k, "cpu_gemm: lda ", lda, " or ldc ", ldc, " < k ", k);
  const int64_t cols = (m + 15) / 16 * 16;
  const TileBuffer<uint16_t> a_t = a_transposed_pairs(a, lda, m, k, cols);
  const at::BFloat16* a_t_ptr = reinterpret_cast<const at::BFloat16*>(a_t.data());
  const at::BFloat16* w_ptr = w.data_ptr<at::BFloat16>();
  const uint16_t* w16 = reinterpret_cast<const uint16_t*>(w_ptr);
  const int64_t blocks = (n + kSweepBlock - 1) / kSweepBlock, ldd = operand_lda(kSweepBlock);
  const int64_t width = kGroupPanelsKOuter * kPanel, n_panels = (k + kPanel - 1) / kPanel;
  std::vector<std::pair<int64_t, TileBuffer<float>>> partials;
  std::mutex partials_mutex;
  at::parallel_for(0, blocks, 1, [&](int64_t bb, int64_t be) {
    TileBuffer<float> c_t(kSweepBlock * cols), part(d_rows * k, 0.0f);
    std::vector<float> s(m * kSweepBlock);
    TileBuffer<uint16_t> d(std::max<int64_t>(d_rows, 1) * ldd, 0);
    const int64_t n_groups = (n_panels + kGroupPanelsKOuter - 1) / kGroupPanelsKOuter;
    TileBuffer<uint16_t> packed(n_groups * (kSweepBlock / 2) * width * 2);
    at::BFloat16* d_ptr = reinterpret_cast<at::BFloat16*>(d.data());
    const at::BFloat16* packed_ptr = reinterpret_cast<const at::BFloat16*>(packed.data());
    for (int64_t blk = bb; blk < be; ++blk) {
      const int64_t v0 = blk * kSweepBlock, vb = std::min(kSweepBlock, n - v0);
      w_rows_times_a_t(w_ptr + v0 * k, vb, k, a_t_ptr, cols, c_t.data());  // C^T = w_blk a^T
      for (int64_t r = 0; r < m; ++r)
        for (int64_t i = 0; i < vb; ++i) s[r * vb + i] = c_t[i * cols + r];
      form_d(v0, vb, s.data(), d_ptr, ldd);
      const int64_t pairs = (vb + 1) / 2;
      for (int64_t r = 0; r < d_rows; ++r)  // an odd block's pad column meets a zero row of B
        for (int64_t v = vb; v < 2 * pairs; ++v) d[r * ldd + v] = 0;
      const uint16_t* src = w16 + v0 * k;  // w_blk [vb, k]: B of D w_blk, k = vb pairs deep
      for (int64_t p = 0; p < pairs; ++p)  // pair by pair, along w's rows
        pack_pair_grouped(src, k, vb, p, 0, n_panels, /*p0=*/0, pairs, packed.data());
      for (int64_t jb = 0; jb < n_panels; jb += kGroupPanelsKOuter) {
        const int64_t col0 = jb * kPanel, group_cols = std::min(width, k - col0);
        const at::BFloat16* group = packed_ptr + (jb / kGroupPanelsKOuter) * pairs * width * 2;
        for (int64_t i0 = 0; i0 < d_rows; i0 += kAmxRows)
          at::native::cpublas::brgemm(std::min(kAmxRows, d_rows - i0), group_cols, 2 * pairs, ldd,
                                      width, k, /*add_C=*/true, d_ptr + i0 * ldd, group,
                                      part.data() + i0 * k + col0);
      }
    }
    at::native::cpublas::brgemm_release();
    const std::lock_guard<std::mutex> lock(partials_mutex);
    partials.emplace_back(bb, std::move(part));
  });
  // In block order, so the sum does not depend on which thread finished first.
  std::sort(partials.begin(), partials.end(),
            [](const auto& x, const auto& y) { return x.first < y.first; });
  for (int64_t r = 0; r < d_rows; ++r) std::fill(c + r * ldc, c + r * ldc + k, 0.0f);
  for (const auto& part : partials)
    for (int64_t r = 0; r < d_rows; ++r)
      for (int64_t x = 0; x < k; ++x) c[r * ldc + x] += part.second[r * k + x];
#else
  TORCH_CHECK(false, "cpu_gemm: built without the AVX512-BF16 kernel (not x86-64)");
#endif
}

}  // namespace cpu_gemm
}  // namespace crystal_ext
