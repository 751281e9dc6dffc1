#include "tensor_fingerprint.h"

#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <utility>

namespace lookahead {
namespace {

const at::Tensor& tensor_of(const pybind11::handle& object) {
  TORCH_CHECK_TYPE(THPVariable_Check(object.ptr()), "TensorFingerprint: ",
                   pybind11::str(pybind11::type::of(object)).cast<std::string>(),
                   " is not a tensor");
  return THPVariable_Unpack(object.ptr());
}

const void* data_of(const at::Tensor& t) { return t.has_storage() ? t.const_data_ptr() : nullptr; }

}  // namespace

TensorFingerprint::TensorFingerprint(const pybind11::sequence& tensors) {
  objects_.reserve(tensors.size());
  seen_.reserve(tensors.size());
  for (const pybind11::handle object : tensors) {
    const at::Tensor& t = tensor_of(object);
    Seen s{t.unsafeGetTensorImpl(), data_of(t), t.scalar_type(), t.device(), {}};
    s.sizes_and_strides.append(t.sizes().begin(), t.sizes().end());
    s.sizes_and_strides.append(t.strides().begin(), t.strides().end());
    Py_INCREF(object.ptr());
    objects_.push_back(object.ptr());
    seen_.push_back(std::move(s));
  }
}

TensorFingerprint::~TensorFingerprint() {
  for (PyObject* object : objects_) Py_DECREF(object);
}

bool TensorFingerprint::matches() const {
  for (size_t i = 0; i < objects_.size(); ++i) {
    const at::Tensor& t = THPVariable_Unpack(objects_[i]);
    const Seen& then = seen_[i];
    const auto sizes = t.sizes();
    const auto strides = t.strides();
    const auto& recorded = then.sizes_and_strides;
    if (t.unsafeGetTensorImpl() != then.impl || data_of(t) != then.data ||
        t.scalar_type() != then.dtype || t.device() != then.device ||
        recorded.size() != sizes.size() + strides.size() ||
        !std::equal(sizes.begin(), sizes.end(), recorded.begin()) ||
        !std::equal(strides.begin(), strides.end(), recorded.begin() + sizes.size())) {
      return false;
    }
  }
  return true;
}

}  // namespace lookahead
