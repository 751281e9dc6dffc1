#include "op_contract.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <cmath>
#include <string>

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
  TORCH_CHECK_VALUE(t.defined(), "lookahead_update_: ", list, "[", index,
                    "] is an undefined tensor");
  TORCH_CHECK_TYPE(t.layout() == at::kStrided, "lookahead_update_: ", list, "[", index,
                   "] has layout ", t.layout(), "; only dense (strided) tensors are supported");
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "lookahead_update_: ", list, "[", index,
                   "] has dtype ", dtype_name(t.scalar_type()),
                   "; Lookahead updates floating-point tensors only");
  TORCH_CHECK_VALUE(t.device() == device, "lookahead_update_: ", list, "[", index, "] is on ",
                    t.device(), " but slow[0] is on ", device,
                    "; all tensors of a call must be on one device");
  TORCH_CHECK_VALUE(!t.is_inference() || c10::InferenceMode::is_enabled(), "lookahead_update_: ",
                    list, "[", index, "] is an inference tensor, which can be updated in place "
                    "only inside torch.inference_mode()");
  // Dense tensors cannot overlap themselves; only the others need the general test.
  TORCH_CHECK_VALUE(t.is_non_overlapping_and_dense() ||
                        at::has_internal_overlap(t) != at::MemOverlap::Yes,
                    "lookahead_update_: ", list, "[", index, "] has elements that share memory (an "
                    "expanded view?); each element must be its own memory location");
}

bool same_element_order(const at::Tensor& slow, const at::Tensor& fast) {
  if (!slow.is_non_overlapping_and_dense() || !fast.is_non_overlapping_and_dense()) return false;
  for (int64_t d = 0; d < slow.dim(); ++d) {
    // A dimension of size 1 is never stepped over, so its stride does not matter.
    if (slow.size(d) != 1 && slow.stride(d) != fast.stride(d)) return false;
  }
  return true;
}

// The address range a tensor may touch: [first element, one past the last element].
struct Extent {
  uintptr_t begin;
  uintptr_t end;
  const char* list;
  size_t index;
};

Extent extent_of(const at::Tensor& t, const void* data, bool known_dense, const char* list,
                 size_t index) {
  int64_t elements = t.numel();
  if (!known_dense) {
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    elements = last + 1;
  }
  const auto begin = reinterpret_cast<uintptr_t>(data);
  return {begin, begin + static_cast<uintptr_t>(elements * t.element_size()), list, index};
}

// Sorting the ranges by start finds any two overlapping tensors in O(n log n), so a call with
// thousands of parameters (possibly views into one flat buffer) stays cheap to validate.
void check_no_shared_memory(std::vector<Extent>& extents) {
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

CallPlan plan_lookahead_call(at::TensorList slow, at::TensorList fast, double alpha) {
  TORCH_CHECK_VALUE(slow.size() == fast.size(), "lookahead_update_: slow has ", slow.size(),
                    " tensors but fast has ", fast.size(),
                    "; the lists pair up element by element");
  TORCH_CHECK_VALUE(std::isfinite(alpha) && alpha > 0.0 && alpha <= 1.0,
                    "lookahead_update_: alpha must be in (0, 1], got ", alpha);
  CallPlan plan;
  if (slow.empty()) return plan;

  const auto device = slow[0].device();
  const auto slow_dtype = slow[0].scalar_type();
  const auto fast_dtype = fast[0].scalar_type();
  std::vector<Extent> extents;
  extents.reserve(2 * slow.size());
  plan.flat.reserve(slow.size());
  for (size_t i = 0; i < slow.size(); ++i) {
    const at::Tensor& s = slow[i];
    const at::Tensor& f = fast[i];
    check_one(s, "slow", i, device);
    check_one(f, "fast", i, device);
    TORCH_CHECK_VALUE(s.sizes() == f.sizes(), "lookahead_update_: slow[", i, "] has shape ",
                      s.sizes(), " but fast[", i, "] has shape ", f.sizes());
    TORCH_CHECK_TYPE(is_supported_pair(s.scalar_type(), f.scalar_type()),
                     "lookahead_update_: unsupported dtype pair at index ", i, ": slow ",
                     dtype_name(s.scalar_type()), ", fast ", dtype_name(f.scalar_type()),
                     "; supported (slow, fast) pairs are ", kSupportedPairsText);
    TORCH_CHECK_TYPE(s.scalar_type() == slow_dtype && f.scalar_type() == fast_dtype,
                     "lookahead_update_: index ", i, " has dtypes (slow ",
                     dtype_name(s.scalar_type()), ", fast ", dtype_name(f.scalar_type()),
                     ") but index 0 has (slow ", dtype_name(slow_dtype), ", fast ",
                     dtype_name(fast_dtype), "); one call takes one dtype pair, so group tensors "
                     "by dtype first");
    const int64_t numel = s.numel();
    if (numel == 0) continue;
    // With non-negative strides, a dense tensor's first element is its lowest address.
    void* s_data = s.data_ptr();
    void* f_data = f.data_ptr();
    const bool flat = same_element_order(s, f);
    if (flat) {
      plan.flat.push_back({s_data, f_data, numel});
    } else {
      plan.strided.push_back(i);
    }
    extents.push_back(extent_of(s, s_data, flat, "slow", i));
    extents.push_back(extent_of(f, f_data, flat, "fast", i));
  }
  check_no_shared_memory(extents);
  return plan;
}

void update_strided(at::TensorList slow, at::TensorList fast, double alpha,
                    const std::vector<size_t>& indices) {
  // Below autograd: these are parameters being overwritten, not a differentiable computation.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  for (const size_t i : indices) {
    slow[i].lerp_(fast[i].to(slow[i].scalar_type()), alpha);
    fast[i].copy_(slow[i]);
  }
}

void bump_versions(at::TensorList slow, at::TensorList fast) {
  for (const auto& t : slow) torch::autograd::impl::bump_version(t);
  for (const auto& t : fast) torch::autograd::impl::bump_version(t);
}

}  // namespace lookahead
