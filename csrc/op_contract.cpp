#include "op_contract.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <optional>
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
    case c10::ScalarType::Long: return "torch.int64";
    case c10::ScalarType::Int: return "torch.int32";
    case c10::ScalarType::Short: return "torch.int16";
    case c10::ScalarType::Char: return "torch.int8";
    case c10::ScalarType::Byte: return "torch.uint8";
    case c10::ScalarType::Bool: return "torch.bool";
    case c10::ScalarType::ComplexFloat: return "torch.complex64";
    case c10::ScalarType::ComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(t);
  }
}

std::string name(const char* list, size_t index) {
  return std::string(list) + "[" + std::to_string(index) + "]";
}

// Checks what every tensor argument must be; `first` names the tensor whose device the others match.
void check_one(const char* op, const at::Tensor& t, const char* list, size_t index,
               const at::Device& device, const char* first) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", list, "[", index, "] is an undefined tensor");
  TORCH_CHECK_TYPE(t.layout() == at::kStrided, op, ": ", list, "[", index, "] has layout ",
                   t.layout(), "; only dense (strided) tensors are supported");
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", list, "[", index,
                   "] has dtype ", dtype_name(t.scalar_type()),
                   "; Lookahead works on floating-point tensors only");
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", list, "[", index, "] is on ", t.device(),
                    " but ", first, " is on ", device,
                    "; all tensors of a call must be on one device");
}

// Checks what a tensor the op writes must also be.
void check_writable(const char* op, const at::Tensor& t, const char* list, size_t index) {
  TORCH_CHECK_VALUE(!t.is_inference() || c10::InferenceMode::is_enabled(), op, ": ", list,
                    "[", index, "] is an inference tensor, which can be updated in place only "
                    "inside torch.inference_mode()");
  // Dense tensors cannot overlap themselves; only the others need the general test.
  TORCH_CHECK_VALUE(t.is_non_overlapping_and_dense() ||
                        at::has_internal_overlap(t) != at::MemOverlap::Yes,
                    op, ": ", list, "[", index, "] has elements that share memory (an "
                    "expanded view?); each element must be its own memory location");
}

// A flag argument: one bool element on the device of the tensors it governs.
void check_flag(const char* op, const at::Tensor& flag, const char* arg,
                const std::optional<at::Device>& device) {
  TORCH_CHECK_VALUE(flag.defined(), op, ": ", arg, " is an undefined tensor");
  TORCH_CHECK_TYPE(flag.scalar_type() == at::kBool && flag.layout() == at::kStrided, op, ": ",
                   arg, " must be a dense torch.bool tensor, got ", dtype_name(flag.scalar_type()),
                   " (", flag.layout(), ")");
  TORCH_CHECK_VALUE(flag.numel() == 1, op, ": ", arg, " must hold one element, got shape ",
                    flag.sizes());
  TORCH_CHECK_VALUE(!device || flag.device() == *device, op, ": ", arg, " is on ", flag.device(),
                    " but the tensors are on ", *device, "; the kernel reads it on their device");
}

// With thousands of parameters, their metadata is cold when a sync comes (the steps since the last
// one streamed the whole model through the caches), and the checks of one tensor wait on its misses
// before the next tensor's checks begin. Requesting the metadata a few tensors ahead overlaps those
// waits: planning 3000 cold pairs took 0.60-0.66 ms without and 0.28-0.32 ms with (CPU machine).
// Two steps, because the address of a tensor's storage is itself in the tensor's metadata.
constexpr size_t kPrefetchAhead = 8;

// Every cache line of an object, however it is aligned.
template <typename T>
void prefetch_object(const T* object) {
  const char* bytes = reinterpret_cast<const char*>(object);
  for (size_t offset = 0; offset < sizeof(T); offset += 64) __builtin_prefetch(bytes + offset);
  __builtin_prefetch(bytes + sizeof(T) - 1);
}

