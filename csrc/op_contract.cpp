#include "op_contract.h"

#include <ATen/MemoryOverlap.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "dtype_pairs.h"

namespace lookahead {
namespace {

// torch's Python spelling of a dtype, so messages match what the user wrote.
std::string dtype_name(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return "torch.float32";
    case c10::ScalarType::Double: return "torch.float64";
    case c10::ScalarType::Half: return "torch.float16";
    case c10::ScalarType::BFloat16: return "torch.bfloat16";
    default: return std::string("torch.") + c10::toString(t);
  }
}

std::string name(const char* list, size_t index) {
  return std::string(list) + "[" + std::to_string(index) + "]";
}

void check_one(const at::Tensor& t, const char* list, size_t index, const at::Device& device) {
  TORCH_CHECK_VALUE(t.defined(), "lookahead_update_: ", list, "[", index, "] is an undefined tensor");
  TORCH_CHECK_TYPE(t.layout() == at::kStrided, "lookahead_update_: ", list, "[", index, "] has layout ",
                   t.layout(), "; only dense (strided) tensors are supported");
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "lookahead_update_: ", list, "[", index, "] has dtype ",
                   dtype_name(t.scalar_type()), "; Lookahead updates floating-point tensors only");
  TORCH_CHECK_VALUE(t.device() == device, "lookahead_update_: ", list, "[", index, "] is on ", t.device(),
                    " but slow[0] is on ", device, "; all tensors of a call must be on one device");
  TORCH_CHECK_VALUE(!t.is_inference() || c10::InferenceMode::is_enabled(), "lookahead_update_: ",
                    list, "[", index, "] is an inference tensor, which can be updated in place only inside "
                    "torch.inference_mode()");
  TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, "lookahead_update_: ", list, "[",
                    index, "] has elements that share memory (an expanded view?); each element must be "
                    "its own memory location");
}

// The address range a tensor may touch: [first element, one past the last element].
struct Extent {
  uintptr_t begin;
  uintptr_t end;
  const char* list;
  size_t index;
};

Extent extent_of(const at::Tensor& t, const char* list, size_t index) {
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) {
    last += (t.size(d) - 1) * t.stride(d);
  }
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  return {begin, begin + static_cast<uintptr_t>((last + 1) * t.element_size()), list, index};
}

// Sorting the ranges by start finds any two overlapping tensors in O(n log n), so a call with
// thousands of parameters (possibly views into one flat buffer) stays cheap to validate.
void check_no_shared_memory(at::TensorList slow, at::TensorList fast) {
  std::vector<Extent> extents;
  extents.reserve(slow.size() + fast.size());
  for (size_t i = 0; i < slow.size(); ++i) {
    if (slow[i].numel() > 0) extents.push_back(extent_of(slow[i], "slow", i));
    if (fast[i].numel() > 0) extents.push_back(extent_of(fast[i], "fast", i));
  }
  std::sort(extents.begin(), extents.end(),
            [](const Extent& a, const Extent& b) { return a.begin < b.begin; });
  for (size_t i = 1; i < extents.size(); ++i) {
    const Extent& prev = extents[i - 1];
    const Extent& next = extents[i];
    TORCH_CHECK_VALUE(next.begin >= prev.end, "lookahead_update_: ", name(prev.list, prev.index),
                      " and ", name(next.list, next.index),
                      " share memory; every slow and fast tensor must be distinct storage (is the "
                      "same tensor passed twice?)");
  }
}

}  // namespace

void check_lookahead_inputs(at::TensorList slow, at::TensorList fast, double alpha) {
  TORCH_CHECK_VALUE(slow.size() == fast.size(), "lookahead_update_: slow has ", slow.size(),
                    " tensors but fast has ", fast.size(), "; the lists pair up element by element");
  TORCH_CHECK_VALUE(std::isfinite(alpha) && alpha > 0.0 && alpha <= 1.0,
                    "lookahead_update_: alpha must be in (0, 1], got ", alpha);
  if (slow.empty()) return;

  const auto device = slow[0].device();
  const auto slow_dtype = slow[0].scalar_type();
  const auto fast_dtype = fast[0].scalar_type();
  for (size_t i = 0; i < slow.size(); ++i) {
    check_one(slow[i], "slow", i, device);
    check_one(fast[i], "fast", i, device);
    TORCH_CHECK_VALUE(slow[i].sizes() == fast[i].sizes(), "lookahead_update_: slow[", i,
                      "] has shape ", slow[i].sizes(), " but fast[", i, "] has shape ",
                      fast[i].sizes());
    TORCH_CHECK_TYPE(is_supported_pair(slow[i].scalar_type(), fast[i].scalar_type()),
                     "lookahead_update_: unsupported dtype pair at index ", i, ": slow ",
                     dtype_name(slow[i].scalar_type()), ", fast ", dtype_name(fast[i].scalar_type()),
                     "; supported (slow, fast) pairs are ", kSupportedPairsText);
    TORCH_CHECK_TYPE(slow[i].scalar_type() == slow_dtype && fast[i].scalar_type() == fast_dtype,
                     "lookahead_update_: index ", i, " has dtypes (slow ",
                     dtype_name(slow[i].scalar_type()), ", fast ", dtype_name(fast[i].scalar_type()),
                     ") but index 0 has (slow ", dtype_name(slow_dtype), ", fast ",
                     dtype_name(fast_dtype), "); one call takes one dtype pair, so group tensors "
                     "by dtype first");
  }
  check_no_shared_memory(slow, fast);
}

void bump_versions(at::TensorList slow, at::TensorList fast) {
  for (const auto& t : slow) torch::autograd::impl::bump_version(t);
  for (const auto& t : fast) torch::autograd::impl::bump_version(t);
}

}  // namespace lookahead
