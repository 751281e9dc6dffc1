// A memory-bandwidth yardstick for the benchmark: the fastest plain streaming copy on the CPU.
#pragma once

#include <ATen/core/Tensor.h>

namespace lookahead {

// Exchanges the contents of two contiguous float32 CPU tensors of equal size, in place, over
// torch's thread pool. A copy into a separate buffer first reads every destination line it writes
// (read-for-ownership), so it streams slower than a kernel that rewrites what it has just read;
// a swap moves exactly the traffic of a Lookahead sync (two arrays read, two written back) with
// no arithmetic, which makes it the floor to compare against.
void stream_swap_cpu(const at::Tensor& a, const at::Tensor& b);

}  // namespace lookahead
