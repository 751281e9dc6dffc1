// The launch of multi_tensor_kernel.h's kernel: the grid that fills the device, the driver check,
// and one launch per table of tensor_table.h.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAMacros.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "../validation.h"
#include "multi_tensor_kernel.h"
#include "tensor_table.h"

namespace lookahead {
namespace mta {

// Blocks of kKernel that fit on the device at once: the grid that keeps it full without a second
// wave. Cached per device and kernel; concurrent first calls compute the same value, so relaxed
// atomics suffice.
template <auto kKernel>
int resident_blocks(int device, int block_size = kBlockSize) {
  static std::atomic<int> cache[C10_COMPILE_TIME_MAX_GPUS];
  TORCH_INTERNAL_ASSERT(device >= 0 && device < C10_COMPILE_TIME_MAX_GPUS);
  int blocks = cache[device].load(std::memory_order_relaxed);
  if (blocks == 0) {
    int sms = 0;
    int per_sm = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &per_sm, kKernel, block_size, /*dynamicSMemSize=*/0));
    blocks = std::max(1, sms * per_sm);
    cache[device].store(blocks, std::memory_order_relaxed);
  }
  return blocks;
}

// CUDA 12.x runtimes also run on older 12.0 drivers, which reject parameters over 4 KB; fail with a
// message instead of a bare launch error. From CUDA 13 the minimum driver is far newer.
inline void check_driver_takes_large_params() {
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010 && CUDART_VERSION < 13000
  static const int driver = [] {
    int version = 0;
    C10_CUDA_CHECK(cudaDriverGetVersion(&version));
    return version;
  }();
  TORCH_CHECK(driver >= 12010, "lookahead_cuda was built with CUDA ", CUDART_VERSION,
              ", whose kernels need a driver for CUDA 12.1 or newer; this driver supports ", driver);
#endif
}

// Calls op(list0[i], list1[i], ...) for every element of every item (elements of types T...), on
// `stream`, in as few launches as the tables allow. Items must be non-empty. Nothing is allocated
// or copied to the device, so the call can be captured in a CUDA graph.
template <typename... T, typename Op>
void apply(Elements<T...>, const std::vector<FlatItem>& items, const Op& op, cudaStream_t stream,
           int device) {
  constexpr int kLists = sizeof...(T);
  using Table = TensorTable<kLists>;
  static_assert(sizeof(Table) + kReservedParamBytes <= kParamBytes &&
                    parameter_bytes<kLists, Op>() <= kParamBytes,
                "the table and the Op together exceed the kernel parameter space");
  check_driver_takes_large_params();
  const int max_grid = resident_blocks<elementwise_kernel<Op, T...>>(device);
  for_each_table<kLists>(items, [&](const Table& table) {
    elementwise_kernel<Op, T...><<<grid_size(table, max_grid), kBlockSize, 0, stream>>>(table, op);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace mta

// The launcher that the Ops' headers (sync_ops.h, found_nonfinite_op.h) call for each launch they
// choose: on the current stream of the current device.
inline auto on_current_stream(const std::vector<FlatItem>& flat) {
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream();
  return [&flat, stream](auto elements, const auto& op) {
    mta::apply(elements, flat, op, stream.stream(), stream.device_index());
  };
}

}  // namespace lookahead
