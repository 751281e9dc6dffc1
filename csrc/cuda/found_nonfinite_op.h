// The Op of found_nonfinite_'s kernel and the choice of one for a call, shared by the CUDA backend
// (found_nonfinite.cu) and the emulated grid of tests/cuda_emulation.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/core/ScalarType.h>

#include "../dtype_pairs.h"
#include "../element_math.h"
#include "multi_tensor_kernel.h"

namespace lookahead {

template <typename opmath_t>
struct FindNonfiniteOp : mta::ElementwiseOp {
  static constexpr bool kWrites = false;
  const bool* due;  // nullptr: always check
  bool* found;
  bool bad = false;

  __device__ __forceinline__ bool prepare() { return due == nullptr || *due; }

  template <typename T>
  __device__ __forceinline__ void operator()(T& x) {
    bad |= is_nonfinite<opmath_t>(x);
  }

  // Every thread of the block reaches the barrier; one write per block, and every writer writes
  // the same value.
  __device__ __forceinline__ void finish() {
    if (__syncthreads_or(bad) && threadIdx.x == 0) *found = true;
  }
};

// Calls launch(mta::Elements<T>{}, op) with the Op that checks tensors of `dtype` (validated).
template <typename Launch>
void launch_found_nonfinite(c10::ScalarType dtype, const bool* due, bool* found,
                            const Launch& launch) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch(mta::Elements<T>{}, FindNonfiniteOp<at::opmath_type<T>>{{}, due, found});
  });
}

}  // namespace lookahead
