// The device code of the 8-bit ops (quantize_pseudo_gradients_, dequantize_mean_), and the choice
// of it for a call. The table is tensor_table.h's, with four lists: slow, fast (or out), and each
// tensor's part of the payload and of the scales. Each block of threads walks chunks in a
// grid-stride loop, as the multi-tensor kernel does; each thread of it takes one quantization block
// of the chunk (quantization.h holds the math): 64 threads, 64 blocks of 1024 elements per chunk
// of 65536. A thread reads its block twice (its maximum, then its values), from the cache the
// second time. No shared memory and no barrier: it runs unchanged in tests/cuda_emulation's grid.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/core/ScalarType.h>

#include <cstdint>

#include "../dtype_pairs.h"
#include "../quantization.h"
#include "device_portability.h"
#include "multi_tensor_kernel.h"
#include "tensor_table.h"

namespace lookahead {
namespace quantization {

constexpr int kThreads = mta::kChunkSize / static_cast<int>(kQuantizationBlock);

struct QuantizeOp {
  template <typename S, typename F>
  __device__ __forceinline__ void operator()(S* slow, F* fast, int8_t* q, float* scale,
                                             int64_t n) const {
    quantize_block<at::opmath_type<S>>(slow, fast, n, q, scale);
  }
};

struct DequantizeMeanOp {
  int64_t q_stride;
  int64_t scale_stride;
  int workers;

  template <typename S, typename F>
  __device__ __forceinline__ void operator()(S* slow, F* out, int8_t* q, float* scale,
                                             int64_t n) const {
    dequantize_mean_block<at::opmath_type<S>>(slow, out, n, q, q_stride, scale, scale_stride,
                                              workers);
  }
};

template <typename Op, typename S, typename F>
__global__ void __launch_bounds__(kThreads)
    blockwise_kernel(const LOOKAHEAD_GRID_CONSTANT mta::TensorTable<4> table, const Op op) {
  int t = 0;  // chunks only grow along the loop, so each search starts from the last tensor found
  for (int c = blockIdx.x; c < table.total_chunks; c += gridDim.x) {
    t = mta::find_tensor(table, c, t);
    const int64_t chunk = static_cast<int64_t>(c - table.first_chunk[t]) * mta::kChunkSize;
    const int64_t first = chunk + static_cast<int64_t>(threadIdx.x) * kQuantizationBlock;
    if (first < table.numel[t]) {
      const int64_t left = table.numel[t] - first;
      op(static_cast<S*>(table.data[0][t]) + first, static_cast<F*>(table.data[1][t]) + first,
         static_cast<int8_t*>(table.data[2][t]) + first,
         static_cast<float*>(table.data[3][t]) + first / kQuantizationBlock,
         left < kQuantizationBlock ? left : kQuantizationBlock);
    }
  }
}

// The kernel of a call, as a type (a launcher's occupancy query takes it as a constant).
template <typename Op, typename S, typename F>
struct Kernel {
  static constexpr auto kKernel = &blockwise_kernel<Op, S, F>;
  using slow_t = S;
  using fast_t = F;
};

// Calls launch(Kernel<Op, S, F>{}, op) for a call's (validated) slow and fast dtypes.
template <typename Op, typename Launch>
void launch_blockwise(c10::ScalarType slow, c10::ScalarType fast, const Op& op,
                      const Launch& launch) {
  dispatch_dtype_pair(slow, fast, [&](auto pair) {
    using S = typename decltype(pair)::slow_t;
    using F = typename decltype(pair)::fast_t;
    launch(Kernel<Op, S, F>{}, op);
  });
}

}  // namespace quantization
}  // namespace lookahead
