// The per-row passes of the CPU LM-head forward over a block of logits, on AVX-512: the row's
// max, its unnormalised probabilities p = exp(s - shift) rounded to bf16 for the expectation
// GEMM (with their sum), a pair's KL cross term sum_v p_teacher (s_teacher - s_student), and a
// kept pair's probability difference p_student - p_teacher in bf16 (its KL gradient's row).
//
// Why hand-written: these passes touch every logit of every row once or twice, and with libm's
// scalar expf they took about a fifth of the op's time at 781 rows (perf, 7B widths); ATen's
// vectorised exp is not reachable per row from an extension without a pass over memory per op.
// The exp is the Cephes single-precision one (range reduction by ln 2, degree-6 polynomial, the
// power of two applied with VSCALEFPS): within 2 ulp of expf, exactly 0 at -inf. The sums are
// accumulated in double per element, as the scalar loops do (csrc/cpu/lm_head_losses.cpp says
// why), so the rows' statistics keep their precision.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace crystal_ext {
namespace cpu_rows {

// True when this build has the vector passes (x86-64), the CPU runs AVX512-BF16 (the bf16 path
// of the LM-head op already requires it) and CRYSTAL_EXT_CPU_SIMD_ROWS is not "0" (read at each
// call, so a test can compare both in one process).
bool available();

// max(init, s[0], ..., s[n - 1]), NaN entries ignored (as the scalar `s > m ? s : m`).
float max_of(const float* s, int64_t n, float init);

// hi[v] = bf16(p_v), p_v = exp(s[v] - shift), and lo[v] = bf16(p_v - hi[v]) when lo is not null;
// returns sum_v p_v, added in double.
double exp_to_bf16(const float* s, int64_t n, float shift, at::BFloat16* hi, at::BFloat16* lo);

// sum_v e_v (st[v] - ss[v]) with e_v = exp(st[v] - shift), a term 0 where e_v is 0 (both rows
// may be -inf there), added in double.
double kl_cross_sum(const float* st, const float* ss, int64_t n, float shift);

// d[v] = bf16(exp(ss[v] - lse_s) - exp(st[v] - lse_t)): a student row's softmax minus its
// teacher's, formed in float and rounded once (the KL gradient's logit rows).
void prob_difference_to_bf16(const float* ss, const float* st, int64_t n, float lse_s, float lse_t,
                             at::BFloat16* d);

// exp(x) for the tests: the same vector code on a contiguous float tensor.
at::Tensor exp_for_tests(const at::Tensor& x);

}  // namespace cpu_rows
}  // namespace crystal_ext
