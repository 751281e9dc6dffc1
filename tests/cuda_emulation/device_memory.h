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
// CUDA's allocations do) and, for one-byte elements such as flags, ending right at the guard
// pages; a megabyte of them follows it (more than a chunk of any dtype), 64 KB precede it.
at::Tensor guarded_empty(int64_t numel, c10::ScalarType dtype);

// The bytes [*begin, *end) of the allocation whose mapping (guard pages included) holds address;
// false if none does.
bool find_allocation(uintptr_t address, uintptr_t* begin, uintptr_t* end);

// What is at address: "0x...: a guard page after a mapping", "... no device memory".
std::string describe(uintptr_t address);

}  // namespace emulation
}  // namespace lookahead