// Called at index i of the validating loop over the lists (of equal length).
void prefetch_ahead(std::initializer_list<at::TensorList> lists, size_t i) {
  for (const at::TensorList list : lists) {
    if (i + kPrefetchAhead < list.size()) {
      prefetch_object(list[i + kPrefetchAhead].unsafeGetTensorImpl());
    }
    if (i + kPrefetchAhead / 2 < list.size() && list[i + kPrefetchAhead / 2].has_storage()) {
      prefetch_object(list[i + kPrefetchAhead / 2].storage().unsafeGetStorageImpl());
    }
  }
}

bool same_element_order(const at::Tensor& slow, const at::Tensor& fast) {
  if (slow.is_contiguous() && fast.is_contiguous()) return true;  // the common case, two flags
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

bool starts_before(const Extent& a, const Extent& b) { return a.begin < b.begin; }

// Puts one list's ranges in address order. Parameters usually come in allocation order, ascending
// (heap) or descending (separately mapped large blocks): one linear pass then, not a sort.
void order_by_address(std::vector<Extent>& extents) {
  if (std::is_sorted(extents.begin(), extents.end(), starts_before)) return;
  if (std::is_sorted(extents.rbegin(), extents.rend(), starts_before)) {
    std::reverse(extents.begin(), extents.end());
    return;
  }
  std::sort(extents.begin(), extents.end(), starts_before);
}

// In address order, any two overlapping ranges are neighbours, so a call with thousands of
// parameters (possibly views into one flat buffer) stays cheap to validate.
void check_no_shared_memory(const char* op, std::vector<Extent>& slow, std::vector<Extent>& fast) {
  order_by_address(slow);
  order_by_address(fast);
  std::vector<Extent> all(slow.size() + fast.size());
  std::merge(slow.begin(), slow.end(), fast.begin(), fast.end(), all.begin(), starts_before);
  for (size_t i = 1; i < all.size(); ++i) {
    const Extent& prev = all[i - 1];
    const Extent& next = all[i];
    TORCH_CHECK_VALUE(next.begin >= prev.end, op, ": ", name(prev.list, prev.index),
                      " and ", name(next.list, next.index),
                      " share memory; every slow and fast tensor must be distinct storage (is the "
                      "same tensor passed twice?)");
  }
}

}  // namespace

