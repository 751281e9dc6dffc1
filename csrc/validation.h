// Validation of the ops' arguments, shared by every backend: one pass over the tensors' metadata
// that rejects a bad call before anything is written, and sorts the tensors by layout for the
// kernels. Every rejection is a ValueError/TypeError that names the offending argument.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace lookahead {

// How messages name a tensor of a list: "slow[3]" by default. The optimizer passes its parameters'
// names ("parameter 3 of param group 0") for the fast list; the slow list is then named after them.
class ArgumentNames {
 public:
  ArgumentNames() = default;
  explicit ArgumentNames(std::vector<std::string> fast_names) : fast_names_(std::move(fast_names)) {}

  std::string operator()(const char* list, size_t index) const;

 private:
  std::vector<std::string> fast_names_;
};

// A non-empty tensor pair that a kernel can treat as two flat arrays of numel elements starting at
// the given addresses, in the same element order: both dense, with the same strides (contiguous,
// channels_last and any permutation alike).
struct FlatPair {
  void* slow;
  void* fast;
  int64_t numel;
};

// The non-empty pairs of a call, sorted by what can run them.
struct PairsByLayout {
  std::vector<FlatPair> flat;   // for the kernel
  std::vector<size_t> strided;  // indices of the other pairs, for ATen one by one
};

// Validates lookahead_update_(slow, fast, alpha) and its gated form: equal-length lists of dense
// floating tensors on one device, pairwise equal shapes, one supported (slow, fast) dtype pair for
// the whole call, writable tensors, no memory shared between any two elements (within a tensor or
// across tensors), and alpha in (0, 1]. Each tensor's metadata is touched once (with thousands of
// parameters, that metadata is a good share of the call's time).
PairsByLayout validate_update(const char* op, at::TensorList slow, at::TensorList fast, double alpha,
                              const ArgumentNames& names = {});

// lookahead_update_if_'s flags: `due` (run the sync at all) and the optional `restore` (fast <- slow,
// slow untouched) must be one-element bool tensors on the lists' device, read by the kernel itself
// so that a CUDA caller never waits for the host.
void validate_update_flags(at::TensorList slow, const at::Tensor& due,
                           const std::optional<at::Tensor>& restore);

// found_nonfinite_'s view of a dense tensor.
struct FlatTensor {
  const void* data;
  int64_t numel;
};

struct TensorsByLayout {
  std::vector<FlatTensor> flat;
  std::vector<size_t> strided;
};

// Validates found_nonfinite_(tensors, found, due): dense tensors of one supported floating dtype on
// one device, and `found` (writable) and `due` one-element bool tensors on that device.
TensorsByLayout validate_nonfinite_check(at::TensorList tensors, const at::Tensor& found,
                                         const std::optional<at::Tensor>& due);

}  // namespace lookahead
