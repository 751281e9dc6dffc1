// CPU backend of lookahead_update_ and lookahead_update_if_: the tensor pairs that are flat arrays
// go through one parallel region (parallel_over.h) of plain contiguous loops that the compiler
// vectorises; any other layout goes through ATen one tensor at a time (op_contract.h).
#include <ATen/OpMathType.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "../dtype_pairs.h"
#include "../lerp.h"
#include "../op_contract.h"
#include "parallel_over.h"

// The fused multiply-add must be an instruction, not a libm call, for the loop to stay memory-bound;
// binaries are built for baseline x86-64, so the fused loops alone are compiled for AVX2+FMA and are
// only chosen when torch itself runs its AVX2/AVX512 kernels (which implies the CPU has FMA).
#if defined(__x86_64__) || defined(_M_X64)
#define LOOKAHEAD_FMA_TARGET __attribute__((target("avx2,fma")))
#else
#define LOOKAHEAD_FMA_TARGET
#endif

namespace lookahead {
namespace {

template <bool kFused, bool kSmall, typename S, typename F, typename opmath_t>
C10_ALWAYS_INLINE void update_loop(S* __restrict__ slow, F* __restrict__ fast, int64_t n,
                                   opmath_t coeff) {
  for (int64_t i = 0; i < n; ++i) {
    const S r = static_cast<S>(lerp<kFused, kSmall>(static_cast<opmath_t>(slow[i]),
                                                    static_cast<opmath_t>(fast[i]), coeff));
    slow[i] = r;
    fast[i] = static_cast<F>(r);
  }
}

template <bool kSmall, typename S, typename F, typename opmath_t>
LOOKAHEAD_FMA_TARGET void update_fused(S* slow, F* fast, int64_t n, opmath_t coeff) {
  update_loop<true, kSmall>(slow, fast, n, coeff);
}

template <bool kSmall, typename S, typename F, typename opmath_t>
void update_unfused(S* slow, F* fast, int64_t n, opmath_t coeff) {
  update_loop<false, kSmall>(slow, fast, n, coeff);
}

// Whether torch.lerp on this CPU rounds its multiply-add once (see lerp.h).
bool torch_lerp_is_fused() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool fused = at::get_cpu_capability() != "DEFAULT";
  return fused;
#else
  return true;  // the vector units of aarch64, POWER and s390x multiply-add in one rounding
#endif
}

template <typename S, typename F>
void update_flat(const std::vector<FlatPair>& pairs, double alpha) {
  using opmath_t = at::opmath_type<S>;
  const LerpWeight<opmath_t> weight(alpha);
  // The weight's branch and the rounding mode are uniform over the call: pick the loop once.
  using Loop = void (*)(S*, F*, int64_t, opmath_t);
  Loop loop;
  if (torch_lerp_is_fused()) {
    loop = weight.small ? update_fused<true, S, F, opmath_t> : update_fused<false, S, F, opmath_t>;
  } else {
    loop = weight.small ? update_unfused<true, S, F, opmath_t>
                        : update_unfused<false, S, F, opmath_t>;
  }
  parallel_over(pairs, [&](size_t t, int64_t offset, int64_t n) {
    loop(static_cast<S*>(pairs[t].slow) + offset, static_cast<F*>(pairs[t].fast) + offset, n,
         weight.coeff);
  });
}

// The divergence guard's way out: the fast weights restart from the slow ones, which stay as they
// are (rounded as fast.copy_(slow) rounds).
template <typename S, typename F>
void restore_flat(const std::vector<FlatPair>& pairs) {
  parallel_over(pairs, [&](size_t t, int64_t offset, int64_t n) {
    const S* __restrict__ slow = static_cast<const S*>(pairs[t].slow) + offset;
    F* __restrict__ fast = static_cast<F*>(pairs[t].fast) + offset;
    for (int64_t i = 0; i < n; ++i) fast[i] = static_cast<F>(slow[i]);
  });
}

void lookahead_update_cpu(at::TensorList slow, at::TensorList fast, double alpha) {
  lookahead_update_with(slow, fast, alpha, [&](const std::vector<FlatPair>& flat) {
    dispatch_dtype_pair(slow[0].scalar_type(), fast[0].scalar_type(), [&](auto s, auto f) {
      update_flat<typename decltype(s)::type, typename decltype(f)::type>(flat, alpha);
    });
  });
}

// The flags live in host memory here, so they are read before any work is started.
void lookahead_update_if_cpu(at::TensorList slow, at::TensorList fast, double alpha,
                             const at::Tensor& due, const std::optional<at::Tensor>& restore) {
  lookahead_update_if_with(slow, fast, alpha, due, restore, [&](const std::vector<FlatPair>& flat) {
    if (!due.item<bool>()) return;
    const bool restoring = restore && restore->item<bool>();
    dispatch_dtype_pair(slow[0].scalar_type(), fast[0].scalar_type(), [&](auto s, auto f) {
      using S = typename decltype(s)::type;
      using F = typename decltype(f)::type;
      if (restoring) {
        restore_flat<S, F>(flat);
      } else {
        update_flat<S, F>(flat, alpha);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lookahead_cuda, CPU, m) {
  m.impl("lookahead_update_", &lookahead_update_cpu);
  m.impl("lookahead_update_if_", &lookahead_update_if_cpu);
}

// Sparse tensors dispatch here rather than to CPU; the validation rejects them with a clear message.
TORCH_LIBRARY_IMPL(lookahead_cuda, SparseCPU, m) {
  m.impl("lookahead_update_", &lookahead_update_cpu);
  m.impl("lookahead_update_if_", &lookahead_update_if_cpu);
}

}  // namespace lookahead
