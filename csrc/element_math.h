// The per-element arithmetic of the ops, written once for the CPU and CUDA kernels: one element
// of a sync, of the outer-momentum sync, of a restore, and the non-finite test.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <limits>

namespace lookahead {

// torch.lerp (ATen/native/Lerp.h) picks one of two forms by the weight, so that weight 1 returns the
// end point exactly:  |w| < 0.5 ? start + w * (end - start) : end - (end - start) * (1 - w).
// Both are a multiply-add coeff * (end - start) + base, with base = start for a small weight and
// base = end for a large one. ATen's vectorised CPU kernels and its CUDA kernels round that
// multiply-add once (FMA); its non-vectorised CPU build (capability DEFAULT) rounds the product
// first. kFused selects which one we reproduce, so results stay bitwise equal to torch on every
// path.
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

// The weight-dependent half of the lerp, decided once per call on the host: torch's scalar form,
// which its CUDA kernel uses, coeff * (end - start) + base with coeff = w or -(1 - w). ATen's
// vectorised CPU loops write the large form as (w - 1) * (end - start) + end instead: the same
// value to the bit, except at w == 1, where w - 1 is +0 and -(1 - w) is -0, which flips the sign
// of a zero result (0 * diff + end with end = -0). Which of its loops torch uses for an element
// depends on the vector ISA, the thread count and the tensor's size, so torch's CPU results
// disagree among themselves there; we always take the scalar form, so our CPU and CUDA kernels
// agree.
template <typename opmath_t>
struct LerpWeight {
  bool small;
  opmath_t coeff;

  explicit LerpWeight(double alpha) {
    // torch converts a Python-float weight to the op's math type before it compares with 0.5.
    const auto w = static_cast<opmath_t>(alpha);
    small = std::abs(w) < opmath_t(0.5);
    coeff = small ? w : -(opmath_t(1) - w);  // 1 - w is exact for w in [0.5, 1]
  }
};

// One element of a sync: slow <- lerp(slow, fast, w) in opmath_t, rounded to S; fast <- slow,
// rounded from S to F (as slow.lerp_(fast, w); fast.copy_(slow) round them).
template <bool kFused, bool kSmall, typename opmath_t, typename S, typename F>
C10_HOST_DEVICE C10_ALWAYS_INLINE void sync_element(S& slow, F& fast, opmath_t coeff) {
  const auto start = static_cast<opmath_t>(slow);
  const auto end = static_cast<opmath_t>(fast);
  const S result = static_cast<S>(multiply_add<kFused>(coeff, end - start, kSmall ? start : end));
  slow = result;
  fast = static_cast<F>(result);
}

// One element of the outer-momentum sync (SNOO; DiLoCo's outer step), in opmath_t with the
// pseudo-gradient d = slow - fast:
//   momentum <- mu * momentum + d
//   slow <- slow - lr * (d + mu * momentum)    (Nesterov)   or   slow - lr * momentum (heavy ball)
//   fast <- slow
// Each multiply-add is rounded once where kFused (always on CUDA, and on CPUs with FMA), so the two
// backends agree; the momentum is stored in the slow dtype, rounded from the value the step used.
template <bool kFused, bool kNesterov, typename opmath_t, typename S, typename F>
C10_HOST_DEVICE C10_ALWAYS_INLINE void momentum_element(S& slow, F& fast, S& momentum, opmath_t lr,
                                                        opmath_t mu) {
  const auto start = static_cast<opmath_t>(slow);
  const opmath_t pseudo_gradient = start - static_cast<opmath_t>(fast);
  const opmath_t buffer = multiply_add<kFused>(mu, static_cast<opmath_t>(momentum), pseudo_gradient);
  const opmath_t step = kNesterov ? multiply_add<kFused>(mu, buffer, pseudo_gradient) : buffer;
  const S result = static_cast<S>(multiply_add<kFused>(-lr, step, start));
  momentum = static_cast<S>(buffer);
  slow = result;
  fast = static_cast<F>(result);
}

// The divergence guard's way out: the fast weight restarts from the slow one, which stays as it is
// (rounded as fast.copy_(slow) rounds).
template <typename S, typename F>
C10_HOST_DEVICE C10_ALWAYS_INLINE void restore_element(const S& slow, F& fast) {
  fast = static_cast<F>(slow);
}

// NaN compares false and |inf| exceeds the largest finite value: one comparison, which the CPU
// compiler vectorises (std::isfinite is a library call on some targets).
template <typename opmath_t, typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE bool is_nonfinite(T x) {
  const auto value = static_cast<opmath_t>(x);
#if defined(__CUDA_ARCH__)
  const opmath_t magnitude = fabs(value);
#else
  const opmath_t magnitude = std::abs(value);
#endif
  return !(magnitude <= std::numeric_limits<opmath_t>::max());
}

}  // namespace lookahead
