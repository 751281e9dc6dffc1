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

#include <optional>
#include <type_traits>
#include <vector>

#include "../dtype_pairs.h"
#include "../lerp.h"
#include "../op_contract.h"
#include "multi_tensor_apply.cuh"

namespace lookahead {
namespace {

// One element of the sync, rounded as slow.lerp_(fast, alpha); fast.copy_(slow) round it. CUDA's
// torch.lerp is compiled with FMA contraction, so the multiply-add is always fused here.
template <typename S, typename F, bool kSmall>
struct LookaheadStep {
  using opmath_t = at::opmath_type<S>;
  opmath_t coeff;

  __device__ __forceinline__ bool prepare() { return true; }

  __device__ __forceinline__ void operator()(S& slow, F& fast) const {
    const S r = static_cast<S>(lerp<true, kSmall>(static_cast<opmath_t>(slow),
                                                  static_cast<opmath_t>(fast), coeff));
    slow = r;
    fast = static_cast<F>(r);
  }
};

// The same sync, gated by flags that earlier kernels of the step computed on the device: nothing
// unless *due; with *restore, the fast weights restart from the slow ones, which stay as they are.
template <typename S, typename F, bool kSmall>
struct GatedLookaheadStep {
  LookaheadStep<S, F, kSmall> step;
  const bool* due;
  const bool* restore;  // nullptr: never restore
  bool restoring;

  __device__ __forceinline__ bool prepare() {
    if (!*due) return false;
    restoring = restore != nullptr && *restore;
    return true;
  }

  __device__ __forceinline__ void operator()(S& slow, F& fast) const {
    if (restoring) {
      fast = static_cast<F>(slow);
    } else {
      step(slow, fast);
    }
  }
};

// The flags for lookahead_update_if_: device addresses of `due` and `restore` (nullptr: no flags, an
// unconditional sync).
struct Gate {
  const bool* due;
  const bool* restore;
};

template <typename S, typename F>
void update_flat(const std::vector<FlatPair>& pairs, double alpha, const Gate& gate,
                 cudaStream_t stream, int device) {
  using opmath_t = at::opmath_type<S>;
  const LerpWeight<opmath_t> weight(alpha);
  // The weight's branch is uniform over the call: a template argument, not a per-element test.
  auto launch = [&](auto small) {
    constexpr bool kSmall = decltype(small)::value;
    const LookaheadStep<S, F, kSmall> step{weight.coeff};
    if (gate.due == nullptr) {
      mta::apply_pairwise<S, F>(pairs, step, stream, device);
    } else {
      mta::apply_pairwise<S, F>(
          pairs, GatedLookaheadStep<S, F, kSmall>{step, gate.due, gate.restore, false}, stream,
          device);
    }
  };
  if (weight.small) {
    launch(std::true_type{});
  } else {
    launch(std::false_type{});
  }
}

void run_flat(at::TensorList slow, at::TensorList fast, double alpha, const Gate& gate,
              const std::vector<FlatPair>& flat) {
  // After validation, so slow[0] is known to be a CUDA tensor.
  const c10::cuda::CUDAGuard device_guard(slow[0].device());
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype_pair(slow[0].scalar_type(), fast[0].scalar_type(), [&](auto s, auto f) {
    update_flat<typename decltype(s)::type, typename decltype(f)::type>(
        flat, alpha, gate, stream.stream(), stream.device_index());
  });
}

void lookahead_update_cuda(at::TensorList slow, at::TensorList fast, double alpha) {
  lookahead_update_with(slow, fast, alpha, [&](const std::vector<FlatPair>& flat) {
    run_flat(slow, fast, alpha, Gate{nullptr, nullptr}, flat);
  });
}

void lookahead_update_if_cuda(at::TensorList slow, at::TensorList fast, double alpha,
                              const at::Tensor& due, const std::optional<at::Tensor>& restore) {
  lookahead_update_if_with(slow, fast, alpha, due, restore, [&](const std::vector<FlatPair>& flat) {
    run_flat(slow, fast, alpha,
             Gate{due.data_ptr<bool>(), restore ? restore->data_ptr<bool>() : nullptr}, flat);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lookahead_cuda, CUDA, m) {
  m.impl("lookahead_update_", &lookahead_update_cuda);
  m.impl("lookahead_update_if_", &lookahead_update_if_cuda);
}

// Sparse tensors dispatch here rather than to CUDA; the validation rejects them with a clear message.
TORCH_LIBRARY_IMPL(lookahead_cuda, SparseCUDA, m) {
  m.impl("lookahead_update_", &lookahead_update_cuda);
  m.impl("lookahead_update_if_", &lookahead_update_if_cuda);
}

}  // namespace lookahead
