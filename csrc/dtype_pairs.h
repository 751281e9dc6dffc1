// The (slow, fast) dtype pairs the ops support: the one table, from which validation, kernel
// dispatch, error messages and the Python side (lookahead_cuda.ops.SUPPORTED_DTYPE_PAIRS and
// SUPPORTED_DTYPES) all read. The floating dtypes the ops accept at all (found_nonfinite_ reads one
// list of any of them) are those that appear in a pair.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <string>
#include <utility>
#include <vector>

namespace lookahead {

template <typename S, typename F>
struct DtypePair {
  using slow_t = S;
  using fast_t = F;
  static constexpr c10::ScalarType slow = c10::CppTypeToScalarType<S>::value;
  static constexpr c10::ScalarType fast = c10::CppTypeToScalarType<F>::value;
};

template <typename... Pairs>
struct PairList {};

// A C++ element type as a value, for a generic lambda to take.
template <typename T>
struct TypeTag {
  using type = T;
};

// Same-dtype pairs for every floating dtype torch optimizes, plus fp32 slow weights for
// half-precision parameters (mixed-precision training keeps the slow copy in full precision).
using SupportedPairs =
    PairList<DtypePair<float, float>, DtypePair<double, double>, DtypePair<c10::Half, c10::Half>,
             DtypePair<c10::BFloat16, c10::BFloat16>, DtypePair<float, c10::Half>,
             DtypePair<float, c10::BFloat16>>;

namespace detail {
template <typename Fn, typename... Pairs>
bool visit_pair(PairList<Pairs...>, c10::ScalarType slow, c10::ScalarType fast, Fn&& fn) {
  return ((slow == Pairs::slow && fast == Pairs::fast && (fn(Pairs{}), true)) || ...);
}

template <typename... Pairs>
std::vector<std::pair<c10::ScalarType, c10::ScalarType>> list_pairs(PairList<Pairs...>) {
  return {{Pairs::slow, Pairs::fast}...};
}

template <typename Fn, typename... Pairs>
bool visit_float(PairList<Pairs...>, c10::ScalarType t, Fn&& fn) {
  return ((t == Pairs::slow && (fn(TypeTag<typename Pairs::slow_t>{}), true)) || ...) ||
         ((t == Pairs::fast && (fn(TypeTag<typename Pairs::fast_t>{}), true)) || ...);
}
}  // namespace detail

// Calls fn(DtypePair<slow_t, fast_t>{}) for a supported pair; returns false for any other pair.
template <typename Fn>
bool visit_dtype_pair(c10::ScalarType slow, c10::ScalarType fast, Fn&& fn) {
  return detail::visit_pair(SupportedPairs{}, slow, fast, std::forward<Fn>(fn));
}

inline bool is_supported_pair(c10::ScalarType slow, c10::ScalarType fast) {
  return visit_dtype_pair(slow, fast, [](auto) {});
}

// For kernels after validation: the pair is known to be supported.
template <typename Fn>
void dispatch_dtype_pair(c10::ScalarType slow, c10::ScalarType fast, Fn&& fn) {
  TORCH_INTERNAL_ASSERT(visit_dtype_pair(slow, fast, std::forward<Fn>(fn)),
                        "dispatch_dtype_pair reached with an unchecked pair");
}

inline std::vector<std::pair<c10::ScalarType, c10::ScalarType>> supported_pairs() {
  return detail::list_pairs(SupportedPairs{});
}

// Calls fn(TypeTag<T>{}) once for a dtype of some supported pair; returns false for any other.
template <typename Fn>
bool visit_dtype(c10::ScalarType t, Fn&& fn) {
  return detail::visit_float(SupportedPairs{}, t, std::forward<Fn>(fn));
}

inline bool is_supported_dtype(c10::ScalarType t) {
  return visit_dtype(t, [](auto) {});
}

// For kernels after validation: the dtype is known to be supported.
template <typename Fn>
void dispatch_dtype(c10::ScalarType t, Fn&& fn) {
  TORCH_INTERNAL_ASSERT(visit_dtype(t, std::forward<Fn>(fn)),
                        "dispatch_dtype reached with an unchecked dtype");
}

// The dtypes of the pairs, each once, in the table's order.
std::vector<c10::ScalarType> supported_dtypes();

// "torch.float32, torch.float64, ...": for error messages.
std::string supported_dtypes_text();

// torch's Python spelling of a dtype, so messages match what the user wrote.
std::string dtype_name(c10::ScalarType t);

// "(torch.float32, torch.float32), ...": the table, for error messages.
std::string supported_pairs_text();

}  // namespace lookahead
