// CPU backend of the sync ops (lookahead_update_, lookahead_momentum_update_ and their gated
// forms): the tensors that are flat arrays go through one parallel region (parallel_over.h) of
// plain contiguous loops that the compiler vectorises; any other layout goes through ATen one
// tensor at a time (op_skeleton.h).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "../dtype_pairs.h"
#include "../element_math.h"
#include "../op_skeleton.h"
#include "parallel_over.h"
#include "vector_target.h"

namespace lookahead {
namespace {

template <bool kFused, bool kSmall, typename S, typename F, typename opmath_t>
C10_ALWAYS_INLINE void sync_loop(S* __restrict__ slow, F* __restrict__ fast, int64_t n,
                                 opmath_t coeff) {
  for (int64_t i = 0; i < n; ++i) sync_element<kFused, kSmall, opmath_t>(slow[i], fast[i], coeff);
}

template <bool kSmall, typename S, typename F, typename opmath_t>
LOOKAHEAD_VECTOR_TARGET void sync_loop_fused(S* slow, F* fast, int64_t n, opmath_t coeff) {
  sync_loop<true, kSmall>(slow, fast, n, coeff);
}

template <bool kSmall, typename S, typename F, typename opmath_t>
void sync_loop_unfused(S* slow, F* fast, int64_t n, opmath_t coeff) {
  sync_loop<false, kSmall>(slow, fast, n, coeff);
}

template <bool kFused, bool kNesterov, typename S, typename F, typename opmath_t>
C10_ALWAYS_INLINE void momentum_loop(S* __restrict__ slow, F* __restrict__ fast,
                                     S* __restrict__ momentum, int64_t n, opmath_t lr,
                                     opmath_t mu) {
  for (int64_t i = 0; i < n; ++i) {
    momentum_element<kFused, kNesterov, opmath_t>(slow[i], fast[i], momentum[i], lr, mu);
  }
}

template <bool kNesterov, typename S, typename F, typename opmath_t>
LOOKAHEAD_VECTOR_TARGET void momentum_loop_fused(S* slow, F* fast, S* momentum, int64_t n,
                                              opmath_t lr, opmath_t mu) {
  momentum_loop<true, kNesterov>(slow, fast, momentum, n, lr, mu);
}

template <bool kNesterov, typename S, typename F, typename opmath_t>
void momentum_loop_unfused(S* slow, F* fast, S* momentum, int64_t n, opmath_t lr, opmath_t mu) {
  momentum_loop<false, kNesterov>(slow, fast, momentum, n, lr, mu);
}

// Whether a multiply-add is rounded once: where torch's CPU kernels round it once too
// (vector_target.h), so that torch.lerp stays the reference. The outer-momentum sync follows the
// same choice, so it agrees with CUDA wherever torch.lerp does.
bool fuses_multiply_add() { return vector_target_enabled(); }

template <typename S, typename F>
void sync_flat(const std::vector<FlatItem>& items, double alpha) {
  using opmath_t = at::opmath_type<S>;
  const LerpWeight<opmath_t> weight(alpha);
  // The weight's branch and the rounding mode are uniform over the call: pick the loop once.
  using Loop = void (*)(S*, F*, int64_t, opmath_t);
  Loop loop;
  if (fuses_multiply_add()) {
    loop = weight.small ? sync_loop_fused<true, S, F, opmath_t>
                        : sync_loop_fused<false, S, F, opmath_t>;
  } else {
    loop = weight.small ? sync_loop_unfused<true, S, F, opmath_t>
                        : sync_loop_unfused<false, S, F, opmath_t>;
  }
  parallel_over(items, [&](size_t t, int64_t offset, int64_t n) {
    loop(static_cast<S*>(items[t].data[0]) + offset, static_cast<F*>(items[t].data[1]) + offset, n,
         weight.coeff);
  });
}

template <typename S, typename F>
void momentum_flat(const std::vector<FlatItem>& items, double lr, double mu, bool nesterov) {
  using opmath_t = at::opmath_type<S>;
  using Loop = void (*)(S*, F*, S*, int64_t, opmath_t, opmath_t);
  Loop loop;
  if (fuses_multiply_add()) {
    loop = nesterov ? momentum_loop_fused<true, S, F, opmath_t>
                    : momentum_loop_fused<false, S, F, opmath_t>;
  } else {
    loop = nesterov ? momentum_loop_unfused<true, S, F, opmath_t>
                    : momentum_loop_unfused<false, S, F, opmath_t>;
  }
  const auto step_size = static_cast<opmath_t>(lr);
  const auto coefficient = static_cast<opmath_t>(mu);
  parallel_over(items, [&](size_t t, int64_t offset, int64_t n) {
    loop(static_cast<S*>(items[t].data[0]) + offset, static_cast<F*>(items[t].data[1]) + offset,
         static_cast<S*>(items[t].data[2]) + offset, n, step_size, coefficient);
  });
}

// The divergence guard's way out for both syncs: the slow weights (and any momentum) stay.
template <typename S, typename F>
void restore_flat(const std::vector<FlatItem>& items) {
  parallel_over(items, [&](size_t t, int64_t offset, int64_t n) {
    const S* __restrict__ slow = static_cast<const S*>(items[t].data[0]) + offset;
    F* __restrict__ fast = static_cast<F*>(items[t].data[1]) + offset;
    for (int64_t i = 0; i < n; ++i) restore_element(slow[i], fast[i]);
  });
}

// The gated forms' flags live in host memory here, so they are read before any work is started;
// sync(pair) runs the sync, restore_flat the divergence guard's restore.
template <typename Sync>
void gated_flat(at::TensorList slow, at::TensorList fast, const at::Tensor& due,
                const std::optional<at::Tensor>& restore, const std::vector<FlatItem>& flat,
                const Sync& sync) {
  if (!due.item<bool>()) return;
  const bool restoring = restore && restore->item<bool>();
  dispatch_dtype_pair(slow[0].scalar_type(), fast[0].scalar_type(), [&](auto pair) {
    using Pair = decltype(pair);
    if (restoring) {
      restore_flat<typename Pair::slow_t, typename Pair::fast_t>(flat);
    } else {
      sync(pair);
    }
  });
}

void lookahead_update_cpu(at::TensorList slow, at::TensorList fast, double alpha) {
  run<Op::lookahead_update_>([&](const std::vector<FlatItem>& flat) {
    dispatch_dtype_pair(slow[0].scalar_type(), fast[0].scalar_type(), [&](auto pair) {
      using Pair = decltype(pair);
      sync_flat<typename Pair::slow_t, typename Pair::fast_t>(flat, alpha);
    });
  }, slow, fast, alpha);
}

void lookahead_update_if_cpu(at::TensorList slow, at::TensorList fast, double alpha,
                             const at::Tensor& due, const std::optional<at::Tensor>& restore) {
  run<Op::lookahead_update_if_>([&](const std::vector<FlatItem>& flat) {
    gated_flat(slow, fast, due, restore, flat, [&](auto pair) {
      using Pair = decltype(pair);
      sync_flat<typename Pair::slow_t, typename Pair::fast_t>(flat, alpha);
    });
  }, slow, fast, alpha, due, restore);
}

void lookahead_momentum_update_cpu(at::TensorList slow, at::TensorList fast,
                                   at::TensorList momentum, double lr, double mu, bool nesterov) {
  run<Op::lookahead_momentum_update_>([&](const std::vector<FlatItem>& flat) {
    dispatch_dtype_pair(slow[0].scalar_type(), fast[0].scalar_type(), [&](auto pair) {
      using Pair = decltype(pair);
      momentum_flat<typename Pair::slow_t, typename Pair::fast_t>(flat, lr, mu, nesterov);
    });
  }, slow, fast, momentum, lr, mu, nesterov);
}

void lookahead_momentum_update_if_cpu(at::TensorList slow, at::TensorList fast,
                                      at::TensorList momentum, double lr, double mu,
                                      bool nesterov, const at::Tensor& due,
                                      const std::optional<at::Tensor>& restore) {
  run<Op::lookahead_momentum_update_if_>([&](const std::vector<FlatItem>& flat) {
    gated_flat(slow, fast, due, restore, flat, [&](auto pair) {
      using Pair = decltype(pair);
      momentum_flat<typename Pair::slow_t, typename Pair::fast_t>(flat, lr, mu, nesterov);
    });
  }, slow, fast, momentum, lr, mu, nesterov, due, restore);
}

}  // namespace

TORCH_LIBRARY_IMPL(lookahead_cuda, CPU, m) {
  m.impl("lookahead_update_", &lookahead_update_cpu);
  m.impl("lookahead_update_if_", &lookahead_update_if_cpu);
  m.impl("lookahead_momentum_update_", &lookahead_momentum_update_cpu);
  m.impl("lookahead_momentum_update_if_", &lookahead_momentum_update_if_cpu);
}

}  // namespace lookahead
