// bf16 x bf16 -> fp32 GEMM for the CPU kernels (x86-64 with AVX512-BF16).
//
// Why a hand-written GEMM: the fused LM-head losses need logits (and P W products) from bf16
// inputs with fp32 OUTPUT, at bf16 speed. On the CPUs these kernels target, nothing reachable
// from an extension provides that: ATen's CPU matmul has no fp32-out variant for bf16
// (aten::mm.dtype is CUDA-only), at::native::mkldnn_matmul rejects an fp32 result for bf16
// inputs, the oneDNN brgemm ukernel that ATen exposes (cpublas::brgemm) needs AMX (so it is
// used where the CPU has AMX: amx_available() below), and the
// MKL cblas_gemm_bf16bf16f32 bundled in libtorch_cpu runs at fp32 speed on AMD CPUs
// (measured: 64 ms vs 26 ms for a bf16-out matmul of [708x896]x[896x8192]). Rounding the
// logits to bf16 instead is the error the op must avoid (Liger-Kernel issue 1432).
//
// The kernel is the classic packed-B register-blocked GEMM: B is packed into panels of 32
// columns in the VNNI pair layout that VDPBF16PS reads (for each pair of k: 32 columns x 2
// values), A is read in place (row-major, k contiguous) and broadcast one k-pair at a time,
// and a 14 x 32 block of C lives in 28 zmm accumulators. Products are exact in fp32 and
// accumulate in fp32, so the result equals an fp32 GEMM of the same bf16 values up to the
// order of summation.
//
// Where the CPU has AMX, a product by B = w (the expectation GEMM P W) runs instead through the
// cblas_gemm_bf16bf16f32 of the MKL that libtorch_cpu bundles on x86-64 (the kernel that
// aten::mm's bf16 matmul runs there, with the fp32 output kept; ATen's own bf16 x bf16 -> fp32
// cpublas::gemm is not exported to extensions). Our pack of w walks two rows at a time into the
// VNNI layout and is written out whole before the product; MKL packs its blocks as it goes.
// With it the LM-head op at |E| = 384 (781 rows, 7B widths, bf16, one thread) measured 1.21x
// faster, with the logits GEMM (B = w^T) left on our deferred pack, which was as fast.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>

