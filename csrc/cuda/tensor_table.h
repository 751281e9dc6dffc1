// The table of tensors one multi-tensor launch covers, and its packing on the host.
//
// The table (addresses, sizes, chunk prefix) goes BY VALUE as a kernel parameter. The alternative,
// copying the table to device memory on every call, breaks CUDA graph capture: the captured graph
// replays the copy from a host buffer that has long been reused. PyTorch added such a copy and had
// to revert it (PR 119764). Parameters are part of the launch itself, so a captured launch replays
// with exactly the table it was captured with, and nothing is allocated here.
//
// The grid is not tied to the table. PyTorch's table maps each block to one (tensor, chunk), so the
// parameter space caps a launch at a few hundred blocks and longer lists are split into many short
// launches, which "led to low sustained occupancy" (PR 119153). Here each block walks chunks in a
// grid-stride loop and finds a chunk's tensor by binary search over a per-tensor prefix of chunk
// counts (multi_tensor_kernel.h). The table then costs 28 bytes per tensor pair (8 more per extra
// list) and none per block: in the 32 KB parameter space of CUDA 12.1+ one launch covers 1167 pairs
// (143 in 4 KB), every parameter of GPT-2 or of a 7B transformer, and the grid is sized to fill the
// GPU once.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "../validation.h"
#include "device_portability.h"

namespace lookahead {
namespace mta {

// Kernel parameter space: 32,764 bytes since CUDA 12.1 (driver R530+, Volta+), 4,096 before.
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010
constexpr size_t kParamBytes = 32764;
#else
constexpr size_t kParamBytes = 4096;
#endif

constexpr int kChunkSize = 65536;  // elements; a multiple of every vector width
// Chunk indices are int32 and the grid-stride step must not overflow: c < total, gridDim <= total.
constexpr int64_t kMaxChunksPerLaunch = INT32_MAX / 2;

// Room kept for the Op and any parameter added after the table.
constexpr size_t kReservedParamBytes = 64;

// One launch's tensors, struct-of-arrays so the binary search touches one dense array; data[l][i]
// is tensor i of list l.
template <int kLists>
struct TensorTable {
  static constexpr int kCapacity = static_cast<int>(
      (kParamBytes - kReservedParamBytes - 2 * sizeof(int32_t)) /
      (kLists * sizeof(void*) + sizeof(int64_t) + sizeof(int32_t)));
  void* data[kLists][kCapacity];
  int64_t numel[kCapacity];
  int32_t first_chunk[kCapacity];  // chunk index where tensor i starts; strictly increasing
  int32_t count;
  int32_t total_chunks;
};

// Bytes of a launch's parameters: the table, then the Op at its alignment.
template <int kLists, typename Op>
constexpr size_t parameter_bytes() {
  constexpr size_t kTable = sizeof(TensorTable<kLists>);
  return (kTable + alignof(Op) - 1) / alignof(Op) * alignof(Op) + sizeof(Op);
}

// The grid of a launch: one block per chunk, up to the blocks that fit on the device at once.
template <int kLists>
int grid_size(const TensorTable<kLists>& table, int max_grid) {
  return std::min(table.total_chunks, max_grid);
}

// Packs the first kLists addresses of each item (all non-empty) into as few tables as fit, and
// calls launch(table) for each.
template <int kLists, typename Launch>
void for_each_table(const std::vector<FlatItem>& items, const Launch& launch) {
  using Table = TensorTable<kLists>;
  Table table;
  table.count = 0;
  table.total_chunks = 0;
  for (const FlatItem& item : items) {
    TORCH_INTERNAL_ASSERT(item.numel > 0);
    const int64_t chunks = (item.numel + kChunkSize - 1) / kChunkSize;
    TORCH_CHECK(chunks <= kMaxChunksPerLaunch, "lookahead_cuda: a tensor of ", item.numel,
                " elements is beyond what one launch indexes");
    if (table.count == Table::kCapacity || table.total_chunks + chunks > kMaxChunksPerLaunch) {
      launch(table);
      table.count = 0;
      table.total_chunks = 0;
    }
    for (int l = 0; l < kLists; ++l) table.data[l][table.count] = item.data[l];
    table.numel[table.count] = item.numel;
    table.first_chunk[table.count] = table.total_chunks;
    table.total_chunks += static_cast<int32_t>(chunks);
    ++table.count;
  }
  if (table.count > 0) launch(table);
}

}  // namespace mta
}  // namespace lookahead
