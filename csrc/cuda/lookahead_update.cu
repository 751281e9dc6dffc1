// CUDA backend of lookahead_update_ and lookahead_update_if_: every tensor pair of a call in one
// multi-tensor launch.
//
// ATen's _foreach_lerp_ followed by _foreach_copy_ reads fast twice and launches twice per group of
// tensors; here each element is read once and written once per list (4 passes over memory, not 5).
// Tensor pairs that are flat arrays with the same element order go through multi_tensor_apply.cuh;
// any other layout goes through ATen's lerp_/copy_ one tensor at a time, as on the CPU.
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

// The sync, optionally gated by flags that earlier kernels of the step computed on the device:
// nothing unless *due; with *restore, the fast weights restart from the slow ones, which stay as
// they are. CUDA's torch.lerp is compiled with FMA contraction and its scalar form (element_math.h),
// so the multiply-add is fused and uses LerpWeight::coeff.
template <typename opmath_t, bool kSmall>
struct SyncOp : mta::ElementwiseOp {
  opmath_t coeff;
  const bool* due;      // nullptr: an unconditional sync
  const bool* restore;  // nullptr: never restore
  bool restoring = false;

  __device__ __forceinline__ bool prepare() {
    if (due == nullptr) return true;
    if (!*due) return false;
    restoring = restore != nullptr && *restore;
    return true;
  }

  template <typename S, typename F>
  __device__ __forceinline__ void operator()(S& slow, F& fast) const {
    if (restoring) {
      restore_element(slow, fast);
    } else {
      sync_element<true, kSmall>(slow, fast, coeff);
    }
  }
};

void sync_flat(at::TensorList slow, at::TensorList fast, double alpha, const bool* due,
               const bool* restore, const std::vector<FlatPair>& flat) {
  // After validation, so slow[0] is known to be a CUDA tensor.
  const c10::cuda::CUDAGuard device_guard(slow[0].device());
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream();
  const auto addresses = [](const FlatPair& pair) { return std::array<void*, 2>{pair.slow, pair.fast}; };
  dispatch_dtype_pair(slow[0].scalar_type(), fast[0].scalar_type(), [&](auto pair) {
    using S = typename decltype(pair)::slow_t;
    using F = typename decltype(pair)::fast_t;
    using opmath_t = at::opmath_type<S>;
    const LerpWeight<opmath_t> weight(alpha);
    // The weight's branch is uniform over the call: a template argument, not a per-element test.
    auto launch = [&](auto small) {
      const SyncOp<opmath_t, decltype(small)::value> op{{}, weight.coeff, due, restore};
      mta::apply<S, F>(flat, addresses, op, stream.stream(), stream.device_index());
    };
    if (weight.small) {
      launch(std::true_type{});
    } else {
      launch(std::false_type{});
    }
  });
}

void lookahead_update_cuda(at::TensorList slow, at::TensorList fast, double alpha) {
  run_update(slow, fast, alpha, [&](const std::vector<FlatPair>& flat) {
    sync_flat(slow, fast, alpha, nullptr, nullptr, flat);
  });
}

void lookahead_update_if_cuda(at::TensorList slow, at::TensorList fast, double alpha,
                              const at::Tensor& due, const std::optional<at::Tensor>& restore) {
  run_update_if(slow, fast, alpha, due, restore, [&](const std::vector<FlatPair>& flat) {
    sync_flat(slow, fast, alpha, due.data_ptr<bool>(),
              restore ? restore->data_ptr<bool>() : nullptr, flat);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lookahead_cuda, CUDA, m) {
  m.impl("lookahead_update_", &lookahead_update_cuda);
  m.impl("lookahead_update_if_", &lookahead_update_if_cuda);
}

}  // namespace lookahead
