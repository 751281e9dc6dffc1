// The per-element arithmetic of a Lookahead sync, shared by the CPU and CUDA kernels.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

namespace lookahead {

// torch.lerp (ATen/native/Lerp.h) picks one of two forms by the weight, so that weight 1 returns the
// end point exactly:  |w| < 0.5 ? start + w * (end - start) : end - (end - start) * (1 - w).
// Both are a multiply-add; written as coeff * diff + base with
//   small weight: coeff = w,     base = start
//   large weight: coeff = w - 1, base = end      ((w - 1) is exact for w in [0.5, 1])
// ATen's vectorised CPU kernels and its CUDA kernels round that multiply-add once (FMA); its
// non-vectorised CPU build (capability DEFAULT) rounds the product first. kFused selects which one
// we reproduce, so results stay bitwise equal to torch on every path.
template <bool kFused, typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T multiply_add(T a, T b, T c) {
  if constexpr (kFused) {
#if defined(__CUDA_ARCH__)
    return fma(a, b, c);
#else
    return std::fma(a, b, c);
#endif
  } else {
    return a * b + c;
  }
}

// The weight-dependent half of the lerp, decided once per call on the host.
template <typename opmath_t>
struct LerpWeight {
  opmath_t coeff;
  bool small;

  explicit LerpWeight(double alpha) {
    // torch converts a Python-float weight to the op's math type before it compares with 0.5.
    const auto w = static_cast<opmath_t>(alpha);
    small = std::abs(w) < opmath_t(0.5);
    coeff = small ? w : w - opmath_t(1);
  }
};

template <bool kFused, bool kSmall, typename opmath_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE opmath_t lerp(opmath_t start, opmath_t end, opmath_t coeff) {
  return multiply_add<kFused>(coeff, end - start, kSmall ? start : end);
}

}  // namespace lookahead
