// One parallel region over every tensor of a call, shared by the CPU kernels.
//
// ATen's foreach ops and fused optimizers fork and join the thread pool once per tensor, so a model
// with thousands of small parameters pays that start-up thousands of times. Here the flat tensors
// form one index space (prefix sums of their sizes) that at::parallel_for splits once; each thread
// walks the tensors its range overlaps.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace lookahead {

// Elements per task: large enough that a task's start-up is noise next to streaming its memory.
constexpr int64_t kGrainSize = 32768;

// Calls loop(t, offset, n) for consecutive runs of n elements of items[t] starting at offset, so
// that every element of every item (anything with a `numel`) is visited once, by one thread.
template <typename Item, typename Loop>
void parallel_over(const std::vector<Item>& items, const Loop& loop) {
  std::vector<int64_t> begin_of(items.size() + 1, 0);
  for (size_t i = 0; i < items.size(); ++i) begin_of[i + 1] = begin_of[i] + items[i].numel;
  at::parallel_for(0, begin_of.back(), kGrainSize, [&](int64_t begin, int64_t end) {
    size_t t = std::upper_bound(begin_of.begin(), begin_of.end(), begin) - begin_of.begin() - 1;
    while (begin < end) {
      const int64_t stop = std::min(end, begin_of[t + 1]);
      loop(t, begin - begin_of[t], stop - begin);
      begin = stop;
      ++t;
    }
  });
}

}  // namespace lookahead
