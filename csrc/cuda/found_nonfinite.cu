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

#include "../element_math.h"
#include "../op_skeleton.h"
#include "multi_tensor_apply.cuh"

namespace lookahead {
namespace {

template <typename T>
struct FindNonfiniteOp : mta::ElementwiseOp {
  static constexpr bool kWrites = false;
  const bool* due;  // nullptr: always check
  bool* found;
  bool bad = false;

  __device__ __forceinline__ bool prepare() { return due == nullptr || *due; }

  __device__ __forceinline__ void operator()(T& x) { bad |= is_nonfinite<at::opmath_type<T>>(x); }

  // Every thread of the block reaches the barrier; one write per block, and every writer writes
  // the same value.
  __device__ __forceinline__ void finish() {
    if (__syncthreads_or(bad) && threadIdx.x == 0) *found = true;
  }
};

void found_nonfinite_cuda(at::TensorList tensors, const at::Tensor& found,
                          const std::optional<at::Tensor>& due) {
  run_found_nonfinite(tensors, found, due, [&](const std::vector<FlatItem>& flat) {
    const c10::cuda::CUDAGuard device_guard(found.device());
    const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream();
    const auto addresses = [](const FlatItem& x) { return std::array<void*, 1>{x.data[0]}; };
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(),
                                    "found_nonfinite_", [&] {
      const FindNonfiniteOp<scalar_t> op{{}, due ? due->data_ptr<bool>() : nullptr,
                                         found.data_ptr<bool>()};
      mta::apply<scalar_t>(flat, addresses, op, stream.stream(), stream.device_index());
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lookahead_cuda, CUDA, m) {
  m.impl("found_nonfinite_", &found_nonfinite_cuda);
}

}  // namespace lookahead
