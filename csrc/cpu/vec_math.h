// Vectorisable math shared by the CPU kernels.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "isa.h"

namespace medattn {

// float: Cody-Waite range reduction and Cephes' degree-6 polynomial (≤ 2 ulp for x ≤ 0, the only
// arguments a stabilised softmax produces), plain arithmetic so that `omp simd` loops vectorise it.
// double: std::exp (the accuracy mode).
MEDATTN_INLINE float exp_fast(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);  // exp(-87) ≈ 1.6e-38: a zero weight beside exp(0) = 1
  constexpr float kRound = 12582912.0f;      // 1.5 · 2^23: adding it rounds to an integer
  const float n = (x * 1.44269504088896341f + kRound) - kRound;
  float r = x - n * 0.693359375f;            // ln 2 in two parts: an exact reduction
  r = r - n * -2.12194440e-4f;
  const float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}

MEDATTN_INLINE double exp_fast(double x) { return std::exp(x); }

}  // namespace medattn
