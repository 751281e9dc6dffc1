#include "stream_swap.h"

#include <ATen/Parallel.h>

#include "vector_target.h"

namespace lookahead {
namespace {

// Compiled as the kernels' loops are, so that the yardstick moves bytes as fast as they can.
void swap_loop(float* __restrict__ x, float* __restrict__ y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float t = x[i];
    x[i] = y[i];
    y[i] = t;
  }
}

LOOKAHEAD_VECTOR_TARGET void swap_loop_vector(float* x, float* y, int64_t n) { swap_loop(x, y, n); }

}  // namespace

void stream_swap_cpu(const at::Tensor& a, const at::Tensor& b) {
  for (const auto* t : {&a, &b}) {
    TORCH_CHECK_VALUE(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == at::kFloat,
                      "stream_swap_: contiguous float32 CPU tensors only");
  }
  TORCH_CHECK_VALUE(a.numel() == b.numel(), "stream_swap_: a has ", a.numel(),
                    " elements but b has ", b.numel());
  float* x = a.data_ptr<float>();
  float* y = b.data_ptr<float>();
  const auto loop = vector_target_enabled() ? swap_loop_vector : swap_loop;
  at::parallel_for(0, a.numel(), int64_t{1} << 15,
                   [&](int64_t begin, int64_t end) { loop(x + begin, y + begin, end - begin); });
}

}  // namespace lookahead
