#include "validation.h"

#include <c10/core/InferenceMode.h>
#include <c10/core/StorageImpl.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <utility>

#include "dtype_pairs.h"
#include "quantization.h"

namespace lookahead {

std::string ArgumentNames::operator()(const char* list, size_t index) const {
  if (index < fast_names_.size()) {
    const std::string& name = fast_names_[index];
    const std::string kind(list);
    if (kind == "slow") return "the slow copy of " + name;
    if (kind == "momentum") return "the outer momentum of " + name;
    return name;
  }
  return std::string(list) + "[" + std::to_string(index) + "]";
}

namespace {

// With thousands of parameters, their metadata is cold when a sync comes (the steps since the last
// one streamed the whole model through the caches), and the checks of one tensor wait on its misses
// before the next tensor's checks begin. Requesting the metadata a few tensors ahead overlaps those
// waits. Two steps, because the address of a tensor's storage is itself in the tensor's metadata.
constexpr size_t kPrefetchAhead = 8;

// Every cache line of an object, however it is aligned.
template <typename T>
void prefetch_object(const T* object) {
  const char* bytes = reinterpret_cast<const char*>(object);
  for (size_t offset = 0; offset < sizeof(T) + 63; offset += 64) __builtin_prefetch(bytes + offset);
}

void prefetch_ahead(c10::ArrayRef<at::TensorList> lists, size_t i) {
  for (const at::TensorList list : lists) {
    if (i + kPrefetchAhead < list.size()) {
      prefetch_object(list[i + kPrefetchAhead].unsafeGetTensorImpl());
    }
    if (i + kPrefetchAhead / 2 < list.size() && list[i + kPrefetchAhead / 2].has_storage()) {
      prefetch_object(list[i + kPrefetchAhead / 2].storage().unsafeGetStorageImpl());
    }
  }
}

// What every tensor argument must be; `first` names the tensor whose device the others match. Names
// are callables, evaluated only for a message: a call with thousands of tensors must not pay for
// building them.
template <typename Name>
void check_tensor_argument(const char* op, const at::Tensor& t, const Name& name,
                           const at::Device& device, const std::string& first) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name(), " is an undefined tensor");
  TORCH_CHECK_TYPE(t.layout() == at::kStrided, op, ": ", name(), " has layout ", t.layout(),
                   "; only dense (strided) tensors are supported");
  TORCH_CHECK_TYPE(is_supported_dtype(t.scalar_type()), op, ": ", name(), " has dtype ",
                   dtype_name(t.scalar_type()), "; Lookahead works on tensors of ",
                   supported_dtypes_text());
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", name(), " is on ", t.device(), " but ", first,
                    " is on ", device, "; all tensors of a call must be on one device");
}

