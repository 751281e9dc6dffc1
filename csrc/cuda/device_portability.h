// The CUDA language of the device code, for nvcc and for the host compiler. The kernels' device
// code (multi_tensor_kernel.h, the Ops, element_math.h) is also compiled by the host compiler for
// tests/cuda_emulation, which runs it on the CPU in an emulated grid: the same source, so that what
// the tests check is what nvcc compiles. There (LOOKAHEAD_CUDA_EMULATION) the qualifiers mean
// nothing, and the built-in variables and the block barrier are the emulator's, which sets them for
// the thread it runs.
#pragma once

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#elif defined(LOOKAHEAD_CUDA_EMULATION)
#define __device__
#define __global__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(threads)
#define __grid_constant__

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
};

extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;

// Waits until every thread of the block has arrived; non-zero for all of them if any passed
// non-zero.
int __syncthreads_or(int predicate);
#else
#error "device code is compiled by nvcc, or by the host compiler for tests/cuda_emulation"
#endif
