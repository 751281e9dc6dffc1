// The ops' typed dispatcher handles, for the C++ code that calls them: the autograd kernels
// (lookahead.cpp) and the Python entry points (python_calls.cpp). Looked up once, at first use.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>

namespace lookahead {

using UpdateSignature = void(at::TensorList, at::TensorList, double);
using UpdateIfSignature = void(at::TensorList, at::TensorList, double, const at::Tensor&,
                               const std::optional<at::Tensor>&);
using MomentumUpdateSignature = void(at::TensorList, at::TensorList, at::TensorList, double, double,
                                     bool);
using MomentumUpdateIfSignature = void(at::TensorList, at::TensorList, at::TensorList, double,
                                       double, bool, const at::Tensor&,
                                       const std::optional<at::Tensor>&);
using FoundNonfiniteSignature = void(at::TensorList, const at::Tensor&,
                                     const std::optional<at::Tensor>&);

inline const c10::TypedOperatorHandle<UpdateSignature>& lookahead_update_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lookahead_cuda::lookahead_update_", "")
                             .typed<UpdateSignature>();
  return op;
}

inline const c10::TypedOperatorHandle<UpdateIfSignature>& lookahead_update_if_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lookahead_cuda::lookahead_update_if_", "")
                             .typed<UpdateIfSignature>();
  return op;
}

inline const c10::TypedOperatorHandle<MomentumUpdateSignature>& lookahead_momentum_update_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lookahead_cuda::lookahead_momentum_update_", "")
                             .typed<MomentumUpdateSignature>();
  return op;
}

inline const c10::TypedOperatorHandle<MomentumUpdateIfSignature>& lookahead_momentum_update_if_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lookahead_cuda::lookahead_momentum_update_if_", "")
                             .typed<MomentumUpdateIfSignature>();
  return op;
}

inline const c10::TypedOperatorHandle<FoundNonfiniteSignature>& found_nonfinite_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lookahead_cuda::found_nonfinite_", "")
                             .typed<FoundNonfiniteSignature>();
  return op;
}

}  // namespace lookahead
