// CPU backend of found_nonfinite_: one parallel pass reading every element of the flat tensors.
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <atomic>
#include <optional>
#include <vector>

#include "../dtype_pairs.h"
#include "../element_math.h"
#include "../op_skeleton.h"
#include "parallel_over.h"

namespace lookahead {
namespace {

template <typename T>
bool any_nonfinite(const T* __restrict__ x, int64_t n) {
  bool bad = false;
  for (int64_t i = 0; i < n; ++i) bad |= is_nonfinite<at::opmath_type<T>>(x[i]);
  return bad;
}

void found_nonfinite_cpu(at::TensorList tensors, const at::Tensor& found,
                         const std::optional<at::Tensor>& due) {
  run<Op::found_nonfinite_>([&](const std::vector<FlatItem>& flat) {
    if (due && !due->item<bool>()) return;
    std::atomic<bool> bad{false};
    dispatch_dtype(tensors[0].scalar_type(), [&](auto tag) {
      using T = typename decltype(tag)::type;
      parallel_over(flat, [&](size_t t, int64_t offset, int64_t n) {
        if (any_nonfinite(static_cast<const T*>(flat[t].data[0]) + offset, n)) {
          bad.store(true, std::memory_order_relaxed);
        }
      });
    });
    if (bad.load()) found.fill_(true);
  }, tensors, found, due);
}

}  // namespace

TORCH_LIBRARY_IMPL(lookahead_cuda, CPU, m) {
  m.impl("found_nonfinite_", &found_nonfinite_cpu);
}

}  // namespace lookahead