template <typename Name>
void check_writable(const char* op, const at::Tensor& t, const Name& name) {
  TORCH_CHECK_VALUE(!t.is_inference() || c10::InferenceMode::is_enabled(), op, ": ", name(),
                    " is an inference tensor, which can be updated in place only inside "
                    "torch.inference_mode()");
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

bool same_element_order(const at::Tensor& slow, const at::Tensor& fast) {
  if (slow.is_contiguous() && fast.is_contiguous()) return true;  // the common case, two flags
  if (!slow.is_non_overlapping_and_dense() || !fast.is_non_overlapping_and_dense()) return false;
  for (int64_t d = 0; d < slow.dim(); ++d) {
    // A dimension of size 1 is never stepped over, so its stride does not matter.
    if (slow.size(d) != 1 && slow.stride(d) != fast.stride(d)) return false;
  }
  return true;
}

// Addresses of first elements: the real ones, or, for tensors without data (meta tensors, which
// torch.compile traces with), addresses in a virtual space where each storage has a range of its
// own, so that the same checks hold for them.
class AddressSpace {
 public:
  uintptr_t first_element(const at::Tensor& t) {
    if (!t.is_meta()) return reinterpret_cast<uintptr_t>(t.data_ptr());
    const c10::StorageImpl* storage = t.storage().unsafeGetStorageImpl();
    auto found = std::find_if(bases_.begin(), bases_.end(),
                              [&](const auto& entry) { return entry.first == storage; });
    if (found == bases_.end()) {
      bases_.emplace_back(storage, next_base_);
      next_base_ += storage->nbytes() + 64;
      found = bases_.end() - 1;
    }
    return found->second + static_cast<uintptr_t>(t.storage_offset() * t.element_size());
  }

 private:
  std::vector<std::pair<const c10::StorageImpl*, uintptr_t>> bases_;
  uintptr_t next_base_ = 4096;
};

// The bytes a tensor may touch: [first element, one past the last element], and whether every
// byte in between belongs to one of its elements.
struct Extent {
  uintptr_t begin;
  uintptr_t end;
  bool dense;
  const at::Tensor* tensor;
  const char* list;
  size_t index;
};

Extent extent_of(const at::Tensor& t, uintptr_t first, bool dense, const char* list, size_t index) {
  int64_t elements = t.numel();
  if (!dense) {
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    elements = last + 1;
  }
  return {first, first + static_cast<uintptr_t>(elements * t.element_size()), dense, &t, list,
          index};
}

// A tensor whose storage was freed or shrunk under it (FSDP frees parameters' storage between
// uses with untyped_storage().resize_(0)) keeps its sizes: the kernel would touch bytes it no longer
// owns.
template <typename Name>
void check_within_storage(const char* op, const at::Tensor& t, uintptr_t spanned_bytes,
                          const Name& name) {
  if (!t.has_storage()) return;
  const auto needed = static_cast<uintptr_t>(t.storage_offset() * t.element_size()) + spanned_bytes;
  const auto held = t.storage().nbytes();
  TORCH_CHECK_VALUE(needed <= held, op, ": ", name(), " spans ", needed,
                    " bytes of its storage, which holds ", held,
                    " (freed or resized under the tensor?)");
}

// Exact overlap tests for strided tensors enumerate element offsets up to this many elements;
// beyond it a call whose strides interleave is refused rather than guessed about.
constexpr int64_t kMaxEnumeratedElements = int64_t{1} << 22;

// The element offsets (in elements) of a strided tensor, in no particular order.
std::vector<int64_t> element_offsets(const at::Tensor& t) {
  std::vector<int64_t> offsets{0};
  offsets.reserve(t.numel());
  for (int64_t d = 0; d < t.dim(); ++d) {
    const size_t count = offsets.size();
    for (int64_t i = 1; i < t.size(d); ++i) {
      for (size_t j = 0; j < count; ++j) offsets.push_back(offsets[j] + i * t.stride(d));
    }
  }
  return offsets;
}

enum class Overlap { kNo, kYes, kUnknown };

// Whether two elements of t share memory. Dense tensors and tensors whose strides, in increasing
// order, each step past everything the smaller ones reach cannot; a zero stride always does;
// anything else is decided by enumerating the elements, when there are not too many.
Overlap self_overlap(const at::Tensor& t) {
  if (t.is_non_overlapping_and_dense()) return Overlap::kNo;
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of dimensions that are stepped
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  }
  std::sort(dims.begin(), dims.end());
  int64_t reach = 0;
  bool nested = true;
  for (const auto& [stride, size] : dims) {
    if (stride == 0) return Overlap::kYes;
    nested = nested && stride > reach;
    reach += (size - 1) * stride;
  }
  if (nested) return Overlap::kNo;
  if (t.numel() > kMaxEnumeratedElements) return Overlap::kUnknown;
  std::vector<int64_t> offsets = element_offsets(t);
  std::sort(offsets.begin(), offsets.end());
  return std::adjacent_find(offsets.begin(), offsets.end()) != offsets.end() ? Overlap::kYes
                                                                             : Overlap::kNo;
}

