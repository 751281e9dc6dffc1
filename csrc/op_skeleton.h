// What every backend of the ops does around its kernel: validate and sort the tensors first, run
// the kernel on the flat ones and ATen on the others, bump versions last. A backend file (cpu/,
// cuda/) is one of these with its kernel for flat tensors.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "aten_path.h"
#include "validation.h"

namespace lookahead {

// Registered ops get no automatic version-counter bump (and ATen's in-place ops, called below
// autograd, bump nothing either); autograd and torch.compile rely on it to notice in-place writes,
// so every written tensor is bumped, as ATen's foreach ops do. TensorImpl's own (inline) bump:
// what torch::autograd's does, less a call per tensor.
inline void bump_versions(at::TensorList written) {
  for (const auto& t : written) t.unsafeGetTensorImpl()->bump_version();
}

template <typename FlatKernel>
void run_update(at::TensorList slow, at::TensorList fast, double alpha, FlatKernel&& flat_kernel) {
  const Layout layout = validate_update("lookahead_update_", slow, fast, alpha);
  if (!layout.flat.empty()) flat_kernel(layout.flat);
  if (!layout.strided.empty()) update_with_aten(slow, fast, alpha, layout.strided);
  bump_versions(slow);
  bump_versions(fast);
}

// The flat kernel of the gated form reads the flags itself.
template <typename FlatKernel>
void run_update_if(at::TensorList slow, at::TensorList fast, double alpha, const at::Tensor& due,
                   const std::optional<at::Tensor>& restore, FlatKernel&& flat_kernel) {
  const Layout layout = validate_update("lookahead_update_if_", slow, fast, alpha);
  validate_update_flags("lookahead_update_if_", slow, due, restore);
  if (!layout.flat.empty()) flat_kernel(layout.flat);
  if (!layout.strided.empty()) update_if_with_aten(slow, fast, alpha, due, restore, layout.strided);
  bump_versions(slow);
  bump_versions(fast);
}

template <typename FlatKernel>
void run_momentum_update(at::TensorList slow, at::TensorList fast, at::TensorList momentum,
                         double lr, double mu, bool nesterov, FlatKernel&& flat_kernel) {
  const Layout layout =
      validate_momentum_update("lookahead_momentum_update_", slow, fast, momentum, lr, mu);
  if (!layout.flat.empty()) flat_kernel(layout.flat);
  if (!layout.strided.empty()) {
    momentum_update_with_aten(slow, fast, momentum, lr, mu, nesterov, layout.strided);
  }
  bump_versions(slow);
  bump_versions(fast);
  bump_versions(momentum);
}

template <typename FlatKernel>
void run_momentum_update_if(at::TensorList slow, at::TensorList fast, at::TensorList momentum,
                            double lr, double mu, bool nesterov, const at::Tensor& due,
                            const std::optional<at::Tensor>& restore, FlatKernel&& flat_kernel) {
  constexpr const char* kOp = "lookahead_momentum_update_if_";
  const Layout layout = validate_momentum_update(kOp, slow, fast, momentum, lr, mu);
  validate_update_flags(kOp, slow, due, restore);
  if (!layout.flat.empty()) flat_kernel(layout.flat);
  if (!layout.strided.empty()) {
    momentum_update_if_with_aten(slow, fast, momentum, lr, mu, nesterov, due, restore,
                                 layout.strided);
  }
  bump_versions(slow);
  bump_versions(fast);
  bump_versions(momentum);
}

// The flat kernel reads `due` itself.
template <typename FlatKernel>
void run_found_nonfinite(at::TensorList tensors, const at::Tensor& found,
                         const std::optional<at::Tensor>& due, FlatKernel&& flat_kernel) {
  const Layout layout = validate_nonfinite_check(tensors, found, due);
  if (!layout.flat.empty()) flat_kernel(layout.flat);
  if (!layout.strided.empty()) found_nonfinite_with_aten(tensors, found, due, layout.strided);
  bump_versions({found});
}

}  // namespace lookahead
