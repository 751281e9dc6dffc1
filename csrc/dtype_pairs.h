// The (slow, fast) dtype pairs the op supports, and the dispatch from runtime dtypes to kernel types.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace lookahead {

template <typename T>
struct TypeTag {
  using type = T;
};

// Same-dtype pairs for every floating dtype torch optimizes, plus fp32 slow weights for half-precision
// parameters (mixed-precision training keeps the slow copy in full precision).
inline bool is_supported_pair(c10::ScalarType slow, c10::ScalarType fast) {
  using c10::ScalarType;
  const bool same_float = slow == fast && (slow == ScalarType::Float || slow == ScalarType::Double ||
                                           slow == ScalarType::Half || slow == ScalarType::BFloat16);
  const bool fp32_over_half =
      slow == ScalarType::Float && (fast == ScalarType::Half || fast == ScalarType::BFloat16);
  return same_float || fp32_over_half;
}

constexpr const char* kSupportedPairsText =
    "(float32, float32), (float64, float64), (float16, float16), (bfloat16, bfloat16), "
    "(float32, float16), (float32, bfloat16)";

// Calls fn(TypeTag<slow_t>{}, TypeTag<fast_t>{}) for a pair accepted by is_supported_pair.
template <typename Fn>
void dispatch_dtype_pair(c10::ScalarType slow, c10::ScalarType fast, Fn&& fn) {
  using c10::ScalarType;
  if (slow == fast) {
    switch (slow) {
      case ScalarType::Float: return fn(TypeTag<float>{}, TypeTag<float>{});
      case ScalarType::Double: return fn(TypeTag<double>{}, TypeTag<double>{});
      case ScalarType::Half: return fn(TypeTag<c10::Half>{}, TypeTag<c10::Half>{});
      case ScalarType::BFloat16: return fn(TypeTag<c10::BFloat16>{}, TypeTag<c10::BFloat16>{});
      default: break;
    }
  } else if (slow == ScalarType::Float && fast == ScalarType::Half) {
    return fn(TypeTag<float>{}, TypeTag<c10::Half>{});
  } else if (slow == ScalarType::Float && fast == ScalarType::BFloat16) {
    return fn(TypeTag<float>{}, TypeTag<c10::BFloat16>{});
  }
  TORCH_INTERNAL_ASSERT(false, "dispatch_dtype_pair reached with an unchecked pair");
}

}  // namespace lookahead