// Whether any element of a shares a byte with an element of b, given that their extents overlap and
// at least one of them is not dense (two interleaved views such as x[::2] and x[1::2] do not).
Overlap elements_overlap(const Extent& a, const Extent& b) {
  if (a.dense && b.dense) return Overlap::kYes;
  if (a.tensor->numel() + b.tensor->numel() > kMaxEnumeratedElements) return Overlap::kUnknown;
  auto starts = [](const Extent& e) {
    std::vector<int64_t> offsets = element_offsets(*e.tensor);
    std::vector<uintptr_t> bytes(offsets.size());
    const auto size = static_cast<uintptr_t>(e.tensor->element_size());
    std::transform(offsets.begin(), offsets.end(), bytes.begin(),
                   [&](int64_t o) { return e.begin + static_cast<uintptr_t>(o) * size; });
    std::sort(bytes.begin(), bytes.end());
    return bytes;
  };
  const std::vector<uintptr_t> xs = starts(a);
  const std::vector<uintptr_t> ys = starts(b);
  const auto x_size = static_cast<uintptr_t>(a.tensor->element_size());
  const auto y_size = static_cast<uintptr_t>(b.tensor->element_size());
  size_t i = 0;
  size_t j = 0;
  while (i < xs.size() && j < ys.size()) {
    if (xs[i] + x_size <= ys[j]) {
      ++i;
    } else if (ys[j] + y_size <= xs[i]) {
      ++j;
    } else {
      return Overlap::kYes;
    }
  }
  return Overlap::kNo;
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

// Vectors reused from call to call on each thread. With thousands of parameters fresh ones cost
// more than the checks: the allocator hands their pages back to the system after every call, and
// the next call faults them in again (half of a 10000-pair call's time). They keep the largest
// call's capacity: about 300 bytes a pair.
struct Scratch {
  std::vector<std::vector<Extent>> extents;  // one per list
  std::vector<Extent> all;
  std::vector<Extent> merged;
  std::vector<const Extent*> reaching;
};

Scratch& scratch(size_t lists) {
  thread_local Scratch reused;
  if (reused.extents.size() < lists) reused.extents.resize(lists);
  for (std::vector<Extent>& list : reused.extents) list.clear();
  return reused;
}

// Sweeps the ranges of every list in address order, keeping those that still reach past the
// current one: for the usual disjoint tensors that is none, so a call with thousands of parameters
// (possibly views into one flat buffer) stays linear.
void check_no_shared_memory(const char* op, Scratch& lists, const ArgumentNames& names) {
  std::vector<Extent>& all = lists.all;
  all.clear();
  for (std::vector<Extent>& list : lists.extents) {  // any beyond this call's lists are empty
    order_by_address(list);
    lists.merged.resize(all.size() + list.size());
    std::merge(all.begin(), all.end(), list.begin(), list.end(), lists.merged.begin(),
               starts_before);
    all.swap(lists.merged);
  }
  std::vector<const Extent*>& reaching = lists.reaching;
  reaching.clear();
  for (const Extent& next : all) {
    reaching.erase(std::remove_if(reaching.begin(), reaching.end(),
                                  [&](const Extent* e) { return e->end <= next.begin; }),
                   reaching.end());
    for (const Extent* earlier : reaching) {
      const Overlap overlap = elements_overlap(*earlier, next);
      TORCH_CHECK_VALUE(overlap != Overlap::kYes, op, ": ", names(earlier->list, earlier->index),
                        " and ", names(next.list, next.index),
                        " share memory; every tensor of a call must be distinct storage (is the "
                        "same tensor passed twice?)");
      TORCH_CHECK_VALUE(overlap != Overlap::kUnknown, op, ": cannot verify that ",
                        names(earlier->list, earlier->index), " and ",
                        names(next.list, next.index),
                        " share no memory: their strides interleave over more than ",
                        kMaxEnumeratedElements, " elements; pass contiguous tensors");
    }
    reaching.push_back(&next);
  }
}

template <typename Name>
void check_no_self_overlap(const char* op, const at::Tensor& t, const Name& name) {
  const Overlap overlap = self_overlap(t);
  TORCH_CHECK_VALUE(overlap != Overlap::kYes, op, ": ", name(),
                    " has elements that share memory (an expanded or as_strided view?); each "
                    "element must be its own memory location");
  TORCH_CHECK_VALUE(overlap != Overlap::kUnknown, op, ": cannot verify that the elements of ", name(),
                    " share no memory: its strides interleave over more than ",
                    kMaxEnumeratedElements, " elements; pass a contiguous tensor");
}

}  // namespace

