// The Ops of the sync kernels (lookahead_update_, lookahead_momentum_update_ and their gated
// forms), and the choice of one for a call: element types, math type, the weight's branch and
// Nesterov or not. Device code and its choice, shared by the CUDA backend (lookahead_update.cu)
// and the emulated grid of tests/cuda_emulation, which differ only in how they launch.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <optional>
#include <type_traits>

#include "../dtype_pairs.h"
#include "../element_math.h"
#include "multi_tensor_kernel.h"

namespace lookahead {

// The flags of a gated call, read by every thread before it touches memory: nothing unless *due;
// with *restore, the fast weights restart from the slow ones, which (with any momentum) stay as
// they are. due == nullptr: an unconditional sync.
struct Gate {
  const bool* due;
  const bool* restore;  // nullptr: never restore
  bool restoring = false;

  __device__ __forceinline__ bool open() {
    if (due == nullptr) return true;
    if (!*due) return false;
    restoring = restore != nullptr && *restore;
    return true;
  }
};

inline Gate gate_of(const at::Tensor& due, const std::optional<at::Tensor>& restore) {
  return {due.data_ptr<bool>(), restore ? restore->data_ptr<bool>() : nullptr};
}

// CUDA's torch.lerp is compiled with FMA contraction and its scalar form (element_math.h), so the
// multiply-add is fused and uses LerpWeight::coeff.
template <typename opmath_t, bool kSmall>
struct SyncOp : mta::ElementwiseOp {
  opmath_t coeff;
  Gate gate;

  __device__ __forceinline__ bool prepare() { return gate.open(); }

  template <typename S, typename F>
  __device__ __forceinline__ void operator()(S& slow, F& fast) const {
    if (gate.restoring) {
      restore_element(slow, fast);
    } else {
      sync_element<true, kSmall>(slow, fast, coeff);
    }
  }
};

template <typename opmath_t, bool kNesterov>
struct MomentumOp : mta::ElementwiseOp {
  opmath_t lr;
  opmath_t mu;
  Gate gate;

  __device__ __forceinline__ bool prepare() { return gate.open(); }

  template <typename S, typename F>
  __device__ __forceinline__ void operator()(S& slow, F& fast, S& momentum) const {
    if (gate.restoring) {
      restore_element(slow, fast);
    } else {
      momentum_element<true, kNesterov>(slow, fast, momentum, lr, mu);
    }
  }
};

namespace detail {
// The weight's branch (and Nesterov or not) is uniform over a call: a template argument, not a
// per-element test.
template <typename Launch>
void with_flag(bool flag, const Launch& launch) {
  if (flag) {
    launch(std::true_type{});
  } else {
    launch(std::false_type{});
  }
}
}  // namespace detail

// Calls launch(mta::Elements<S, F>{}, op) with the Op of a sync for a (validated) dtype pair.
template <typename Launch>
void launch_sync(c10::ScalarType slow, c10::ScalarType fast, double alpha, Gate gate,
                 const Launch& launch) {
  dispatch_dtype_pair(slow, fast, [&](auto pair) {
    using S = typename decltype(pair)::slow_t;
    using F = typename decltype(pair)::fast_t;
    using opmath_t = at::opmath_type<S>;
    const LerpWeight<opmath_t> weight(alpha);
    detail::with_flag(weight.small, [&](auto small) {
      launch(mta::Elements<S, F>{},
             SyncOp<opmath_t, decltype(small)::value>{{}, weight.coeff, gate});
    });
  });
}

// Calls launch(mta::Elements<S, F, S>{}, op) with the Op of a momentum sync.
template <typename Launch>
void launch_momentum_sync(c10::ScalarType slow, c10::ScalarType fast, double lr, double mu,
                          bool nesterov, Gate gate, const Launch& launch) {
  dispatch_dtype_pair(slow, fast, [&](auto pair) {
    using S = typename decltype(pair)::slow_t;
    using F = typename decltype(pair)::fast_t;
    using opmath_t = at::opmath_type<S>;
    detail::with_flag(nesterov, [&](auto nesterov_flag) {
      launch(mta::Elements<S, F, S>{},
             MomentumOp<opmath_t, decltype(nesterov_flag)::value>{
                 {}, static_cast<opmath_t>(lr), static_cast<opmath_t>(mu), gate});
    });
  });
}

}  // namespace lookahead
