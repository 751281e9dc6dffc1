// CUDA backend of the 8-bit ops: each call's tensors in as few launches of quantization_kernel.h's
// kernel as its tables allow, on the current stream.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "../op_skeleton.h"
#include "multi_tensor_apply.cuh"
#include "quantization_kernel.h"

namespace lookahead {
namespace {

template <typename Op>
void launch_on_current_stream(at::TensorList slow, at::TensorList fast, const Op& op,
                              const std::vector<FlatItem>& flat) {
  const c10::cuda::CUDAGuard device_guard(slow[0].device());
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream();
  quantization::launch_blockwise(slow[0].scalar_type(), fast[0].scalar_type(), op,
                                 [&](auto kernel, const Op& chosen) {
    constexpr auto kKernel = decltype(kernel)::kKernel;
    const int max_grid =
        mta::resident_blocks<kKernel>(stream.device_index(), quantization::kThreads);
    mta::for_each_table<4>(flat, [&](const mta::TensorTable<4>& table) {
      kKernel<<<mta::grid_size(table, max_grid), quantization::kThreads, 0, stream.stream()>>>(
          table, chosen);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void quantize_pseudo_gradients_cuda(at::TensorList slow, at::TensorList fast,
                                    const at::Tensor& payload, const at::Tensor& scales) {
  run<Op::quantize_pseudo_gradients_>([&](const std::vector<FlatItem>& flat) {
    launch_on_current_stream(slow, fast, quantization::QuantizeOp{}, flat);
  }, slow, fast, payload, scales);
}

void dequantize_mean_cuda(at::TensorList slow, at::TensorList out, const at::Tensor& payloads,
                          const at::Tensor& scales) {
  run<Op::dequantize_mean_>([&](const std::vector<FlatItem>& flat) {
    const quantization::DequantizeMeanOp op{payloads.size(1), scales.size(1),
                                            static_cast<int>(payloads.size(0))};
    launch_on_current_stream(slow, out, op, flat);
  }, slow, out, payloads, scales);
}

}  // namespace

TORCH_LIBRARY_IMPL(lookahead_cuda, CUDA, m) {
  m.impl("quantize_pseudo_gradients_", &quantize_pseudo_gradients_cuda);
  m.impl("dequantize_mean_", &dequantize_mean_cuda);
}

}  // namespace lookahead