namespace {

// A list of the call with the name its messages use.
struct NamedList {
  const char* name;
  at::TensorList tensors;
};

// What every op that writes lists (slow, fast, and any list of buffers kept in the slow dtype)
// requires of them, index by index.
Layout validate_written_lists(const char* op, c10::ArrayRef<NamedList> lists,
                              const ArgumentNames& names) {
  const NamedList& slow = lists[0];
  const NamedList& fast = lists[1];
  for (const NamedList& list : lists.slice(1)) {
    TORCH_CHECK_VALUE(list.tensors.size() == slow.tensors.size(), op, ": slow has ",
                      slow.tensors.size(), " tensors but ", list.name, " has ", list.tensors.size(),
                      "; the lists pair up element by element");
  }
  Layout layout;
  const size_t count = slow.tensors.size();
  if (count == 0) return layout;

  const auto device = slow.tensors[0].device();
  const std::string first = names("slow", 0);
  const auto slow_dtype = slow.tensors[0].scalar_type();
  const auto fast_dtype = fast.tensors[0].scalar_type();
  std::vector<at::TensorList> tensor_lists;
  for (const NamedList& list : lists) tensor_lists.push_back(list.tensors);
  AddressSpace addresses;
  Scratch& reused = scratch(lists.size());
  std::vector<std::vector<Extent>>& extents = reused.extents;
  layout.flat.reserve(count);
  for (size_t i = 0; i < count; ++i) {
    prefetch_ahead(tensor_lists, i);
    const at::Tensor& s = slow.tensors[i];
    const at::Tensor& f = fast.tensors[i];
    bool symbolic = false;
    for (const NamedList& list : lists) {
      const at::Tensor& t = list.tensors[i];
      const auto name = [&] { return names(list.name, i); };
      check_tensor_argument(op, t, name, device, first);
      check_writable(op, t, name);
      // Traced with dynamic shapes (torch.compile), sizes are symbolic: the shapes are compared
      // as such, and the layout and memory checks are left to the real call.
      symbolic = symbolic || t.unsafeGetTensorImpl()->has_symbolic_sizes_strides();
    }
    for (const NamedList& list : lists.slice(1)) {
      const at::Tensor& t = list.tensors[i];
      TORCH_CHECK_VALUE(symbolic ? t.sym_sizes() == s.sym_sizes() : t.sizes() == s.sizes(), op,
                        ": ", names("slow", i), " has shape ", s.sym_sizes(), " but ",
                        names(list.name, i), " has shape ", t.sym_sizes());
    }
    TORCH_CHECK_TYPE(is_supported_pair(s.scalar_type(), f.scalar_type()), op,
                     ": unsupported dtype pair at index ", i, ": slow ",
                     dtype_name(s.scalar_type()), ", fast ", dtype_name(f.scalar_type()),
                     "; supported (slow, fast) pairs are ", supported_pairs_text());
    TORCH_CHECK_TYPE(s.scalar_type() == slow_dtype && f.scalar_type() == fast_dtype, op,
                     ": index ", i, " has dtypes (slow ", dtype_name(s.scalar_type()), ", fast ",
                     dtype_name(f.scalar_type()), ") but index 0 has (slow ",
                     dtype_name(slow_dtype), ", fast ", dtype_name(fast_dtype),
                     "); one call takes one dtype pair, so group tensors by dtype first");
    for (const NamedList& list : lists.slice(2)) {
      const at::Tensor& t = list.tensors[i];
      TORCH_CHECK_TYPE(t.scalar_type() == slow_dtype, op, ": ", names(list.name, i),
                       " has dtype ", dtype_name(t.scalar_type()), " but the slow weights have ",
                       dtype_name(slow_dtype), "; it is kept in the slow dtype");
    }
    if (symbolic || s.numel() == 0) continue;
    bool flat = true;
    for (const NamedList& list : lists.slice(1)) {
      flat = flat && same_element_order(s, list.tensors[i]);
    }
    FlatItem item{{}, s.numel(), i};
    for (size_t l = 0; l < lists.size(); ++l) {
      const at::Tensor& t = lists[l].tensors[i];
      if (!flat) check_no_self_overlap(op, t, [&] { return names(lists[l].name, i); });
      const uintptr_t start = addresses.first_element(t);
      item.data[l] = reinterpret_cast<void*>(start);
      extents[l].push_back(extent_of(t, start, flat, lists[l].name, i));
      check_within_storage(op, t, extents[l].back().end - start,
                           [&] { return names(lists[l].name, i); });
    }
    if (flat) {
      layout.flat.push_back(item);
    } else {
      layout.strided.push_back(i);
    }
  }
  check_no_shared_memory(op, reused, names);
  return layout;
}

}  // namespace

