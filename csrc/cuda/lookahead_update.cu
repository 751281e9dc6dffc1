// CUDA backend of the sync ops (lookahead_update_, lookahead_momentum_update_ and their gated
// forms): every tensor of a call in one multi-tensor launch.
//
// ATen's _foreach_lerp_ followed by _foreach_copy_ reads fast twice and launches twice per group of
// tensors; here each element is read once and written once per list (4 passes over memory, 6 with
// the momentum buffer). Tensors that are flat arrays with the same element order go through
// multi_tensor_apply.cuh with the Ops of sync_ops.h; any other layout goes through ATen one tensor
// at a time, as on the CPU.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "../op_skeleton.h"
#include "multi_tensor_apply.cuh"
#include "sync_ops.h"

namespace lookahead {
namespace {

void sync_flat(at::TensorList slow, at::TensorList fast, double alpha, Gate gate,
               const std::vector<FlatItem>& flat) {
  const c10::cuda::CUDAGuard device_guard(slow[0].device());
  launch_sync(slow[0].scalar_type(), fast[0].scalar_type(), alpha, gate, on_current_stream(flat));
}

void momentum_flat(at::TensorList slow, at::TensorList fast, double lr, double mu, bool nesterov,
                   Gate gate, const std::vector<FlatItem>& flat) {
  const c10::cuda::CUDAGuard device_guard(slow[0].device());
  launch_momentum_sync(slow[0].scalar_type(), fast[0].scalar_type(), lr, mu, nesterov, gate,
                       on_current_stream(flat));
}

void lookahead_update_cuda(at::TensorList slow, at::TensorList fast, double alpha) {
  run<Op::lookahead_update_>([&](const std::vector<FlatItem>& flat) {
    sync_flat(slow, fast, alpha, Gate{nullptr, nullptr}, flat);
  }, slow, fast, alpha);
}

void lookahead_update_if_cuda(at::TensorList slow, at::TensorList fast, double alpha,
                              const at::Tensor& due, const std::optional<at::Tensor>& restore) {
  run<Op::lookahead_update_if_>([&](const std::vector<FlatItem>& flat) {
    sync_flat(slow, fast, alpha, gate_of(due, restore), flat);
  }, slow, fast, alpha, due, restore);
}

void lookahead_momentum_update_cuda(at::TensorList slow, at::TensorList fast,
                                    at::TensorList momentum, double lr, double mu, bool nesterov) {
  run<Op::lookahead_momentum_update_>([&](const std::vector<FlatItem>& flat) {
    momentum_flat(slow, fast, lr, mu, nesterov, Gate{nullptr, nullptr}, flat);
  }, slow, fast, momentum, lr, mu, nesterov);
}

void lookahead_momentum_update_if_cuda(at::TensorList slow, at::TensorList fast,
                                       at::TensorList momentum, double lr, double mu,
                                       bool nesterov, const at::Tensor& due,
                                       const std::optional<at::Tensor>& restore) {
  run<Op::lookahead_momentum_update_if_>([&](const std::vector<FlatItem>& flat) {
    momentum_flat(slow, fast, lr, mu, nesterov, gate_of(due, restore), flat);
  }, slow, fast, momentum, lr, mu, nesterov, due, restore);
}

}  // namespace

TORCH_LIBRARY_IMPL(lookahead_cuda, CUDA, m) {
  m.impl("lookahead_update_", &lookahead_update_cuda);
  m.impl("lookahead_update_if_", &lookahead_update_if_cuda);
  m.impl("lookahead_momentum_update_", &lookahead_momentum_update_cuda);
  m.impl("lookahead_momentum_update_if_", &lookahead_momentum_update_if_cuda);
}

}  // namespace lookahead
