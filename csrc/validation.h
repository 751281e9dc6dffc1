// Validation of the ops' arguments, shared by every backend: one pass over the tensors' metadata
// that rejects a bad call before anything is written, and sorts the tensors by layout for the
// kernels. Every rejection is a ValueError/TypeError that names the offending argument.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
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

// The tensors of every list at one index (slow, fast and, for the momentum op, the buffer) when a
// kernel can treat them as flat arrays of numel elements starting at the given addresses, in the
// same element order: all dense, with the same strides (contiguous, channels_last and any
// permutation alike); `index` is their place in the lists. found_nonfinite_ uses the first address
// only; the quantization ops add the tensor's part of the payload and of the scales.
constexpr size_t kMaxLists = 4;
struct FlatItem {
  std::array<void*, kMaxLists> data;
  int64_t numel;
  size_t index;
};

// The non-empty indices of a call, sorted by what can run them.
struct Layout {
  std::vector<FlatItem> flat;   // for the kernel
  std::vector<size_t> strided;  // the other indices, for ATen one by one
};

// Validates lookahead_update_(slow, fast, alpha) and its gated form: equal-length lists of dense
// floating tensors on one device, pairwise equal shapes, one supported (slow, fast) dtype pair for
// the whole call, writable tensors, no memory shared between any two elements (within a tensor or
// across tensors), and alpha in (0, 1]. Each tensor's metadata is touched once (with thousands of
// parameters, that metadata is a good share of the call's time).
Layout validate_update(const char* op, at::TensorList slow, at::TensorList fast, double alpha,
                       const ArgumentNames& names = {});

// Validates lookahead_momentum_update_(slow, fast, momentum, lr, mu, nesterov) and its gated form:
// as validate_update, with a third list in the slow dtype, lr in (0, 1] and mu in [0, 1).
Layout validate_momentum_update(const char* op, at::TensorList slow, at::TensorList fast,
                                at::TensorList momentum, double lr, double mu,
                                const ArgumentNames& names = {});

// The gated ops' flags: `due` (run the sync at all) and the optional `restore` (fast <- slow, the
// rest untouched) must be one-element bool tensors on the lists' device, read by the kernel itself
// so that a CUDA caller never waits for the host.
void validate_update_flags(const char* op, at::TensorList slow, const at::Tensor& due,
                           const std::optional<at::Tensor>& restore);

// Validates quantize_pseudo_gradients_(slow, fast, payload, scales) (gathered = false: payload a
// contiguous int8 vector of sum(numel) elements, scales a float32 one of sum(blocks)) and
// dequantize_mean_(slow, out, payloads, scales) (gathered = true: one such row per worker): the
// pairs as for a sync, but flat ones only, and every tensor on one device. Each flat item's
// data[2] and data[3] point at its tensor's part of the (first row of the) payload and scales.
Layout validate_quantization(const char* op, at::TensorList slow, at::TensorList fast,
                             const at::Tensor& payload, const at::Tensor& scales, bool gathered);

// Validates found_nonfinite_(tensors, found, due): dense tensors of one supported floating dtype on
// one device, and `found` (writable) and `due` one-element bool tensors on that device.
Layout validate_nonfinite_check(at::TensorList tensors, const at::Tensor& found,
                                const std::optional<at::Tensor>& due);

}  // namespace lookahead