Layout validate_update(const char* op, at::TensorList slow, at::TensorList fast, double alpha,
                       const ArgumentNames& names) {
  TORCH_CHECK_VALUE(std::isfinite(alpha) && alpha > 0.0 && alpha <= 1.0, op,
                    ": alpha must be in (0, 1], got ", alpha);
  const NamedList lists[] = {{"slow", slow}, {"fast", fast}};
  return validate_written_lists(op, lists, names);
}

Layout validate_momentum_update(const char* op, at::TensorList slow, at::TensorList fast,
                                at::TensorList momentum, double lr, double mu,
                                const ArgumentNames& names) {
  TORCH_CHECK_VALUE(std::isfinite(lr) && lr > 0.0 && lr <= 1.0, op,
                    ": lr must be in (0, 1], got ", lr);
  TORCH_CHECK_VALUE(std::isfinite(mu) && mu >= 0.0 && mu < 1.0, op,
                    ": mu must be in [0, 1), got ", mu);
  const NamedList lists[] = {{"slow", slow}, {"fast", fast}, {"momentum", momentum}};
  return validate_written_lists(op, lists, names);
}

Layout validate_flat_pairs(const char* op, at::TensorList slow, at::TensorList fast,
                           const ArgumentNames& names) {
  const NamedList lists[] = {{"slow", slow}, {"fast", fast}};
  Layout layout = validate_written_lists(op, lists, names);
  for (const size_t i : layout.strided) {
    TORCH_CHECK_VALUE(false, op, ": ", names("slow", i), " and ", names("fast", i),
                      " are not flat arrays in one element order (dense, with the same strides); "
                      "quantized pseudo-gradients are sent in memory order");
  }
  return layout;
}

