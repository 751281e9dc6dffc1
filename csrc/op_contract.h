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

}  // namespace lookahead
