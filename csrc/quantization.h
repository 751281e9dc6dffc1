// The 8-bit pseudo-gradients of DiLoCo's average (pseudo_gradient_dtype=torch.int8), per element
// and per block, written once for the CPU and CUDA kernels.
//
// A worker sends the pseudo-gradients p = slow - fast of its fast weights in blocks of
// kQuantizationBlock elements of one tensor (in the order of its memory), each block as int8
// values q = round(p / max|p| * 127) with scale = max|p| / 127 (one float per block: 4 bytes per 1024, so
// 8 bits are 1.004 bytes per element against fp32's 4). Every worker gathers every worker's blocks
// and averages them in float, q * scale summed over the workers in their order, each product
// rounded once with the sum (a multiply-add): the same on every worker and on both backends. A
// block holding a NaN or an infinity gets a NaN scale, so it averages to NaN (nonfinite="restore"
// decides before anything is sent).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

#include "element_math.h"

namespace lookahead {

constexpr int64_t kQuantizationBlock = 1024;

C10_HOST_DEVICE inline int64_t quantization_blocks(int64_t numel) {
  return (numel + kQuantizationBlock - 1) / kQuantizationBlock;
}

// Rounding to the nearest integer, ties to even, as torch.round and the GPU's rintf.
C10_HOST_DEVICE C10_ALWAYS_INLINE float round_half_even(float x) {
#if defined(__CUDA_ARCH__)
  return rintf(x);
#else
  return std::nearbyint(x);
#endif
}

C10_HOST_DEVICE C10_ALWAYS_INLINE float absolute(float x) {
#if defined(__CUDA_ARCH__)
  return fabsf(x);
#else
  return std::abs(x);
#endif
}

template <typename opmath_t, typename S, typename F>
C10_HOST_DEVICE C10_ALWAYS_INLINE float pseudo_gradient(const S& slow, const F& fast) {
  return static_cast<float>(static_cast<opmath_t>(slow) - static_cast<opmath_t>(fast));
}

// Quantizes the pseudo-gradients of n (<= kQuantizationBlock) elements into q, and the block's
// scale. Each value is divided by the maximum before it is multiplied by 127, which neither
// overflows for a tiny maximum (127 / max would) nor underflows. A NaN sticks in the running
// maximum; an infinite maximum makes every finite value 0 and the scale infinite, which
// dequantizes to NaN too; a zero block is zeros (0 / 0 is NaN, which quantizes to 0).
template <typename opmath_t, typename S, typename F>
C10_HOST_DEVICE C10_ALWAYS_INLINE void quantize_block(const S* slow, const F* fast, int64_t n, int8_t* q,
                                    float* scale) {
  float absmax = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float magnitude = absolute(pseudo_gradient<opmath_t>(slow[i], fast[i]));
    const bool nan = magnitude != magnitude;
    if (absmax == absmax && (nan || magnitude > absmax)) absmax = magnitude;
  }
  for (int64_t i = 0; i < n; ++i) {
    const float x = pseudo_gradient<opmath_t>(slow[i], fast[i]) / absmax * 127.0f;
    q[i] = x == x ? static_cast<int8_t>(round_half_even(x)) : int8_t{0};
  }
  *scale = absmax / 127.0f;
}

// out <- slow - (the mean over `workers` of each worker's dequantized block), for n elements of a
// block: q and scale point at worker 0's block, worker w's lies w * q_stride (w * scale_stride)
// further. Rounded to the slow dtype, then to out's.
template <typename opmath_t, typename S, typename F>
C10_HOST_DEVICE C10_ALWAYS_INLINE void dequantize_mean_block(const S* slow, F* out, int64_t n, const int8_t* q,
                                           int64_t q_stride, const float* scale,
                                           int64_t scale_stride, int workers) {
  for (int64_t i = 0; i < n; ++i) {
    float sum = 0.0f;
    for (int w = 0; w < workers; ++w) {
      sum = multiply_add<true>(static_cast<float>(q[w * q_stride + i]), scale[w * scale_stride],
                               sum);
    }
    const float mean = sum / static_cast<float>(workers);
    out[i] = static_cast<F>(
        static_cast<S>(static_cast<opmath_t>(slow[i]) - static_cast<opmath_t>(mean)));
  }
}

}  // namespace lookahead
