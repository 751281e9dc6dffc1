// CPU backend of the 8-bit ops (quantize_pseudo_gradients_, dequantize_mean_): one parallel region
// over the quantization blocks of every tensor of a call, each block by one thread
// (quantization.h holds the math).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../dtype_pairs.h"
#include "../op_skeleton.h"
#include "../quantization.h"
#include "parallel_over.h"
#include "vector_target.h"

namespace lookahead {
namespace {

// Calls block(t, j, first, n) for every quantization block of every item: block j of items[t],
// its n elements starting at element `first`. One parallel region, split by blocks.
template <typename Block>
void parallel_over_blocks(const std::vector<FlatItem>& items, const Block& block) {
  std::vector<int64_t> first_block(items.size() + 1, 0);
  for (size_t t = 0; t < items.size(); ++t) {
    first_block[t + 1] = first_block[t] + quantization_blocks(items[t].numel);
  }
  const int64_t grain = kGrainSize / kQuantizationBlock;
  at::parallel_for(0, first_block.back(), grain, [&](int64_t b, int64_t end) {
    size_t t = std::upper_bound(first_block.begin(), first_block.end(), b) - first_block.begin();
    for (--t; b < end; ++b) {
      while (b >= first_block[t + 1]) ++t;
      const int64_t j = b - first_block[t];
      const int64_t first = j * kQuantizationBlock;
      block(t, j, first, std::min(kQuantizationBlock, items[t].numel - first));
    }
  });
}

template <typename S, typename F>
void quantize(const S* slow, const F* fast, int64_t n, int8_t* q, float* scale) {
  quantize_block<at::opmath_type<S>>(slow, fast, n, q, scale);
}

template <typename S, typename F>
LOOKAHEAD_VECTOR_TARGET void quantize_vector(const S* slow, const F* fast, int64_t n, int8_t* q,
                                             float* scale) {
  quantize_block<at::opmath_type<S>>(slow, fast, n, q, scale);
}

template <typename S, typename F>
void dequantize(const S* slow, F* out, int64_t n, const int8_t* q, int64_t q_stride,
                const float* scale, int64_t scale_stride, int workers) {
  dequantize_mean_block<at::opmath_type<S>>(slow, out, n, q, q_stride, scale, scale_stride,
                                            workers);
}

template <typename S, typename F>
LOOKAHEAD_VECTOR_TARGET void dequantize_vector(const S* slow, F* out, int64_t n, const int8_t* q,
                                               int64_t q_stride, const float* scale,
                                               int64_t scale_stride, int workers) {
  dequantize_mean_block<at::opmath_type<S>>(slow, out, n, q, q_stride, scale, scale_stride,
                                            workers);
}

void quantize_pseudo_gradients_cpu(at::TensorList slow, at::TensorList fast,
                                   const at::Tensor& payload, const at::Tensor& scales) {
  run<Op::quantize_pseudo_gradients_>([&](const std::vector<FlatItem>& flat) {
    dispatch_dtype_pair(slow[0].scalar_type(), fast[0].scalar_type(), [&](auto pair) {
      using S = typename decltype(pair)::slow_t;
      using F = typename decltype(pair)::fast_t;
      const auto block = vector_target_enabled() ? quantize_vector<S, F> : quantize<S, F>;
      parallel_over_blocks(flat, [&](size_t t, int64_t j, int64_t first, int64_t n) {
        block(static_cast<const S*>(flat[t].data[0]) + first,
              static_cast<const F*>(flat[t].data[1]) + first, n,
              static_cast<int8_t*>(flat[t].data[2]) + first,
              static_cast<float*>(flat[t].data[3]) + j);
      });
    });
  }, slow, fast, payload, scales);
}

void dequantize_mean_cpu(at::TensorList slow, at::TensorList out, const at::Tensor& payloads,
                         const at::Tensor& scales) {
  run<Op::dequantize_mean_>([&](const std::vector<FlatItem>& flat) {
    const auto workers = static_cast<int>(payloads.size(0));
    dispatch_dtype_pair(slow[0].scalar_type(), out[0].scalar_type(), [&](auto pair) {
      using S = typename decltype(pair)::slow_t;
      using F = typename decltype(pair)::fast_t;
      const auto block = vector_target_enabled() ? dequantize_vector<S, F> : dequantize<S, F>;
      parallel_over_blocks(flat, [&](size_t t, int64_t j, int64_t first, int64_t n) {
        block(static_cast<const S*>(flat[t].data[0]) + first,
              static_cast<F*>(flat[t].data[1]) + first, n,
              static_cast<const int8_t*>(flat[t].data[2]) + first, payloads.size(1),
              static_cast<const float*>(flat[t].data[3]) + j, scales.size(1), workers);
      });
    });
  }, slow, out, payloads, scales);
}

}  // namespace

TORCH_LIBRARY_IMPL(lookahead_cuda, CPU, m) {
  m.impl("quantize_pseudo_gradients_", &quantize_pseudo_gradients_cpu);
  m.impl("dequantize_mean_", &dequantize_mean_cpu);
}

}  // namespace lookahead
