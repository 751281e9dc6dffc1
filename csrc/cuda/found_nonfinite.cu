// CUDA backend of found_nonfinite_: one read-only multi-tensor launch that raises a device flag, so
// the divergence guard decides on the device and the host never waits for the answer.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "../op_skeleton.h"
#include "found_nonfinite_op.h"
#include "multi_tensor_apply.cuh"

namespace lookahead {
namespace {

void found_nonfinite_cuda(at::TensorList tensors, const at::Tensor& found,
                          const std::optional<at::Tensor>& due) {
  run<Op::found_nonfinite_>([&](const std::vector<FlatItem>& flat) {
    const c10::cuda::CUDAGuard device_guard(found.device());
    launch_found_nonfinite(tensors[0].scalar_type(), due ? due->data_ptr<bool>() : nullptr,
                           found.data_ptr<bool>(), on_current_stream(flat));
  }, tensors, found, due);
}

}  // namespace

TORCH_LIBRARY_IMPL(lookahead_cuda, CUDA, m) {
  m.impl("found_nonfinite_", &found_nonfinite_cuda);
}

}  // namespace lookahead
