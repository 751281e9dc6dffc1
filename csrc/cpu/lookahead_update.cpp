// CPU backend of lookahead_update_: one parallel region over every tensor of a call.
//
// ATen's foreach ops and fused optimizers fork and join the thread pool once per tensor, so a model
// with thousands of small parameters pays that start-up thousands of times. Here the tensor pairs
// that are flat arrays form one flattened index space (prefix sums of their sizes) that
// at::parallel_for splits once; each thread walks the tensors its range overlaps with plain
// contiguous loops that the compiler vectorises. Any other layout goes through ATen's lerp_/copy_
// one tensor at a time (op_contract.h).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../dtype_pairs.h"
#include "../lerp.h"
#include "../op_contract.h"

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

// Elements per task: large enough that a task's start-up is noise next to streaming its memory.
constexpr int64_t kGrainSize = 32768;

// The flat pairs laid end to end: begin[i] is the flat index of pair i's first element.
std::vector<int64_t> flat_offsets(const std::vector<FlatPair>& pairs) {
  std::vector<int64_t> begin(pairs.size() + 1, 0);
  for (size_t i = 0; i < pairs.size(); ++i) begin[i + 1] = begin[i] + pairs[i].numel;
  return begin;
}

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
  const std::vector<int64_t> begin_of = flat_offsets(pairs);
  at::parallel_for(0, begin_of.back(), kGrainSize, [&](int64_t begin, int64_t end) {
    auto t = std::upper_bound(begin_of.begin(), begin_of.end(), begin) - begin_of.begin() - 1;
    while (begin < end) {
      const int64_t stop = std::min(end, begin_of[t + 1]);
      const int64_t offset = begin - begin_of[t];
      loop(static_cast<S*>(pairs[t].slow) + offset, static_cast<F*>(pairs[t].fast) + offset,
           stop - begin, weight.coeff);
      begin = stop;
      ++t;
    }
  });
}

void lookahead_update_cpu(at::TensorList slow, at::TensorList fast, double alpha) {
  lookahead_update_with(slow, fast, alpha, [&](const std::vector<FlatPair>& flat) {
    dispatch_dtype_pair(slow[0].scalar_type(), fast[0].scalar_type(), [&](auto s, auto f) {
      update_flat<typename decltype(s)::type, typename decltype(f)::type>(flat, alpha);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lookahead_cuda, CPU, m) {
  m.impl("lookahead_update_", &lookahead_update_cpu);
}

// Sparse tensors dispatch here rather than to CPU; the validation rejects them with a clear message.
TORCH_LIBRARY_IMPL(lookahead_cuda, SparseCPU, m) {
  m.impl("lookahead_update_", &lookahead_update_cpu);
}

}  // namespace lookahead