namespace crystal_ext {
namespace cpu_gemm {

// True when this build has the kernel (x86-64) and the CPU runs AVX512-BF16 instructions.
// Callers fall back to an fp32 GEMM otherwise.
bool bf16_gemm_available();
// True when gemm_bf16_f32 runs on AMX tiles (ATen's oneDNN brgemm ukernel on the same packed
// panels, about 3x the AVX512-BF16 kernel where measured): the CPU has AMX-BF16, Linux
// granted the tile state, and CRYSTAL_EXT_CPU_AMX is not "0" (read at each call, so a test or
// benchmark can compare both paths in one process).
bool amx_available();

// True when the packs below run on AVX-512 (AVX512F + AVX512BW) and CRYSTAL_EXT_CPU_SIMD_PACK
// is not "0" (read at each call, so a test or benchmark can compare both in one process);
// otherwise scalar loops pack the same bits. The packs are memory-bound: they read and write
// every weight element of a block once per GEMM.
bool simd_pack_available();

// True when products by B = w (pack / pack_into) run through MKL's cblas_gemm_bf16bf16f32 (see
// the top of the file): amx_available() (MKL's AMX kernels; without AMX, on AMD CPUs, it measured
// at fp32 speed), libtorch_cpu exports the function, and CRYSTAL_EXT_CPU_MKL_GEMM is not "0"
// (read when packing and at each call, like CRYSTAL_EXT_CPU_AMX).
bool mkl_gemm_available();

// B packed for gemm_bf16_f32: k x n, k padded to even with zeros, columns in panels of
// kPanel (the last panel zero-padded). Panel j holds [k_pairs][kPanel][2] bf16.
//
// Where mkl_gemm_available(), pack / pack_into pack nothing: `source` keeps w for the product,
// which runs through MKL, or, for at most 96 rows of A on the AMX path with the vector packs,
// packs w's rows k-block by k-block into L2 inside the GEMM (w streams past once;
// CRYSTAL_EXT_CPU_PACK_IN_GEMM=0 sends those to MKL too). On the AMX path with the vector
// packs (amx_available() and simd_pack_available()) the pack of w^T is deferred: `source`
// keeps w (no copy) and gemm_bf16_f32 packs a few panels at a time into a buffer that stays in
// L2 just before the tiles read them, so the packed copy of a weight block is never written to
// memory and read back; with at most 64 rows of A, w is not packed at all: the GEMM runs as
// C^T = w A^T with w's rows as the tiles' A operand.
// CRYSTAL_EXT_CPU_PACK_IN_GEMM=0 packs eagerly instead (read when packing).
constexpr int64_t kPanel = 32;
struct PackedB {
  at::Tensor data;    // bf16, n_panels * k_pairs * kPanel * 2 elements (eager packs)
  at::Tensor source;  // deferred packs: w itself, contiguous bf16
  bool source_transposed = false;  // source is w [n, k] (B = w^T), else w [k, n] (B = w)
  bool for_mkl = false;            // source is B as it is, for MKL's GEMM (nothing packed)
  int64_t k = 0, n = 0, k_pairs = 0, n_panels = 0;
};

// B = w^T for w [n, k] row-major (the logits GEMM: hidden [m, k] x weight_block^T).
PackedB pack_transposed(const at::Tensor& w);
// B = w for w [k, n] row-major (the expectation GEMM: probabilities [m, k] x weight_block).
PackedB pack(const at::Tensor& w);
// Reuses `out` when it holds enough elements (the vocabulary loop packs a block per step).
void pack_transposed_into(const at::Tensor& w, PackedB* out);
void pack_into(const at::Tensor& w, PackedB* out);

// c[m, b.n] (+)= a[m, b.k] * B, fp32 output with leading dimension ldc.
// a: bf16 row-major with leading dimension lda >= 2 * b.k_pairs; when b.k is odd, column
// b.k of every row must be readable (it meets a zero of B: make it a finite value, e.g. 0).
void gemm_bf16_f32(const at::BFloat16* a, int64_t lda, int64_t m, const PackedB& b, float* c,
                   int64_t ldc, bool accumulate);

// c[0, m) (+)= a * B, then c[0, m2) += a2 * B (a2: m2 <= m rows with the same lda), in one pass
// over B where the GEMM packs w itself (at most 96 rows), else as two GEMMs.
void gemm_bf16_f32_two(const at::BFloat16* a, int64_t lda, int64_t m, const at::BFloat16* a2,
                       int64_t m2, const PackedB& b, float* c, int64_t ldc, bool accumulate);

// True when gemm_bf16_f32_two over m rows of A and a B from pack_into runs both A's over one
// pass of w (the k-outer product); otherwise the second A costs a GEMM of its own.
bool two_a_share_one_pass(int64_t m);

// The LM-head op's kept pairs' sweep (csrc/cpu/lm_head_losses.cpp) in one pass over w [n, k]:
// for each block of a few hundred rows of w, S = a w_blk^T (m rows of a, fp32), then the
// caller's form_d turns S into D [d_rows, vb] (bf16), then c += D w_blk. Each thread walks its
// own blocks of w, so the second product reads w_blk from the L2 where the first left it and w
// streams from memory once instead of twice (as two GEMMs over the vocabulary it does: at few
// rows both are bound by that stream). form_d(v0, vb, s, d, ldd): s is [m, vb] row-major and
// may be changed; it writes d's rows [d_rows, vb] at stride ldd; it runs on the threads at
// once, for disjoint blocks. c [d_rows, k] (stride ldc) is set to the threads' partial
// products, summed in block order. Only where sweep_available(m, d_rows, k): AMX and the
// vector packs, m <= 128, d_rows <= m, an even k, and CRYSTAL_EXT_CPU_ONE_PASS_SWEEP not "0"
// (read at each call, so a test or benchmark can compare it with the two GEMMs in one process).
using SweepFormD =
    std::function<void(int64_t v0, int64_t vb, float* s, at::BFloat16* d, int64_t ldd)>;
bool sweep_available(int64_t m, int64_t d_rows, int64_t k);
void sweep_logits_then_product(const at::BFloat16* a, int64_t lda, int64_t m, const at::Tensor& w,
                               int64_t d_rows, const SweepFormD& form_d, float* c, int64_t ldc);

// Leading dimension for an A operand of k columns: even, and not a multiple of 2 KB.
int64_t operand_lda(int64_t k);
// Copy of a bf16 [m, k] matrix as an A operand: [m, operand_lda(k)], zeros after column k.
at::Tensor a_operand(const at::Tensor& a);
// The A operand of d^T for a contiguous fp32 d [k, m]: [m, operand_lda(k)] bf16 (rounded to
// nearest even), written in one blocked pass (a strided ATen copy measured ~4x slower).
at::Tensor transposed_a_operand(const at::Tensor& d);

}  // namespace cpu_gemm
}  // namespace crystal_ext