Layout validate_quantization(const char* op, at::TensorList slow, at::TensorList fast,
                             const at::Tensor& payload, const at::Tensor& scales, bool gathered) {
  Layout layout = validate_flat_pairs(op, slow, fast);
  // Traced with dynamic shapes (torch.compile), sizes are symbolic: the checks of sizes are left to
  // the real call, as for the lists.
  const auto symbolic = [](const at::Tensor& t) {
    return t.defined() && t.unsafeGetTensorImpl()->has_symbolic_sizes_strides();
  };
  bool sized = !symbolic(payload) && !symbolic(scales);
  for (const at::Tensor& s : slow) sized = sized && !symbolic(s);
  int64_t elements = 0;
  int64_t blocks = 0;
  std::vector<std::pair<int64_t, int64_t>> offsets;  // by list index: (element, block)
  offsets.reserve(slow.size());
  for (const at::Tensor& s : slow) {
    offsets.emplace_back(elements, blocks);
    if (!sized) continue;
    elements += s.numel();
    blocks += quantization_blocks(s.numel());
  }
  for (const auto& [tensor, name, dtype, count] :
       {std::tuple{&payload, gathered ? "payloads" : "payload", at::kChar, elements},
        std::tuple{&scales, "scales", at::kFloat, blocks}}) {
    TORCH_CHECK_VALUE(tensor->defined(), op, ": ", name, " is an undefined tensor");
    TORCH_CHECK_TYPE(tensor->scalar_type() == dtype, op, ": ", name, " must be ",
                     dtype_name(dtype), ", got ", dtype_name(tensor->scalar_type()));
    TORCH_CHECK_VALUE(slow.empty() || tensor->device() == slow[0].device(), op, ": ", name,
                      " is on ", tensor->device(), " but the tensors are on ", slow[0].device());
    if (!sized) continue;
    TORCH_CHECK_VALUE(tensor->layout() == at::kStrided && tensor->is_contiguous(), op, ": ", name,
                      " must be a contiguous dense tensor");
    const int64_t dims = gathered ? 2 : 1;
    TORCH_CHECK_VALUE(tensor->dim() == dims && tensor->size(dims - 1) == count &&
                          (!gathered || tensor->size(0) == payload.size(0)),
                      op, ": ", name, " must have shape ", gathered ? "(workers, " : "(", count,
                      ") for these tensors, got ", tensor->sizes());
    check_within_storage(op, *tensor, tensor->numel() * tensor->element_size(),
                         [&] { return name; });
  }
  // Buffers written while the lists are read, or read while a list is written: no memory shared.
  const auto storage_of = [](const at::Tensor& t) {
    return t.has_storage() ? t.storage().unsafeGetStorageImpl() : nullptr;
  };
  const char* payload_name = gathered ? "payloads" : "payload";
  TORCH_CHECK_VALUE(storage_of(payload) != storage_of(scales), op, ": ", payload_name,
                    " and scales share memory");
  for (const auto& [list, list_name] : {std::pair{slow, "slow"}, std::pair{fast, "fast"}}) {
    for (size_t i = 0; i < list.size(); ++i) {
      for (const auto& [buffer, name] :
           {std::pair{&payload, payload_name}, std::pair{&scales, "scales"}}) {
        TORCH_CHECK_VALUE(storage_of(list[i]) != storage_of(*buffer), op, ": ", name,
                          " shares memory with ", list_name, "[", i, "]");
      }
    }
  }
  if (!sized) return layout;
  TORCH_CHECK_VALUE(!gathered || payload.size(0) > 0, op, ": payloads holds no worker's");
  if (!payload.is_meta()) {
    auto* q = static_cast<char*>(payload.data_ptr());
    auto* scale = static_cast<char*>(scales.data_ptr());
    for (FlatItem& item : layout.flat) {
      const auto [element, block] = offsets[item.index];
      item.data[2] = q + element;
      item.data[3] = scale + block * static_cast<int64_t>(sizeof(float));
    }
  }
  return layout;
}

void validate_update_flags(const char* op, at::TensorList slow, const at::Tensor& due,
                           const std::optional<at::Tensor>& restore) {
  std::optional<at::Device> device;
  if (!slow.empty()) device = slow[0].device();
  check_flag(op, due, "due", device);
  if (restore) check_flag(op, *restore, "restore", device);
}

Layout validate_nonfinite_check(at::TensorList tensors, const at::Tensor& found,
                                const std::optional<at::Tensor>& due) {
  constexpr const char* kOp = "found_nonfinite_";
  std::optional<at::Device> device;
  if (!tensors.empty()) device = tensors[0].device();
  check_flag(kOp, found, "found", device);
  if (due) check_flag(kOp, *due, "due", device);
  check_writable(kOp, found, [] { return "found"; });
  Layout layout;
  if (tensors.empty()) return layout;
  const auto dtype = tensors[0].scalar_type();
  layout.flat.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    prefetch_ahead({tensors}, i);
    const at::Tensor& t = tensors[i];
    check_tensor_argument(
        kOp, t, [&] { return "tensors[" + std::to_string(i) + "]"; }, *device, "tensors[0]");
    TORCH_CHECK_TYPE(t.scalar_type() == dtype, kOp, ": tensors[", i, "] has dtype ",
                     dtype_name(t.scalar_type()), " but tensors[0] has ", dtype_name(dtype),
                     "; one call takes one dtype");
    if (t.unsafeGetTensorImpl()->has_symbolic_sizes_strides() || t.numel() == 0) continue;
    // Read-only: a tensor whose elements share memory is read as it is.
    if (t.is_non_overlapping_and_dense() && !t.is_meta()) {
      check_within_storage(kOp, t, t.numel() * t.element_size(),
                           [&] { return "tensors[" + std::to_string(i) + "]"; });
      layout.flat.push_back({{t.data_ptr()}, t.numel(), i});
    } else {
      layout.strided.push_back(i);
    }
  }
  return layout;
}

}  // namespace lookahead
