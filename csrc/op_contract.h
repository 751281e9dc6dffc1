// What every backend of lookahead_update_ does around its kernel: validate first, bump versions last.
#pragma once

#include <ATen/core/Tensor.h>

namespace lookahead {

// Throws a ValueError/TypeError naming the offending list index unless the arguments form a valid
// call: equal-length lists of dense floating tensors on one device, pairwise equal shapes, one
// supported (slow, fast) dtype pair for the whole call, no memory shared between any two tensors,
// and alpha in (0, 1]. Runs before any write, so a rejected call changes nothing.
void check_lookahead_inputs(at::TensorList slow, at::TensorList fast, double alpha);

// Registered ops get no automatic version-counter bump; autograd and torch.compile rely on it to
// notice in-place writes, so every tensor of both lists is bumped (as ATen's foreach ops do).
void bump_versions(at::TensorList slow, at::TensorList fast);

}  // namespace lookahead
