// CUDA backend of found_nonfinite_: one read-only multi-tensor launch that raises a device flag, so
// the divergence guard decides on the device and the host never waits for the answer.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <vector>

#include "../op_contract.h"
#include "multi_tensor_apply.cuh"

namespace lookahead {
namespace {

template <typename T>
__device__ __forceinline__ bool is_nonfinite(T x) {
  return !isfinite(static_cast<at::opmath_type<T>>(x));
}

template <typename T>
__global__ void __launch_bounds__(mta::kBlockSize)
    nonfinite_kernel(const LOOKAHEAD_GRID_CONSTANT mta::TensorTable<1> table, const bool* due,
                     bool* found) {
  // Uniform over the grid, so whole blocks leave and the barrier below is never half-reached.
  if (due != nullptr && !*due) return;
  constexpr int kWidth = 16 / static_cast<int>(sizeof(T));
  using Vector = mta::Vec<T, kWidth>;
  bool bad = false;
  mta::for_each_chunk(table, [&](int t, int64_t begin, int n) {
    const T* x = static_cast<const T*>(table.data[0][t]) + begin;
    int scalar_begin = 0;
    if (mta::is_aligned(x, sizeof(Vector))) {
      const int vectors = n / kWidth;
      const auto* x_vec = reinterpret_cast<const Vector*>(x);
#pragma unroll 4
      for (int v = threadIdx.x; v < vectors; v += mta::kBlockSize) {
        const Vector value = x_vec[v];
#pragma unroll
        for (int j = 0; j < kWidth; ++j) bad |= is_nonfinite(value.val[j]);
      }
      scalar_begin = vectors * kWidth;
    }
    for (int i = scalar_begin + threadIdx.x; i < n; i += mta::kBlockSize) bad |= is_nonfinite(x[i]);
  });
  // Every thread reaches the barrier; one write per block, and every writer writes the same value.
  if (__syncthreads_or(bad) && threadIdx.x == 0) *found = true;
}

void found_nonfinite_cuda(at::TensorList tensors, const at::Tensor& found,
                          const std::optional<at::Tensor>& due) {
  found_nonfinite_with(tensors, found, due, [&](const std::vector<FlatTensor>& flat) {
    const c10::cuda::CUDAGuard device_guard(found.device());
    const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream();
    bool* flag = found.data_ptr<bool>();
    const bool* gate = due ? due->data_ptr<bool>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(),
                                    "found_nonfinite_", [&] {
      const int max_grid = mta::resident_blocks<nonfinite_kernel<scalar_t>>(stream.device_index());
      mta::for_each_table<1>(
          flat,
          [](const FlatTensor& x) { return std::array<void*, 1>{const_cast<void*>(x.data)}; },
          [&](const mta::TensorTable<1>& table) {
            const int grid = std::min(table.total_chunks, max_grid);
            nonfinite_kernel<scalar_t><<<grid, mta::kBlockSize, 0, stream.stream()>>>(table, gate, flag);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lookahead_cuda, CUDA, m) {
  m.impl("found_nonfinite_", &found_nonfinite_cuda);
}

}  // namespace lookahead
