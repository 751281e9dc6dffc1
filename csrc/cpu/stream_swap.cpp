#include "stream_swap.h"

#include <ATen/Parallel.h>

namespace lookahead {

void stream_swap_cpu(const at::Tensor& a, const at::Tensor& b) {
  for (const auto* t : {&a, &b}) {
    TORCH_CHECK_VALUE(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == at::kFloat,
                      "stream_swap_: contiguous float32 CPU tensors only");
  }
  TORCH_CHECK_VALUE(a.numel() == b.numel(), "stream_swap_: a has ", a.numel(),
                    " elements but b has ", b.numel());
  float* x = a.data_ptr<float>();
  float* y = b.data_ptr<float>();
  at::parallel_for(0, a.numel(), int64_t{1} << 15, [&](int64_t begin, int64_t end) {
    float* __restrict__ xs = x + begin;
    float* __restrict__ ys = y + begin;
    for (int64_t i = 0; i < end - begin; ++i) {
      const float t = xs[i];
      xs[i] = ys[i];
      ys[i] = t;
    }
  });
}

}  // namespace lookahead
