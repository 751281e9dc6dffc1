// The ops on devices without a kernel of ours (and on empty lists, which name no device): the same
// validation, then ATen one tensor at a time. On meta tensors (what torch.compile traces with), the
// validation alone, so that a call rejected at run time is rejected when it is traced.
#include <torch/library.h>

#include "op_skeleton.h"

namespace lookahead {
namespace {

void lookahead_update_any(at::TensorList slow, at::TensorList fast, double alpha) {
  validate_update("lookahead_update_", slow, fast, alpha);
  update_with_aten(slow, fast, alpha, all_indices(slow.size()));
  bump_versions(slow);
  bump_versions(fast);
}

void lookahead_update_if_any(at::TensorList slow, at::TensorList fast, double alpha,
                             const at::Tensor& due, const std::optional<at::Tensor>& restore) {
  validate_update("lookahead_update_if_", slow, fast, alpha);
  validate_update_flags("lookahead_update_if_", slow, due, restore);
  update_if_with_aten(slow, fast, alpha, due, restore, all_indices(slow.size()));
  bump_versions(slow);
  bump_versions(fast);
}

void lookahead_momentum_update_any(at::TensorList slow, at::TensorList fast,
                                   at::TensorList momentum, double lr, double mu, bool nesterov) {
  validate_momentum_update("lookahead_momentum_update_", slow, fast, momentum, lr, mu);
  momentum_update_with_aten(slow, fast, momentum, lr, mu, nesterov, all_indices(slow.size()));
  bump_versions(slow);
  bump_versions(fast);
  bump_versions(momentum);
}

void lookahead_momentum_update_if_any(at::TensorList slow, at::TensorList fast,
                                      at::TensorList momentum, double lr, double mu,
                                      bool nesterov, const at::Tensor& due,
                                      const std::optional<at::Tensor>& restore) {
  constexpr const char* kOp = "lookahead_momentum_update_if_";
  validate_momentum_update(kOp, slow, fast, momentum, lr, mu);
  validate_update_flags(kOp, slow, due, restore);
  momentum_update_if_with_aten(slow, fast, momentum, lr, mu, nesterov, due, restore,
                               all_indices(slow.size()));
  bump_versions(slow);
  bump_versions(fast);
  bump_versions(momentum);
}

void found_nonfinite_any(at::TensorList tensors, const at::Tensor& found,
                         const std::optional<at::Tensor>& due) {
  validate_nonfinite_check(tensors, found, due);
  found_nonfinite_with_aten(tensors, found, due, all_indices(tensors.size()));
  bump_versions({found});
}

void lookahead_update_meta(at::TensorList slow, at::TensorList fast, double alpha) {
  validate_update("lookahead_update_", slow, fast, alpha);
}

void lookahead_update_if_meta(at::TensorList slow, at::TensorList fast, double alpha,
                              const at::Tensor& due, const std::optional<at::Tensor>& restore) {
  validate_update("lookahead_update_if_", slow, fast, alpha);
  validate_update_flags("lookahead_update_if_", slow, due, restore);
}

void lookahead_momentum_update_meta(at::TensorList slow, at::TensorList fast,
                                    at::TensorList momentum, double lr, double mu, bool) {
  validate_momentum_update("lookahead_momentum_update_", slow, fast, momentum, lr, mu);
}

void lookahead_momentum_update_if_meta(at::TensorList slow, at::TensorList fast,
                                       at::TensorList momentum, double lr, double mu, bool,
                                       const at::Tensor& due,
                                       const std::optional<at::Tensor>& restore) {
  constexpr const char* kOp = "lookahead_momentum_update_if_";
  validate_momentum_update(kOp, slow, fast, momentum, lr, mu);
  validate_update_flags(kOp, slow, due, restore);
}

void found_nonfinite_meta(at::TensorList tensors, const at::Tensor& found,
                          const std::optional<at::Tensor>& due) {
  validate_nonfinite_check(tensors, found, due);
}

}  // namespace

TORCH_LIBRARY_IMPL(lookahead_cuda, CompositeExplicitAutograd, m) {
  m.impl("lookahead_update_", &lookahead_update_any);
  m.impl("lookahead_update_if_", &lookahead_update_if_any);
  m.impl("lookahead_momentum_update_", &lookahead_momentum_update_any);
  m.impl("lookahead_momentum_update_if_", &lookahead_momentum_update_if_any);
  m.impl("found_nonfinite_", &found_nonfinite_any);
}

TORCH_LIBRARY_IMPL(lookahead_cuda, Meta, m) {
  m.impl("lookahead_update_", &lookahead_update_meta);
  m.impl("lookahead_update_if_", &lookahead_update_if_meta);
  m.impl("lookahead_momentum_update_", &lookahead_momentum_update_meta);
  m.impl("lookahead_momentum_update_if_", &lookahead_momentum_update_if_meta);
  m.impl("found_nonfinite_", &found_nonfinite_meta);
}

}  // namespace lookahead
