// The ops' schemas (op_declarations.h) and autograd kernels, and the Python module that carries
// them. Backends: cpu/ and cuda/, one file per op; any_device.cpp for the rest (ATen one tensor
// at a time) and for meta tensors (validation only, which is what torch.compile traces).
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/grad_mode.h>
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>

#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/stream_swap.h"
#include "dtype_pairs.h"
#include "op_declarations.h"
#include "op_handles.h"
#include "python_calls.h"
#include "quantization.h"
#include "tensor_fingerprint.h"
#include "validation.h"

TORCH_LIBRARY(lookahead_cuda, m) {
#define LOOKAHEAD_DEFINE_SCHEMA(name, schema, ...) m.def(schema);
  LOOKAHEAD_FOR_EACH_OP(LOOKAHEAD_DEFINE_SCHEMA)
#undef LOOKAHEAD_DEFINE_SCHEMA
}

namespace {

// A list the op writes (alias-annotated `!` in its schema) must not require grad while grad mode is
// on: the update overwrites it in place and is not differentiable. Lists it only reads may.
template <typename Arg>
void check_not_written_with_grad(const c10::FunctionSchema& schema, size_t index, const Arg& arg) {
  if constexpr (std::is_same_v<Arg, at::TensorList>) {
    const c10::Argument& argument = schema.arguments()[index];
    if (argument.alias_info() == nullptr || !argument.alias_info()->isWrite()) return;
    for (size_t i = 0; i < arg.size(); ++i) {
      TORCH_CHECK_VALUE(!arg[i].requires_grad(), schema.name().substr(schema.name().find("::") + 2),
                        ": ", argument.name(), "[", i,
                        "] requires grad; the update overwrites it in place and is not "
                        "differentiable, so call it under torch.no_grad()");
    }
  }
}

// The ops' autograd kernels, explicit instead of torch's boxed fallback: they state the ops'
// autograd behaviour, and spare every call boxing each tensor of the lists.
template <typename Signature, const c10::TypedOperatorHandle<Signature>& (*kHandle)()>
struct AutogradKernel;

template <typename... Args, const c10::TypedOperatorHandle<void(Args...)>& (*kHandle)()>
struct AutogradKernel<void(Args...), kHandle> {
  static void call(Args... args) {
    if (at::GradMode::is_enabled()) {
      size_t index = 0;
      (check_not_written_with_grad(kHandle().schema(), index++, args), ...);
    }
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    kHandle().call(args...);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(lookahead_cuda, Autograd, m) {
#define LOOKAHEAD_IMPL_AUTOGRAD(name, schema, ...) \
  m.impl(#name, &AutogradKernel<__VA_ARGS__, &lookahead::name##op>::call);
  LOOKAHEAD_FOR_EACH_OP(LOOKAHEAD_IMPL_AUTOGRAD)
#undef LOOKAHEAD_IMPL_AUTOGRAD
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Compiled kernels of lookahead_cuda; the ops are registered under torch.ops.lookahead_cuda";
  m.def("build_info", [] {
    pybind11::dict info;
    info["torch"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) +
                    "." + std::to_string(TORCH_VERSION_PATCH);
#ifdef LOOKAHEAD_WITH_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
#ifdef _OPENMP
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
    return info;
  }, "How this extension was compiled: the torch it was built against, CUDA kernels, OpenMP.");
  m.def("op_names", [] {
#define LOOKAHEAD_OP_NAME(name, schema, ...) #name,
    return std::vector<std::string>{LOOKAHEAD_FOR_EACH_OP(LOOKAHEAD_OP_NAME)};
#undef LOOKAHEAD_OP_NAME
  }, "The names of the ops registered under torch.ops.lookahead_cuda (csrc/op_declarations.h).");
  m.def("quantization_block", [] { return lookahead::kQuantizationBlock; },
        "Elements per block of the 8-bit pseudo-gradients (quantization.h).");
  m.def("supported_dtype_pairs", [] {
    std::vector<std::pair<std::string, std::string>> pairs;
    for (const auto& [slow, fast] : lookahead::supported_pairs()) {
      pairs.emplace_back(lookahead::dtype_name(slow), lookahead::dtype_name(fast));
    }
    return pairs;
  }, "The (slow, fast) dtype pairs the ops support, as names such as 'torch.float32'.");
  m.def("supported_dtypes", [] {
    std::vector<std::string> names;
    for (const c10::ScalarType t : lookahead::supported_dtypes()) {
      names.push_back(lookahead::dtype_name(t));
    }
    return names;
  }, "The dtypes of the supported pairs, each once, as names such as 'torch.float32'.");
  m.def("check_sync",
        [](const std::vector<at::Tensor>& slow, const std::vector<at::Tensor>& fast,
           const std::optional<std::vector<at::Tensor>>& momentum, double alpha, double mu,
           std::vector<std::string> fast_names) {
          lookahead::ArgumentNames names(std::move(fast_names));
          if (momentum) {
            lookahead::validate_momentum_update("lookahead_momentum_update_", slow, fast,
                                                *momentum, alpha, mu, names);
          } else {
            lookahead::validate_update("lookahead_update_", slow, fast, alpha, names);
          }
        },
        pybind11::arg("slow"), pybind11::arg("fast"), pybind11::arg("momentum"),
        pybind11::arg("alpha"), pybind11::arg("mu"), pybind11::arg("fast_names"),
        "Raises the error the sync (lookahead_update_, or lookahead_momentum_update_ with a "
        "momentum list) would raise for these arguments, naming fast[i] fast_names[i]; does "
        "nothing otherwise.");
  pybind11::class_<lookahead::TensorFingerprint>(
      m, "TensorFingerprint",
      "What a validated set of tensors looked like (data address, dtype, device, sizes, strides): "
      "matches() tells, without validating again, whether any of them changed since.")
      .def(pybind11::init<const pybind11::sequence&>(), pybind11::arg("tensors"))
      .def("matches", &lookahead::TensorFingerprint::matches);
  m.def("stream_swap_", &lookahead::stream_swap_cpu, pybind11::arg("a"), pybind11::arg("b"),
        pybind11::call_guard<pybind11::gil_scoped_release>(),
        "Benchmark yardstick: exchange two float32 CPU tensors in place, streaming.");
  lookahead::def_python_calls(m);
}
