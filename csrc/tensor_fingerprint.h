// What a validated set of tensors looked like, to tell cheaply whether it still does. The optimizer
// validates a group's tensors fully when it plans their syncs (once per change of tensors), then
// only compares this before each sync: a tensor keeps its identity when `param.data = ...`, a
// model's .to() or a resize replaces its storage, shape or dtype, and any of those makes the plan
// (and its validation) stale.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/SmallVector.h>
#include <pybind11/pybind11.h>

#include <vector>

namespace lookahead {

// Hidden, as pybind11 is: a class it binds must not be more visible than pybind11's own types.
class __attribute__((visibility("hidden"))) TensorFingerprint {
 public:
  // tensors: a Python sequence of tensors. Their Python objects are held, not the tensors they
  // wrap, so that a tensor swapped into an object (torch.utils.swap_tensors) shows as a change.
  explicit TensorFingerprint(const pybind11::sequence& tensors);
  TensorFingerprint(const TensorFingerprint&) = delete;
  TensorFingerprint& operator=(const TensorFingerprint&) = delete;
  ~TensorFingerprint();

  // Whether every object still wraps the tensor it did, with the data address, dtype, device,
  // sizes and strides it had.
  bool matches() const;

 private:
  struct Seen {
    const c10::TensorImpl* impl;
    const void* data;
    c10::ScalarType dtype;
    c10::Device device;
    c10::SmallVector<int64_t, 8> sizes_and_strides;
  };

  // Owned references (raw: pybind11's types would give the class hidden visibility); destroyed by
  // Python's garbage collection, with the GIL held.
  std::vector<PyObject*> objects_;
  std::vector<Seen> seen_;
};

}  // namespace lookahead
