// Which instructions the CPU kernels' loops may use. The binary is built for baseline x86-64, so it
// loads on any x86-64 CPU; the loops alone are also compiled for AVX2 and FMA (a multiply-add must
// be one instruction, not a libm call, for a loop to stay memory-bound), and those versions run
// where torch itself runs its AVX2 or AVX-512 kernels, which implies the CPU has the instructions.
#pragma once

#include <ATen/Version.h>

namespace lookahead {

#if defined(__x86_64__) || defined(_M_X64)
#define LOOKAHEAD_VECTOR_TARGET __attribute__((target("avx2,fma")))
#else
#define LOOKAHEAD_VECTOR_TARGET
#endif

// Whether the LOOKAHEAD_VECTOR_TARGET loops run here: on every torch capability but DEFAULT (its
// non-vectorised build, for CPUs without AVX2 or when ATEN_CPU_CAPABILITY=default asks for it),
// where torch also rounds a multiply-add twice, as the baseline loops do.
inline bool vector_target_enabled() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool enabled = at::get_cpu_capability() != "DEFAULT";
  return enabled;
#else
  return true;  // the vector units of aarch64, POWER and s390x multiply-add in one rounding
#endif
}

}  // namespace lookahead