CallPlan plan_lookahead_call(const char* op, at::TensorList slow, at::TensorList fast,
                             double alpha) {
  TORCH_CHECK_VALUE(slow.size() == fast.size(), op, ": slow has ", slow.size(),
                    " tensors but fast has ", fast.size(),
                    "; the lists pair up element by element");
  TORCH_CHECK_VALUE(std::isfinite(alpha) && alpha > 0.0 && alpha <= 1.0,
                    op, ": alpha must be in (0, 1], got ", alpha);
  CallPlan plan;
  if (slow.empty()) return plan;

  const auto device = slow[0].device();
  const auto slow_dtype = slow[0].scalar_type();
  const auto fast_dtype = fast[0].scalar_type();
  std::vector<Extent> slow_extents;
  std::vector<Extent> fast_extents;
  slow_extents.reserve(slow.size());
  fast_extents.reserve(fast.size());
  plan.flat.reserve(slow.size());
  for (size_t i = 0; i < slow.size(); ++i) {
    prefetch_ahead({slow, fast}, i);
    const at::Tensor& s = slow[i];
    const at::Tensor& f = fast[i];
    check_one(op, s, "slow", i, device, "slow[0]");
    check_one(op, f, "fast", i, device, "slow[0]");
    check_writable(op, s, "slow", i);
    check_writable(op, f, "fast", i);
    TORCH_CHECK_VALUE(s.sizes() == f.sizes(), op, ": slow[", i, "] has shape ",
                      s.sizes(), " but fast[", i, "] has shape ", f.sizes());
    TORCH_CHECK_TYPE(is_supported_pair(s.scalar_type(), f.scalar_type()),
                     op, ": unsupported dtype pair at index ", i, ": slow ",
                     dtype_name(s.scalar_type()), ", fast ", dtype_name(f.scalar_type()),
                     "; supported (slow, fast) pairs are ", kSupportedPairsText);
    TORCH_CHECK_TYPE(s.scalar_type() == slow_dtype && f.scalar_type() == fast_dtype,
                     op, ": index ", i, " has dtypes (slow ",
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
    slow_extents.push_back(extent_of(s, s_data, flat, "slow", i));
    fast_extents.push_back(extent_of(f, f_data, flat, "fast", i));
  }
  check_no_shared_memory(op, slow_extents, fast_extents);
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

void check_flags(at::TensorList slow, const at::Tensor& due,
                 const std::optional<at::Tensor>& restore) {
  std::optional<at::Device> device;
  if (!slow.empty()) device = slow[0].device();
  check_flag("lookahead_update_if_", due, "due", device);
  if (restore) check_flag("lookahead_update_if_", *restore, "restore", device);
}

void update_strided_if(at::TensorList slow, at::TensorList fast, double alpha, const at::Tensor& due,
                       const std::optional<at::Tensor>& restore,
                       const std::vector<size_t>& indices) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor due_flag = due.reshape({});
  const at::Tensor lerp_flag = restore ? due_flag.logical_and(restore->reshape({}).logical_not())
                                       : due_flag;
  for (const size_t i : indices) {
    const at::Tensor lerped = slow[i].lerp(fast[i].to(slow[i].scalar_type()), alpha);
    slow[i].copy_(at::where(lerp_flag, lerped, slow[i]));
    fast[i].copy_(at::where(due_flag, slow[i].to(fast[i].scalar_type()), fast[i]));
  }
}

CheckPlan plan_nonfinite_check(at::TensorList tensors, const at::Tensor& found,
                               const std::optional<at::Tensor>& due) {
  constexpr const char* kOp = "found_nonfinite_";
  CheckPlan plan;
  std::optional<at::Device> device;
  if (!tensors.empty()) device = tensors[0].device();
  check_flag(kOp, found, "found", device);
  if (due) check_flag(kOp, *due, "due", device);
  TORCH_CHECK_VALUE(!found.is_inference() || c10::InferenceMode::is_enabled(), kOp,
                    ": found is an inference tensor, which can be updated in place only inside "
                    "torch.inference_mode()");
  if (tensors.empty()) return plan;
  const auto dtype = tensors[0].scalar_type();
  plan.flat.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    prefetch_ahead({tensors}, i);
    const at::Tensor& t = tensors[i];
    check_one(kOp, t, "tensors", i, *device, "tensors[0]");
    TORCH_CHECK_TYPE(t.scalar_type() == dtype, kOp, ": tensors[", i, "] has dtype ",
                     dtype_name(t.scalar_type()), " but tensors[0] has ", dtype_name(dtype),
                     "; one call takes one dtype");
    if (t.numel() == 0) continue;
    if (t.is_non_overlapping_and_dense()) {
      plan.flat.push_back({t.data_ptr(), t.numel()});
    } else {
      plan.strided.push_back(i);
    }
  }
  return plan;
}

void found_nonfinite_strided(at::TensorList tensors, const at::Tensor& found,
                             const std::optional<at::Tensor>& due,
                             const std::vector<size_t>& indices) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  for (const size_t i : indices) {
    at::Tensor bad = at::isfinite(tensors[i]).logical_not().any();
    if (due) bad = bad.logical_and(due->reshape({}));
    found.logical_or_(bad);
  }
}

void bump_versions(at::TensorList slow, at::TensorList fast) {
  // TensorImpl's own (inline) bump: what torch::autograd's does, less a call per tensor.
  for (const auto& t : slow) t.unsafeGetTensorImpl()->bump_version();
  for (const auto& t : fast) t.unsafeGetTensorImpl()->bump_version();
}

}  // namespace lookahead
