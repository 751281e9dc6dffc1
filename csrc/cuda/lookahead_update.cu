// CUDA backend of the sync ops (lookahead_update_, lookahead_momentum_update_ and their gated
// forms): every tensor of a call in one multi-tensor launch.
//
// ATen's _foreach_lerp_ followed by _foreach_copy_ reads fast twice and launches twice per group of
// tensors; here each element is read once and written once per list (4 passes over memory, 6 with
// the momentum buffer). Tensors that are flat arrays with the same element order go through
// multi_tensor_apply.cuh; any other layout goes through ATen one tensor at a time, as on the CPU.
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <type_traits>
#include <vector>

#include "../dtype_pairs.h"
#include "../element_math.h"
#include "../op_skeleton.h"
#include "multi_tensor_apply.cuh"

namespace lookahead {
namespace {

// The flags of a gated call, read by every thread before it touches memory: nothing unless *due;
// with *restore, the fast weights restart from the slow ones, which (with any momentum) stay as
// they are. due == nullptr: an unconditional sync.
struct Gate {
  const bool* due;
  const bool* restore;  // nullptr: never restore
  bool restoring = false;

  __device__ __forceinline__ bool open() {
    if (due == nullptr) return true;
    if (!*due) return false;
    restoring = restore != nullptr && *restore;
    return true;
  }
};

// CUDA's torch.lerp is compiled with FMA contraction and its scalar form (element_math.h), so the
// multiply-add is fused and uses LerpWeight::coeff.
template <typename opmath_t, bool kSmall>
struct SyncOp : mta::ElementwiseOp {
  opmath_t coeff;
  Gate gate;

  __device__ __forceinline__ bool prepare() { return gate.open(); }

  template <typename S, typename F>
  __device__ __forceinline__ void operator()(S& slow, F& fast) const {
    if (gate.restoring) {
      restore_element(slow, fast);
    } else {
      sync_element<true, kSmall>(slow, fast, coeff);
    }
  }
};

template <typename opmath_t, bool kNesterov>
struct MomentumOp : mta::ElementwiseOp {
  opmath_t lr;
  opmath_t mu;
  Gate gate;

  __device__ __forceinline__ bool prepare() { return gate.open(); }

  template <typename S, typename F>
  __device__ __forceinline__ void operator()(S& slow, F& fast, S& momentum) const {
    if (gate.restoring) {
      restore_element(slow, fast);
    } else {
      momentum_element<true, kNesterov>(slow, fast, momentum, lr, mu);
    }
  }
};

// The first kLists addresses of each item.
template <int kLists>
std::array<void*, kLists> addresses(const FlatItem& item) {
  std::array<void*, kLists> data;
  for (int l = 0; l < kLists; ++l) data[l] = item.data[l];
  return data;
}

// Calls launch(pair, stream) for the call's dtype pair, on the device of the (validated) tensors.
template <typename Launch>
void on_device(at::TensorList slow, at::TensorList fast, const Launch& launch) {
  const c10::cuda::CUDAGuard device_guard(slow[0].device());
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype_pair(slow[0].scalar_type(), fast[0].scalar_type(),
                      [&](auto pair) { launch(pair, stream); });
}

// The weight's branch (and Nesterov or not) is uniform over a call: a template argument, not a
// per-element test.
template <typename Launch>
void with_flag(bool flag, const Launch& launch) {
  if (flag) {
    launch(std::true_type{});
  } else {
    launch(std::false_type{});
  }
}

void sync_flat(at::TensorList slow, at::TensorList fast, double alpha, Gate gate,
               const std::vector<FlatItem>& flat) {
  on_device(slow, fast, [&](auto pair, const c10::cuda::CUDAStream& stream) {
    using S = typename decltype(pair)::slow_t;
    using F = typename decltype(pair)::fast_t;
    using opmath_t = at::opmath_type<S>;
    const LerpWeight<opmath_t> weight(alpha);
    with_flag(weight.small, [&](auto small) {
      const SyncOp<opmath_t, decltype(small)::value> op{{}, weight.coeff, gate};
      mta::apply<S, F>(flat, addresses<2>, op, stream.stream(), stream.device_index());
    });
  });
}

void momentum_flat(at::TensorList slow, at::TensorList fast, double lr, double mu, bool nesterov,
                   Gate gate, const std::vector<FlatItem>& flat) {
  on_device(slow, fast, [&](auto pair, const c10::cuda::CUDAStream& stream) {
    using S = typename decltype(pair)::slow_t;
    using F = typename decltype(pair)::fast_t;
    using opmath_t = at::opmath_type<S>;
    with_flag(nesterov, [&](auto nesterov_flag) {
      const MomentumOp<opmath_t, decltype(nesterov_flag)::value> op{
          {}, static_cast<opmath_t>(lr), static_cast<opmath_t>(mu), gate};
      mta::apply<S, F, S>(flat, addresses<3>, op, stream.stream(), stream.device_index());
    });
  });
}

Gate gate_of(const at::Tensor& due, const std::optional<at::Tensor>& restore) {
  return {due.data_ptr<bool>(), restore ? restore->data_ptr<bool>() : nullptr};
}

void lookahead_update_cuda(at::TensorList slow, at::TensorList fast, double alpha) {
  run_update(slow, fast, alpha, [&](const std::vector<FlatItem>& flat) {
    sync_flat(slow, fast, alpha, Gate{nullptr, nullptr}, flat);
  });
}

void lookahead_update_if_cuda(at::TensorList slow, at::TensorList fast, double alpha,
                              const at::Tensor& due, const std::optional<at::Tensor>& restore) {
  run_update_if(slow, fast, alpha, due, restore, [&](const std::vector<FlatItem>& flat) {
    sync_flat(slow, fast, alpha, gate_of(due, restore), flat);
  });
}

void lookahead_momentum_update_cuda(at::TensorList slow, at::TensorList fast,
                                    at::TensorList momentum, double lr, double mu, bool nesterov) {
  run_momentum_update(slow, fast, momentum, lr, mu, nesterov,
                      [&](const std::vector<FlatItem>& flat) {
    momentum_flat(slow, fast, lr, mu, nesterov, Gate{nullptr, nullptr}, flat);
  });
}

void lookahead_momentum_update_if_cuda(at::TensorList slow, at::TensorList fast,
                                       at::TensorList momentum, double lr, double mu,
                                       bool nesterov, const at::Tensor& due,
                                       const std::optional<at::Tensor>& restore) {
  run_momentum_update_if(slow, fast, momentum, lr, mu, nesterov, due, restore,
                         [&](const std::vector<FlatItem>& flat) {
    momentum_flat(slow, fast, lr, mu, nesterov, gate_of(due, restore), flat);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lookahead_cuda, CUDA, m) {
  m.impl("lookahead_update_", &lookahead_update_cuda);
  m.impl("lookahead_update_if_", &lookahead_update_if_cuda);
  m.impl("lookahead_momentum_update_", &lookahead_momentum_update_cuda);
  m.impl("lookahead_momentum_update_if_", &lookahead_momentum_update_if_cuda);
}

}  // namespace lookahead
