// The ops through ATen's own lerp_/copy_/where/isfinite, one tensor at a time: for pairs that are
// not two flat arrays in the same element order, and for devices without a kernel of ours. ATen is
// the reference the kernels match, so this path is bitwise what they compute.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace lookahead {

// slow[i].lerp_(fast[i], alpha); fast[i].copy_(slow[i]) for each i in indices.
void update_with_aten(at::TensorList slow, at::TensorList fast, double alpha,
                      const std::vector<size_t>& indices);

// The same, decided by the flags on their device with torch.where, so that the host never reads
// them: nothing unless due; with restore, fast[i].copy_(slow[i]) and slow[i] as it is.
void update_if_with_aten(at::TensorList slow, at::TensorList fast, double alpha,
                         const at::Tensor& due, const std::optional<at::Tensor>& restore,
                         const std::vector<size_t>& indices);

// The outer-momentum sync, computed in the slow dtype's math type, for each i in indices:
//   d = slow - fast;  momentum = mu * momentum + d;  step = nesterov ? d + mu * momentum : momentum
//   slow = slow - lr * step;  fast = slow
// Rounded per operation, so not bitwise what the kernels (one rounding per multiply-add) compute.
void momentum_update_with_aten(at::TensorList slow, at::TensorList fast, at::TensorList momentum,
                               double lr, double mu, bool nesterov,
                               const std::vector<size_t>& indices);

// The same, decided by the flags on their device: nothing unless due; with restore,
// fast[i].copy_(slow[i]) with slow and momentum as they are.
void momentum_update_if_with_aten(at::TensorList slow, at::TensorList fast, at::TensorList momentum,
                                  double lr, double mu, bool nesterov, const at::Tensor& due,
                                  const std::optional<at::Tensor>& restore,
                                  const std::vector<size_t>& indices);

// found |= (due and some element of tensors[i] is NaN or infinite), for each i in indices.
void found_nonfinite_with_aten(at::TensorList tensors, const at::Tensor& found,
                               const std::optional<at::Tensor>& due,
                               const std::vector<size_t>& indices);

// Every index of a list of n tensors: for devices where ATen does all of it.
std::vector<size_t> all_indices(size_t n);

}  // namespace lookahead
