// Eager calls of the ops from Python that skip the boxed path of torch.ops.
//
// torch.ops boxes every tensor of a list into an IValue, and the dispatcher drops those IValues with
// the GIL released; a tensor that has a Python object then re-acquires the GIL to decrement that
// object, once per tensor. On the CPU machine a call with 3000 one-element pairs takes about 1.0 ms
// through torch.ops and 0.3 ms through these entry points (3000 pairs of 64x64 stream in about
// 5 ms). They borrow the tensors instead (no reference count changes) and call the same registered
// ops through the dispatcher, unboxed, so every dispatch key (autograd, Python modes, profiler,
// tracing) still applies. They decline, doing nothing, when an argument is anything but what the
// schema names (a tensor subclass may override __torch_function__; a bool is no float) or a
// __torch_function__ mode is active; the Python wrappers in lookahead_cuda/ops.py then check the
// arguments' types and go through torch.ops.
#include "python_calls.h"

#include <ATen/PythonTorchFunctionTLS.h>
#include <torch/csrc/autograd/python_variable.h>

#include <initializer_list>
#include <optional>
#include <utility>
#include <vector>

#include "op_handles.h"

namespace lookahead {
namespace {

namespace py = pybind11;

// The tensors of a Python sequence, borrowed. The tuple snapshot holds every element, so a list
// that another thread empties while the GIL is released cannot free a tensor in use.
class BorrowedTensors {
 public:
  // nullopt unless sequence is a list or tuple whose every element is a plain tensor
  // (torch.Tensor or nn.Parameter).
  static std::optional<BorrowedTensors> of(py::handle sequence) {
    if (!PyList_Check(sequence.ptr()) && !PyTuple_Check(sequence.ptr())) return std::nullopt;
    BorrowedTensors borrowed;
    borrowed.snapshot_ = py::reinterpret_steal<py::tuple>(PySequence_Tuple(sequence.ptr()));
    if (!borrowed.snapshot_) throw py::error_already_set();
    borrowed.tensors_.reserve(borrowed.snapshot_.size());
    for (const py::handle item : borrowed.snapshot_) {
      if (!THPVariable_CheckExact(item.ptr())) return std::nullopt;
      borrowed.tensors_.push_back(
          c10::MaybeOwnedTraits<at::Tensor>::createBorrow(THPVariable_Unpack(item.ptr())));
    }
    return borrowed;
  }

  BorrowedTensors(BorrowedTensors&&) = default;
  BorrowedTensors& operator=(BorrowedTensors&&) = delete;
  ~BorrowedTensors() {
    for (at::Tensor& t : tensors_) c10::MaybeOwnedTraits<at::Tensor>::destroyBorrow(t);
  }

  at::TensorList list() const { return tensors_; }

