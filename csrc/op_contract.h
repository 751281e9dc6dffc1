// What every backend of lookahead_update_ does around its kernel: validate and sort the pairs into
// flat arrays first, bump versions last.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace lookahead {

// A non-empty tensor pair that a kernel can treat as two flat arrays of numel elements starting at
// the given addresses, in the same element order: both dense, with the same strides (contiguous,
// channels_last and any permutation alike).
struct FlatPair {
  void* slow;
  void* fast;
  int64_t numel;
};

struct CallPlan {
  std::vector<FlatPair> flat;   // for the kernel
  std::vector<size_t> strided;  // indices of the other non-empty pairs, for ATen one by one
};

// Validates a call and plans it, touching each tensor's metadata once (with thousands of
// parameters, that metadata is a good share of the call's time). Throws a ValueError/TypeError
// naming the offending list index unless the arguments form a valid call: equal-length lists of
// dense floating tensors on one device, pairwise equal shapes, one supported (slow, fast) dtype pair
// for the whole call, no memory shared between any two tensors or within one, and alpha in (0, 1].
// Runs before any write, so a rejected call changes nothing.
CallPlan plan_lookahead_call(at::TensorList slow, at::TensorList fast, double alpha);

// Registered ops get no automatic version-counter bump; autograd and torch.compile rely on it to
// notice in-place writes, so every tensor of both lists is bumped (as ATen's foreach ops do).
void bump_versions(at::TensorList slow, at::TensorList fast);

// Pairs that are not flat arrays, one at a time through ATen (the reference the kernels match).
void update_strided(at::TensorList slow, at::TensorList fast, double alpha,
                    const std::vector<size_t>& indices);

// The op around a backend's kernel for flat pairs: plan the call, run flat_kernel(plan.flat) on the
// flat pairs, ATen's lerp_/copy_ on the others, then bump versions.
template <typename FlatKernel>
void lookahead_update_with(at::TensorList slow, at::TensorList fast, double alpha,
                           FlatKernel&& flat_kernel) {
  const CallPlan plan = plan_lookahead_call(slow, fast, alpha);
  if (!plan.flat.empty()) flat_kernel(plan.flat);
  if (!plan.strided.empty()) update_strided(slow, fast, alpha, plan.strided);
  bump_versions(slow, fast);
}

}  // namespace lookahead
