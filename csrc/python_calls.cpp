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

#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "op_declarations.h"
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

// How an entry point takes one argument from Python: exactly as the schema's type names it, or not
// at all (from() returns false). One per C++ parameter type of op_declarations.h.
template <typename T>
struct Take;

template <>
struct Take<at::TensorList> {
  std::optional<BorrowedTensors> borrowed;
  bool from(py::handle object) {
    std::optional<BorrowedTensors> tensors = BorrowedTensors::of(object);
    if (!tensors) return false;
    borrowed.emplace(std::move(*tensors));
    return true;
  }
  at::TensorList get() const { return borrowed->list(); }
};

// A float as the schema's float takes it: a Python float or int, not a bool.
template <>
struct Take<double> {
  double value = 0.0;
  bool from(py::handle object) {
    if (PyBool_Check(object.ptr())) return false;
    if (!PyFloat_Check(object.ptr()) && !PyLong_Check(object.ptr())) return false;
    value = PyFloat_AsDouble(object.ptr());
    if (value == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
    return true;
  }
  double get() const { return value; }
};

template <>
struct Take<bool> {
  bool value = false;
  bool from(py::handle object) {
    if (!PyBool_Check(object.ptr())) return false;
    value = object.ptr() == Py_True;
    return true;
  }
  bool get() const { return value; }
};

// A single tensor is borrowed from its Python object, which the caller's arguments keep alive.
template <>
struct Take<const at::Tensor&> {
  PyObject* object = nullptr;
  bool from(py::handle handle) {
    if (!plain_tensor(handle)) return false;
    object = handle.ptr();
    return true;
  }
  const at::Tensor& get() const { return THPVariable_Unpack(object); }
};

template <>
struct Take<const std::optional<at::Tensor>&> {
  std::optional<at::Tensor> value;
  bool from(py::handle object) {
    if (object.is_none()) return true;
    if (!plain_tensor(object)) return false;
    value = THPVariable_Unpack(object.ptr());
    return true;
  }
  const std::optional<at::Tensor>& get() const { return value; }
};

template <typename>
using PythonObject = py::handle;

// The entry point of one op: every argument taken, or False and nothing done.
template <typename Signature, const c10::TypedOperatorHandle<Signature>& (*kHandle)()>
struct EagerCall;

template <typename... Args, const c10::TypedOperatorHandle<void(Args...)>& (*kHandle)()>
struct EagerCall<void(Args...), kHandle> {
  static bool call(PythonObject<Args>... objects) {
    if (at::impl::torch_function_mode_enabled()) return false;
    return call_taken(std::index_sequence_for<Args...>{}, objects...);
  }

  template <size_t... I>
  static bool call_taken(std::index_sequence<I...>, PythonObject<Args>... objects) {
    std::tuple<Take<Args>...> taken;
    if (!(std::get<I>(taken).from(objects) && ...)) return false;
    py::gil_scoped_release no_gil;
    kHandle().call(std::get<I>(taken).get()...);
    return true;
  }
};

}  // namespace

void def_python_calls(py::module_& m) {
#define LOOKAHEAD_DEF_EAGER_CALL(name, schema, ...)                                             \
  m.def("try_" #name, &EagerCall<__VA_ARGS__, &name##op>::call,                                 \
        #name " through the dispatcher without boxing; False (nothing done) unless every "      \
        "argument has exactly the type its schema names and no __torch_function__ mode is "     \
        "active.");
  LOOKAHEAD_FOR_EACH_OP(LOOKAHEAD_DEF_EAGER_CALL)
#undef LOOKAHEAD_DEF_EAGER_CALL
}

}  // namespace lookahead
