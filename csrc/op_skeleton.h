// What every backend does around its kernel, written once per op: validate the call (and sort its
// tensors by layout), run the kernel on the flat tensors and ATen on the others, bump the written
// tensors' versions last. An op's part of that is its OpSpec (its validation, its ATen path, the
// lists it writes); a backend runs it with its kernel for flat tensors (run), with ATen alone
// (OpKernels::aten: devices without a kernel of ours), or validates only (OpKernels::meta: meta
// tensors, which torch.compile traces with, so a call rejected at run time is rejected traced).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "aten_path.h"
#include "op_declarations.h"
#include "validation.h"

namespace lookahead {

// Registered ops get no automatic version-counter bump (and ATen's in-place ops, called below
// autograd, bump nothing either); autograd and torch.compile rely on it to notice in-place writes,
// so every written tensor is bumped, as ATen's foreach ops do. TensorImpl's own (inline) bump:
// what torch::autograd's does, less a call per tensor.
inline void bump_versions(at::TensorList written) {
  for (const auto& t : written) t.unsafeGetTensorImpl()->bump_version();
}

template <Op>
struct OpSpec;

template <>
struct OpSpec<Op::lookahead_update_> {
  static Layout validate(at::TensorList slow, at::TensorList fast, double alpha) {
    return validate_update("lookahead_update_", slow, fast, alpha);
  }
  static void aten(const std::vector<size_t>& indices, at::TensorList slow, at::TensorList fast,
                   double alpha) {
    update_with_aten(slow, fast, alpha, indices);
  }
  static void bump(at::TensorList slow, at::TensorList fast, double) {
    bump_versions(slow);
    bump_versions(fast);
  }
};

// The flat kernel of a gated form reads the flags itself.
template <>
struct OpSpec<Op::lookahead_update_if_> {
  static Layout validate(at::TensorList slow, at::TensorList fast, double alpha,
                         const at::Tensor& due, const std::optional<at::Tensor>& restore) {
    Layout layout = validate_update("lookahead_update_if_", slow, fast, alpha);
    validate_update_flags("lookahead_update_if_", slow, due, restore);
    return layout;
  }
  static void aten(const std::vector<size_t>& indices, at::TensorList slow, at::TensorList fast,
                   double alpha, const at::Tensor& due, const std::optional<at::Tensor>& restore) {
    update_if_with_aten(slow, fast, alpha, due, restore, indices);
  }
  static void bump(at::TensorList slow, at::TensorList fast, double, const at::Tensor&,
                   const std::optional<at::Tensor>&) {
    bump_versions(slow);
    bump_versions(fast);
  }
};

template <>
struct OpSpec<Op::lookahead_momentum_update_> {
  static Layout validate(at::TensorList slow, at::TensorList fast, at::TensorList momentum,
                         double lr, double mu, bool) {
    return validate_momentum_update("lookahead_momentum_update_", slow, fast, momentum, lr, mu);
  }
  static void aten(const std::vector<size_t>& indices, at::TensorList slow, at::TensorList fast,
                   at::TensorList momentum, double lr, double mu, bool nesterov) {
    momentum_update_with_aten(slow, fast, momentum, lr, mu, nesterov, indices);
  }
  static void bump(at::TensorList slow, at::TensorList fast, at::TensorList momentum, double,
                   double, bool) {
    bump_versions(slow);
    bump_versions(fast);
    bump_versions(momentum);
  }
};

template <>
struct OpSpec<Op::lookahead_momentum_update_if_> {
  static Layout validate(at::TensorList slow, at::TensorList fast, at::TensorList momentum,
                         double lr, double mu, bool, const at::Tensor& due,
                         const std::optional<at::Tensor>& restore) {
    constexpr const char* kOp = "lookahead_momentum_update_if_";
    Layout layout = validate_momentum_update(kOp, slow, fast, momentum, lr, mu);
    validate_update_flags(kOp, slow, due, restore);
    return layout;
  }
  static void aten(const std::vector<size_t>& indices, at::TensorList slow, at::TensorList fast,
                   at::TensorList momentum, double lr, double mu, bool nesterov,
                   const at::Tensor& due, const std::optional<at::Tensor>& restore) {
    momentum_update_if_with_aten(slow, fast, momentum, lr, mu, nesterov, due, restore, indices);
  }
  static void bump(at::TensorList slow, at::TensorList fast, at::TensorList momentum, double,
                   double, bool, const at::Tensor&, const std::optional<at::Tensor>&) {
    bump_versions(slow);
    bump_versions(fast);
    bump_versions(momentum);
  }
};

// The flat kernel reads `due` itself.
template <>
struct OpSpec<Op::found_nonfinite_> {
  static Layout validate(at::TensorList tensors, const at::Tensor& found,
                         const std::optional<at::Tensor>& due) {
    return validate_nonfinite_check(tensors, found, due);
  }
  static void aten(const std::vector<size_t>& indices, at::TensorList tensors,
                   const at::Tensor& found, const std::optional<at::Tensor>& due) {
    found_nonfinite_with_aten(tensors, found, due, indices);
  }
  static void bump(at::TensorList, const at::Tensor& found, const std::optional<at::Tensor>&) {
    bump_versions({found});
  }
};

// The 8-bit ops take flat tensors only (validation refuses others): no ATen path, and so no
// devices but those with a kernel (the CPU and CUDA). Empty lists, which name no device, are fine.
inline void only_with_kernels(const char* op, const std::vector<size_t>& indices) {
  TORCH_CHECK_NOT_IMPLEMENTED(indices.empty(), op, " runs on the CPU and on CUDA only");
}

template <>
struct OpSpec<Op::quantize_pseudo_gradients_> {
  static Layout validate(at::TensorList slow, at::TensorList fast, const at::Tensor& payload,
                         const at::Tensor& scales) {
    return validate_quantization("quantize_pseudo_gradients_", slow, fast, payload, scales,
                                 /*gathered=*/false);
  }
  static void aten(const std::vector<size_t>& indices, at::TensorList, at::TensorList,
                   const at::Tensor&, const at::Tensor&) {
    only_with_kernels("quantize_pseudo_gradients_", indices);
  }
  static void bump(at::TensorList, at::TensorList, const at::Tensor& payload,
                   const at::Tensor& scales) {
    bump_versions({payload, scales});
  }
};

template <>
struct OpSpec<Op::dequantize_mean_> {
  static Layout validate(at::TensorList slow, at::TensorList out, const at::Tensor& payloads,
                         const at::Tensor& scales) {
    return validate_quantization("dequantize_mean_", slow, out, payloads, scales,
                                 /*gathered=*/true);
  }
  static void aten(const std::vector<size_t>& indices, at::TensorList, at::TensorList,
                   const at::Tensor&, const at::Tensor&) {
    only_with_kernels("dequantize_mean_", indices);
  }
  static void bump(at::TensorList, at::TensorList out, const at::Tensor&, const at::Tensor&) {
    bump_versions(out);
  }
};

// Runs op with flat_kernel(layout.flat) for the tensors a kernel of ours takes.
template <Op op, typename FlatKernel, typename... Args>
void run(const FlatKernel& flat_kernel, const Args&... args) {
  const Layout layout = OpSpec<op>::validate(args...);
  if (!layout.flat.empty()) flat_kernel(layout.flat);
  if (!layout.strided.empty()) OpSpec<op>::aten(layout.strided, args...);
  OpSpec<op>::bump(args...);
}

// Every op's first argument is a list of tensors.
template <typename... Rest>
size_t list_size(at::TensorList first, const Rest&...) {
  return first.size();
}

template <Op op, typename Signature = typename OpSignature<op>::type>
struct OpKernels;

template <Op op, typename... Args>
struct OpKernels<op, void(Args...)> {
  static void aten(Args... args) {
    OpSpec<op>::validate(args...);
    OpSpec<op>::aten(all_indices(list_size(args...)), args...);
    OpSpec<op>::bump(args...);
  }
  static void meta(Args... args) { OpSpec<op>::validate(args...); }
};

}  // namespace lookahead