 private:
  BorrowedTensors() = default;
  py::tuple snapshot_;
  std::vector<at::Tensor> tensors_;
};

bool plain_tensor(py::handle object) { return THPVariable_CheckExact(object.ptr()); }

// A Tensor? argument: None, or a plain tensor (one counted reference: a single tensor is cheap).
bool optional_tensor(py::handle object, std::optional<at::Tensor>& out) {
  if (object.is_none()) return true;
  if (!plain_tensor(object)) return false;
  out = THPVariable_Unpack(object.ptr());
  return true;
}

// alpha as the schema's float takes it (a Python float or int, not a bool); anything else is left to
// the Python wrapper's checks.
std::optional<double> plain_float(py::handle object) {
  if (PyBool_Check(object.ptr())) return std::nullopt;
  if (!PyFloat_Check(object.ptr()) && !PyLong_Check(object.ptr())) return std::nullopt;
  const double value = PyFloat_AsDouble(object.ptr());
  if (value == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    return std::nullopt;
  }
  return value;
}

std::optional<bool> plain_bool(py::handle object) {
  if (!PyBool_Check(object.ptr())) return std::nullopt;
  return object.ptr() == Py_True;
}

// Every sequence borrowed, or nullopt if one is not a list or tuple of plain tensors.
std::optional<std::vector<BorrowedTensors>> borrow_lists(
    std::initializer_list<py::handle> sequences) {
  std::vector<BorrowedTensors> lists;
  lists.reserve(sequences.size());
  for (const py::handle sequence : sequences) {
    std::optional<BorrowedTensors> borrowed = BorrowedTensors::of(sequence);
    if (!borrowed) return std::nullopt;
    lists.push_back(std::move(*borrowed));
  }
  return lists;
}

// The flags of the gated ops and found_nonfinite_: a plain tensor, then None or a plain tensor.
bool plain_flags(py::handle required, py::handle optional, std::optional<at::Tensor>& out) {
  return plain_tensor(required) && optional_tensor(optional, out);
}

bool try_lookahead_update(py::handle slow, py::handle fast, py::handle alpha) {
  const std::optional<double> alpha_value = plain_float(alpha);
  if (!alpha_value || at::impl::torch_function_mode_enabled()) return false;
  auto lists = borrow_lists({slow, fast});
  if (!lists) return false;
  py::gil_scoped_release no_gil;
  lookahead_update_op().call((*lists)[0].list(), (*lists)[1].list(), *alpha_value);
  return true;
}

bool try_lookahead_update_if(py::handle slow, py::handle fast, py::handle alpha, py::handle due,
                             py::handle restore) {
  const std::optional<double> alpha_value = plain_float(alpha);
  std::optional<at::Tensor> restore_tensor;
  if (!alpha_value || at::impl::torch_function_mode_enabled() ||
      !plain_flags(due, restore, restore_tensor)) {
    return false;
  }
  auto lists = borrow_lists({slow, fast});
  if (!lists) return false;
  const at::Tensor& due_tensor = THPVariable_Unpack(due.ptr());
  py::gil_scoped_release no_gil;
  lookahead_update_if_op().call((*lists)[0].list(), (*lists)[1].list(), *alpha_value, due_tensor,
                                restore_tensor);
  return true;
}

bool try_lookahead_momentum_update(py::handle slow, py::handle fast, py::handle momentum,
                                   py::handle lr, py::handle mu, py::handle nesterov) {
  const std::optional<double> lr_value = plain_float(lr);
  const std::optional<double> mu_value = plain_float(mu);
  const std::optional<bool> nesterov_value = plain_bool(nesterov);
  if (!lr_value || !mu_value || !nesterov_value || at::impl::torch_function_mode_enabled()) {
    return false;
  }
  auto lists = borrow_lists({slow, fast, momentum});
  if (!lists) return false;
  py::gil_scoped_release no_gil;
  lookahead_momentum_update_op().call((*lists)[0].list(), (*lists)[1].list(), (*lists)[2].list(),
                                      *lr_value, *mu_value, *nesterov_value);
  return true;
}

bool try_lookahead_momentum_update_if(py::handle slow, py::handle fast, py::handle momentum,
                                      py::handle lr, py::handle mu, py::handle nesterov,
                                      py::handle due, py::handle restore) {
  const std::optional<double> lr_value = plain_float(lr);
  const std::optional<double> mu_value = plain_float(mu);
  const std::optional<bool> nesterov_value = plain_bool(nesterov);
  std::optional<at::Tensor> restore_tensor;
  if (!lr_value || !mu_value || !nesterov_value || at::impl::torch_function_mode_enabled() ||
      !plain_flags(due, restore, restore_tensor)) {
    return false;
  }
  auto lists = borrow_lists({slow, fast, momentum});
  if (!lists) return false;
  const at::Tensor& due_tensor = THPVariable_Unpack(due.ptr());
  py::gil_scoped_release no_gil;
  lookahead_momentum_update_if_op().call((*lists)[0].list(), (*lists)[1].list(),
                                         (*lists)[2].list(), *lr_value, *mu_value,
                                         *nesterov_value, due_tensor, restore_tensor);
  return true;
}

bool try_found_nonfinite(py::handle tensors, py::handle found, py::handle due) {
  std::optional<at::Tensor> due_tensor;
  if (at::impl::torch_function_mode_enabled() || !plain_flags(found, due, due_tensor)) {
    return false;
  }
  auto lists = borrow_lists({tensors});
  if (!lists) return false;
  const at::Tensor& found_tensor = THPVariable_Unpack(found.ptr());
  py::gil_scoped_release no_gil;
  found_nonfinite_op().call((*lists)[0].list(), found_tensor, due_tensor);
  return true;
}

}  // namespace

void def_python_calls(py::module_& m) {
  m.def("try_lookahead_update_", &try_lookahead_update, py::arg("slow"), py::arg("fast"),
        py::arg("alpha"),
        "lookahead_update_ through the dispatcher without boxing; False (nothing done) unless "
        "all tensors are plain and no __torch_function__ mode is active.");
  m.def("try_lookahead_update_if_", &try_lookahead_update_if, py::arg("slow"), py::arg("fast"),
        py::arg("alpha"), py::arg("due"), py::arg("restore"),
        "lookahead_update_if_ through the dispatcher without boxing; False as above.");
  m.def("try_lookahead_momentum_update_", &try_lookahead_momentum_update, py::arg("slow"),
        py::arg("fast"), py::arg("momentum"), py::arg("lr"), py::arg("mu"), py::arg("nesterov"),
        "lookahead_momentum_update_ through the dispatcher without boxing; False as above.");
  m.def("try_lookahead_momentum_update_if_", &try_lookahead_momentum_update_if, py::arg("slow"),
        py::arg("fast"), py::arg("momentum"), py::arg("lr"), py::arg("mu"), py::arg("nesterov"),
        py::arg("due"), py::arg("restore"),
        "lookahead_momentum_update_if_ through the dispatcher without boxing; False as above.");
  m.def("try_found_nonfinite_", &try_found_nonfinite, py::arg("tensors"), py::arg("found"),
        py::arg("due"), "found_nonfinite_ through the dispatcher without boxing; False as above.");
}

}  // namespace lookahead
