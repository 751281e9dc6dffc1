// The op's schema, and the Python module that carries it.
//
// lookahead_update_(slow, fast, alpha), for every pair i:
//   slow[i] <- slow[i] + alpha * (fast[i] - slow[i])    (rounded exactly as torch.lerp_)
//   fast[i] <- slow[i]                                   (rounded through the slow dtype, as copy_)
// Backends: cpu/lookahead_update.cpp, cuda/lookahead_update.cu; the fake (meta) kernel for
// torch.compile lives in lookahead_cuda/ops.py. The update is not differentiable: autograd only
// refuses tensors that would need a gradient through it.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>

#include <string>

#include "cpu/stream_swap.h"

TORCH_LIBRARY(lookahead_cuda, m) {
  m.def("lookahead_update_(Tensor(a!)[] slow, Tensor(b!)[] fast, float alpha) -> ()");
}

namespace {

void check_no_grad_required(at::TensorList tensors, const char* list) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK_VALUE(!tensors[i].requires_grad(), "lookahead_update_: ", list, "[", i,
                      "] requires grad; the update overwrites it in place and is not "
                      "differentiable, so call it under torch.no_grad()");
  }
}

// An explicit autograd kernel instead of torch's boxed fallback: it states the op's autograd
// behaviour, and spares every call boxing each tensor of both lists.
void lookahead_update_autograd(at::TensorList slow, at::TensorList fast, double alpha) {
  if (at::GradMode::is_enabled()) {
    check_no_grad_required(slow, "slow");
    check_no_grad_required(fast, "fast");
  }
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lookahead_cuda::lookahead_update_", "")
                             .typed<void(at::TensorList, at::TensorList, double)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  op.call(slow, fast, alpha);
}

}  // namespace

TORCH_LIBRARY_IMPL(lookahead_cuda, Autograd, m) {
  m.impl("lookahead_update_", &lookahead_update_autograd);
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
  m.def("stream_swap_", &lookahead::stream_swap_cpu, pybind11::arg("a"), pybind11::arg("b"),
        pybind11::call_guard<pybind11::gil_scoped_release>(),
        "Benchmark yardstick: exchange two float32 CPU tensors in place, streaming.");
}
