// CUDA backend of lookahead_update_: every tensor pair of a call in one multi-tensor launch.
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

  __device__ __forceinline__ void operator()(S& slow, F& fast) const {
    const S r = static_cast<S>(lerp<true, kSmall>(static_cast<opmath_t>(slow),
                                                  static_cast<opmath_t>(fast), coeff));
    slow = r;
    fast = static_cast<F>(r);
  }
};

template <typename S, typename F>
void update_flat(const std::vector<FlatPair>& pairs, double alpha, cudaStream_t stream,
                 int device) {
  using opmath_t = at::opmath_type<S>;
  const LerpWeight<opmath_t> weight(alpha);
  // The weight's branch is uniform over the call: a template argument, not a per-element test.
  if (weight.small) {
    mta::apply_pairwise<S, F>(pairs, LookaheadStep<S, F, true>{weight.coeff}, stream, device);
  } else {
    mta::apply_pairwise<S, F>(pairs, LookaheadStep<S, F, false>{weight.coeff}, stream, device);
  }
}

void lookahead_update_cuda(at::TensorList slow, at::TensorList fast, double alpha) {
  lookahead_update_with(slow, fast, alpha, [&](const std::vector<FlatPair>& flat) {
    // After validation, so slow[0] is known to be a CUDA tensor.
    const c10::cuda::CUDAGuard device_guard(slow[0].device());
    const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream();
    dispatch_dtype_pair(slow[0].scalar_type(), fast[0].scalar_type(), [&](auto s, auto f) {
      update_flat<typename decltype(s)::type, typename decltype(f)::type>(
          flat, alpha, stream.stream(), stream.device_index());
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lookahead_cuda, CUDA, m) {
  m.impl("lookahead_update_", &lookahead_update_cuda);
}

// Sparse tensors dispatch here rather than to CUDA; the validation rejects them with a clear message.
TORCH_LIBRARY_IMPL(lookahead_cuda, SparseCUDA, m) {
  m.impl("lookahead_update_", &lookahead_update_cuda);
}

}  // namespace lookahead
