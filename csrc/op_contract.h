// What every backend of the ops (lookahead_update_, lookahead_update_if_, found_nonfinite_) does
// around its kernel: validate and sort the tensors into flat arrays first, bump versions last.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
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

// Validates a call of `op` (for messages) and plans it, touching each tensor's metadata once (with thousands of
// parameters, that metadata is a good share of the call's time). Throws a ValueError/TypeError
// naming the offending list index unless the arguments form a valid call: equal-length lists of
// dense floating tensors on one device, pairwise equal shapes, one supported (slow, fast) dtype pair
// for the whole call, no memory shared between any two tensors or within one, and alpha in (0, 1].
// Runs before any write, so a rejected call changes nothing.
CallPlan plan_lookahead_call(const char* op, at::TensorList slow, at::TensorList fast,
                             double alpha);

// lookahead_update_if_'s flags: `due` (run the sync at all) and the optional `restore` (fast <- slow,
// slow untouched) must be one-element bool tensors on the lists' device, read by the kernel itself
// so that a CUDA caller never waits for the host. Throws a ValueError/TypeError naming the flag.
void check_flags(at::TensorList slow, const at::Tensor& due, const std::optional<at::Tensor>& restore);

// Registered ops get no automatic version-counter bump; autograd and torch.compile rely on it to
// notice in-place writes, so every tensor of both lists is bumped (as ATen's foreach ops do).
void bump_versions(at::TensorList slow, at::TensorList fast);

// Pairs that are not flat arrays, one at a time through ATen (the reference the kernels match).
void update_strided(at::TensorList slow, at::TensorList fast, double alpha,
                    const std::vector<size_t>& indices);

// The gated form of update_strided, decided by the flags on their device with torch.where, so that
// it never reads them on the host either.
void update_strided_if(at::TensorList slow, at::TensorList fast, double alpha, const at::Tensor& due,
                       const std::optional<at::Tensor>& restore,
                       const std::vector<size_t>& indices);

// The op around a backend's kernel for flat pairs: plan the call, run flat_kernel(plan.flat) on the
// flat pairs, ATen's lerp_/copy_ on the others, then bump versions.
template <typename FlatKernel>
void lookahead_update_with(at::TensorList slow, at::TensorList fast, double alpha,
                           FlatKernel&& flat_kernel) {
  const CallPlan plan = plan_lookahead_call("lookahead_update_", slow, fast, alpha);
  if (!plan.flat.empty()) flat_kernel(plan.flat);
  if (!plan.strided.empty()) update_strided(slow, fast, alpha, plan.strided);
  bump_versions(slow, fast);
}

// lookahead_update_if_ around a backend's kernel for flat pairs, which reads the flags itself.
template <typename FlatKernel>
void lookahead_update_if_with(at::TensorList slow, at::TensorList fast, double alpha,
                              const at::Tensor& due, const std::optional<at::Tensor>& restore,
                              FlatKernel&& flat_kernel) {
  const CallPlan plan = plan_lookahead_call("lookahead_update_if_", slow, fast, alpha);
  check_flags(slow, due, restore);
  if (!plan.flat.empty()) flat_kernel(plan.flat);
  if (!plan.strided.empty()) update_strided_if(slow, fast, alpha, due, restore, plan.strided);
  bump_versions(slow, fast);
}

// found_nonfinite_'s view of its tensors: the dense ones as flat arrays, the others for ATen.
struct FlatTensor {
  const void* data;
  int64_t numel;
};

struct CheckPlan {
  std::vector<FlatTensor> flat;
  std::vector<size_t> strided;
};

// Validates found_nonfinite_(tensors, found, due): dense floating tensors of one dtype on one device,
// and `found` and `due` one-element bool tensors on that device. Throws naming the offending
// argument.
CheckPlan plan_nonfinite_check(at::TensorList tensors, const at::Tensor& found,
                               const std::optional<at::Tensor>& due);

// found |= (due and any element of tensors[i] is NaN or infinite), for the given i, with ATen on the
// device.
void found_nonfinite_strided(at::TensorList tensors, const at::Tensor& found,
                             const std::optional<at::Tensor>& due,
                             const std::vector<size_t>& indices);

// found_nonfinite_ around a backend's kernel for the flat tensors, which reads `due` itself; bumps
// found's version.
template <typename FlatKernel>
void found_nonfinite_with(at::TensorList tensors, const at::Tensor& found,
                          const std::optional<at::Tensor>& due, FlatKernel&& flat_kernel) {
  const CheckPlan plan = plan_nonfinite_check(tensors, found, due);
  if (!plan.flat.empty()) flat_kernel(plan.flat);
  if (!plan.strided.empty()) found_nonfinite_strided(tensors, found, due, plan.strided);
  bump_versions({}, {found});
}

}  // namespace lookahead
