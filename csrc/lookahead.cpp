// The ops' schemas, their autograd kernels, and the Python module that carries them.
//
// lookahead_update_(slow, fast, alpha), for every pair i:
//   slow[i] <- slow[i] + alpha * (fast[i] - slow[i])    (rounded exactly as torch.lerp_)
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
// Backends: cpu/ and cuda/, one file per op; any_device.cpp for the rest (ATen one tensor at a time)
// and for meta tensors (validation only, which is what torch.compile traces). The updates are not
// differentiable: autograd only refuses tensors that would need a gradient through them.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/grad_mode.h>
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "cpu/stream_swap.h"
#include "dtype_pairs.h"
#include "op_handles.h"
#include "python_calls.h"
#include "validation.h"

TORCH_LIBRARY(lookahead_cuda, m) {
  m.def("lookahead_update_(Tensor(a!)[] slow, Tensor(b!)[] fast, float alpha) -> ()");
  m.def(
      "lookahead_update_if_(Tensor(a!)[] slow, Tensor(b!)[] fast, float alpha, Tensor due, "
      "Tensor? restore=None) -> ()");
  m.def(
      "lookahead_momentum_update_(Tensor(a!)[] slow, Tensor(b!)[] fast, Tensor(c!)[] momentum, "
      "float lr, float mu, bool nesterov) -> ()");
  m.def(
      "lookahead_momentum_update_if_(Tensor(a!)[] slow, Tensor(b!)[] fast, Tensor(c!)[] momentum, "
      "float lr, float mu, bool nesterov, Tensor due, Tensor? restore=None) -> ()");
  m.def("found_nonfinite_(Tensor[] tensors, Tensor(a!) found, Tensor? due=None) -> ()");
}

namespace {

void check_no_grad_required(const char* op, at::TensorList tensors, const char* list) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK_VALUE(!tensors[i].requires_grad(), op, ": ", list, "[", i,
                      "] requires grad; the update overwrites it in place and is not "
                      "differentiable, so call it under torch.no_grad()");
  }
}

// Explicit autograd kernels instead of torch's boxed fallback: they state the ops' autograd
// behaviour, and spare every call boxing each tensor of the lists.
void lookahead_update_autograd(at::TensorList slow, at::TensorList fast, double alpha) {
  if (at::GradMode::is_enabled()) {
    check_no_grad_required("lookahead_update_", slow, "slow");
    check_no_grad_required("lookahead_update_", fast, "fast");
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  lookahead::lookahead_update_op().call(slow, fast, alpha);
}

void lookahead_update_if_autograd(at::TensorList slow, at::TensorList fast, double alpha,
                                  const at::Tensor& due, const std::optional<at::Tensor>& restore) {
  if (at::GradMode::is_enabled()) {
    check_no_grad_required("lookahead_update_if_", slow, "slow");
    check_no_grad_required("lookahead_update_if_", fast, "fast");
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  lookahead::lookahead_update_if_op().call(slow, fast, alpha, due, restore);
}

void lookahead_momentum_update_autograd(at::TensorList slow, at::TensorList fast,
                                        at::TensorList momentum, double lr, double mu,
                                        bool nesterov) {
  if (at::GradMode::is_enabled()) {
    check_no_grad_required("lookahead_momentum_update_", slow, "slow");
    check_no_grad_required("lookahead_momentum_update_", fast, "fast");
    check_no_grad_required("lookahead_momentum_update_", momentum, "momentum");
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  lookahead::lookahead_momentum_update_op().call(slow, fast, momentum, lr, mu, nesterov);
}

void lookahead_momentum_update_if_autograd(at::TensorList slow, at::TensorList fast,
                                           at::TensorList momentum, double lr, double mu,
                                           bool nesterov, const at::Tensor& due,
                                           const std::optional<at::Tensor>& restore) {
  if (at::GradMode::is_enabled()) {
    check_no_grad_required("lookahead_momentum_update_if_", slow, "slow");
    check_no_grad_required("lookahead_momentum_update_if_", fast, "fast");
    check_no_grad_required("lookahead_momentum_update_if_", momentum, "momentum");
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  lookahead::lookahead_momentum_update_if_op().call(slow, fast, momentum, lr, mu, nesterov, due,
                                                    restore);
}

// Only reads its tensors (which may require grad) and writes a bool flag: nothing to differentiate.
void found_nonfinite_autograd(at::TensorList tensors, const at::Tensor& found,
                              const std::optional<at::Tensor>& due) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  lookahead::found_nonfinite_op().call(tensors, found, due);
}

}  // namespace

TORCH_LIBRARY_IMPL(lookahead_cuda, Autograd, m) {
  m.impl("lookahead_update_", &lookahead_update_autograd);
  m.impl("lookahead_update_if_", &lookahead_update_if_autograd);
  m.impl("lookahead_momentum_update_", &lookahead_momentum_update_autograd);
  m.impl("lookahead_momentum_update_if_", &lookahead_momentum_update_if_autograd);
  m.impl("found_nonfinite_", &found_nonfinite_autograd);
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
  m.def("supported_dtype_pairs", [] {
    std::vector<std::pair<std::string, std::string>> pairs;
    for (const auto& [slow, fast] : lookahead::supported_pairs()) {
      pairs.emplace_back(lookahead::dtype_name(slow), lookahead::dtype_name(fast));
    }
    return pairs;
  }, "The (slow, fast) dtype pairs the ops support, as names such as 'torch.float32'.");
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
  m.def("stream_swap_", &lookahead::stream_swap_cpu, pybind11::arg("a"), pybind11::arg("b"),
        pybind11::call_guard<pybind11::gil_scoped_release>(),
        "Benchmark yardstick: exchange two float32 CPU tensors in place, streaming.");
  lookahead::def_python_calls(m);
}
