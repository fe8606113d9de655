// Host/device helpers shared by every op's maths header (csrc/<op>.h): the CRYSTAL_HD
// qualifier, exp/log/tanh in the accumulation type, and the end of an online log-sum-exp.
#pragma once

#include <cmath>
#include <limits>

#if defined(__CUDACC__)
#define CRYSTAL_HD __host__ __device__ __forceinline__
#else
#define CRYSTAL_HD inline
#endif

namespace crystal_ext {

CRYSTAL_HD float exp_acc(float x) { return ::expf(x); }
CRYSTAL_HD double exp_acc(double x) { return ::exp(x); }
CRYSTAL_HD float log_acc(float x) { return ::logf(x); }
CRYSTAL_HD double log_acc(double x) { return ::log(x); }
CRYSTAL_HD float tanh_acc(float x) { return ::tanhf(x); }
CRYSTAL_HD double tanh_acc(double x) { return ::tanh(x); }

template <typename T>
CRYSTAL_HD T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// log sum exp from a running max m and the running sum z of exp(x - m).
template <typename T>
CRYSTAL_HD T lse_finish(T m, T z) {
  return m + log_acc(z);
}

}  // namespace crystal_ext
