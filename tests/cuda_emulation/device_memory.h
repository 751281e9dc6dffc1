// The emulated device's memory: each tensor in a mapping of its own, between pages that fault when
// touched, so that an access the checks do not see (the Ops' flags are plain bools) still stops the
// launch instead of reading a neighbour.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>

namespace lookahead {
namespace emulation {

// A 1-D CPU tensor of numel elements filled with 0xff bytes (NaN), starting 64-byte aligned (as
// CUDA's allocations do) and, for one-byte elements such as flags, ending right at a guard page.
at::Tensor guarded_empty(int64_t numel, c10::ScalarType dtype);

// Whether address lies in a guarded mapping, its guard pages included.
bool in_device_memory(uintptr_t address);

// What is at address: "0x...: a guard page after a mapping", "... no device memory".
std::string describe(uintptr_t address);

}  // namespace emulation
}  // namespace lookahead
