// The ops, each declared once: its name, its schema, and its C++ signature. Everything that names
// an op comes from this list: the schemas registered in lookahead.cpp, the typed dispatcher handles
// (op_handles.h), the autograd kernels (lookahead.cpp), the eager Python entry points
// (python_calls.cpp), and the Python wrappers' argument checks (lookahead_cuda/ops.py reads the
// registered schemas and _C.op_names()).
//
// lookahead_update_(slow, fast, alpha), for every pair i:
//   slow[i] <- slow[i] + alpha * (fast[i] - slow[i])    (rounded as torch.lerp_'s scalar form)
//   fast[i] <- slow[i]                                   (rounded through the slow dtype, as copy_)
// lookahead_update_if_(slow, fast, alpha, due, restore): the same sync decided by one-element bool
//   tensors read on the tensors' device, so a CUDA step never waits for the host and can be
//   captured in a CUDA graph: nothing unless due; if restore, fast[i] <- slow[i] with slow as it is.
// lookahead_momentum_update_(slow, fast, momentum, lr, mu, nesterov): the outer-momentum sync (SNOO;
//   DiLoCo's outer step) with the pseudo-gradient d = slow - fast, for every i:
//     momentum <- mu * momentum + d;  slow <- slow - lr * (d + mu * momentum)  (or - lr * momentum,
//     heavy ball);  fast <- slow.  lookahead_momentum_update_if_ is its gated form.
// found_nonfinite_(tensors, found, due): found <- found or (some element is NaN or infinite); nothing
//   read unless due (a one-element bool tensor on the device; None: always), so that a step whose
//   sync is decided on the device checks the weights only when the sync is due.
// quantize_pseudo_gradients_(slow, fast, payload, scales): the pseudo-gradients slow - fast in 8
//   bits (quantization.h): payload (int8, one per element) and scales (float32, one per block).
// dequantize_mean_(slow, out, payloads, scales): out <- slow - the mean of every worker's
//   dequantized pseudo-gradients (payloads and scales: one row per worker).
//
// X(name, schema, signature...): the signature last, since its commas would split a macro argument.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#define LOOKAHEAD_FOR_EACH_OP(X)                                                                  \
  X(lookahead_update_,                                                                           \
    "lookahead_update_(Tensor(a!)[] slow, Tensor(b!)[] fast, float alpha) -> ()",                \
    void(at::TensorList, at::TensorList, double))                                                \
  X(lookahead_update_if_,                                                                        \
    "lookahead_update_if_(Tensor(a!)[] slow, Tensor(b!)[] fast, float alpha, Tensor due, "       \
    "Tensor? restore=None) -> ()",                                                               \
    void(at::TensorList, at::TensorList, double, const at::Tensor&,                              \
         const std::optional<at::Tensor>&))                                                      \
  X(lookahead_momentum_update_,                                                                  \
    "lookahead_momentum_update_(Tensor(a!)[] slow, Tensor(b!)[] fast, Tensor(c!)[] momentum, "   \
    "float lr, float mu, bool nesterov) -> ()",                                                  \
    void(at::TensorList, at::TensorList, at::TensorList, double, double, bool))                  \
  X(lookahead_momentum_update_if_,                                                               \
    "lookahead_momentum_update_if_(Tensor(a!)[] slow, Tensor(b!)[] fast, Tensor(c!)[] momentum, "\
    "float lr, float mu, bool nesterov, Tensor due, Tensor? restore=None) -> ()",                \
    void(at::TensorList, at::TensorList, at::TensorList, double, double, bool, const at::Tensor&, \
         const std::optional<at::Tensor>&))                                                      \
  X(found_nonfinite_,                                                                            \
    "found_nonfinite_(Tensor[] tensors, Tensor(a!) found, Tensor? due=None) -> ()",              \
    void(at::TensorList, const at::Tensor&, const std::optional<at::Tensor>&))                   \
  X(quantize_pseudo_gradients_,                                                                  \
    "quantize_pseudo_gradients_(Tensor[] slow, Tensor[] fast, Tensor(a!) payload, "              \
    "Tensor(b!) scales) -> ()",                                                                  \
    void(at::TensorList, at::TensorList, const at::Tensor&, const at::Tensor&))                  \
  X(dequantize_mean_,                                                                            \
    "dequantize_mean_(Tensor[] slow, Tensor(a!)[] out, Tensor payloads, Tensor scales) -> ()",   \
    void(at::TensorList, at::TensorList, const at::Tensor&, const at::Tensor&))

namespace lookahead {

// The ops as values, for code written once per op (op_skeleton.h's OpSpec<Op::...>).
enum class Op {
#define LOOKAHEAD_OP_ENUMERATOR(name, schema, ...) name,
  LOOKAHEAD_FOR_EACH_OP(LOOKAHEAD_OP_ENUMERATOR)
#undef LOOKAHEAD_OP_ENUMERATOR
};

// Each op's C++ signature.
template <Op>
struct OpSignature;
#define LOOKAHEAD_OP_SIGNATURE(name, schema, ...) \
  template <>                                     \
  struct OpSignature<Op::name> {                  \
    using type = __VA_ARGS__;                     \
  };
LOOKAHEAD_FOR_EACH_OP(LOOKAHEAD_OP_SIGNATURE)
#undef LOOKAHEAD_OP_SIGNATURE

}  // namespace lookahead
