// The project's own multi-tensor apply: one kernel launch visits every element of a whole list of
// tensors (or of (slow, fast) tensor pairs, updated in place by an Op that holds only the math).
//
// Why it looks like this:
// - The table of tensors (addresses, sizes, chunk prefix) goes BY VALUE as a kernel parameter. The
//   alternative, copying the table to device memory on every call, breaks CUDA graph capture: the
//   captured graph replays the copy from a host buffer that has long been reused. PyTorch added such
//   a copy and had to revert it (PR 119764). Parameters are part of the launch itself, so a captured
//   launch replays with exactly the table it was captured with, and nothing is allocated here.
// - The grid is not tied to the table. PyTorch's table maps each block to one (tensor, chunk), so the
//   parameter space caps a launch at a few hundred blocks and longer lists are split into many short
//   launches, which "led to low sustained occupancy" (PR 119153). Here each block walks chunks in a
//   grid-stride loop and finds a chunk's tensor by binary search over a per-tensor prefix of chunk
//   counts. The table then costs 28 bytes per tensor pair and none per block: in the 32 KB parameter
//   space of CUDA 12.1+ one launch covers 1167 pairs (143 in 4 KB), every parameter of GPT-2 or of
//   a 7B transformer, and the grid is sized to fill the GPU once.
// - 16-byte vector accesses for the aligned bulk of each chunk and a scalar loop for its tail: a
//   tensor whose size is not a multiple of the vector width loses speed on a few elements only.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAMacros.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "../op_contract.h"

namespace lookahead {
namespace mta {

// Kernel parameter space: 32,764 bytes since CUDA 12.1 (driver R530+, Volta+), 4,096 before.
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010
constexpr size_t kParamBytes = 32764;
#else
constexpr size_t kParamBytes = 4096;
#endif

// Parameters read with a dynamic index must stay in the constant bank, not be copied to each
// thread's local memory; __grid_constant__ guarantees that.
#if defined(CUDART_VERSION) && CUDART_VERSION >= 11070
#define LOOKAHEAD_GRID_CONSTANT __grid_constant__
#else
#define LOOKAHEAD_GRID_CONSTANT
#endif

constexpr int kBlockSize = 512;
constexpr int kChunkSize = 65536;  // elements; a multiple of every vector width
constexpr int kVectorsInFlight = 4;  // per thread and loop trip: independent loads hide latency
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
static_assert(sizeof(TensorTable<1>) + kReservedParamBytes <= kParamBytes &&
                  sizeof(TensorTable<2>) + kReservedParamBytes <= kParamBytes,
              "TensorTable no longer fits the kernel parameter space");

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T val[N];
};

template <typename S, typename F>
constexpr int vector_width() {
  return 16 / static_cast<int>(sizeof(S) > sizeof(F) ? sizeof(S) : sizeof(F));
}

template <typename T>
__device__ __forceinline__ bool is_aligned(const T* p, int bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// The last tensor in [lo, count) whose first chunk is <= c. Every thread of the block searches the
// same entries, so each read is a broadcast from the constant cache.
template <int kLists>
__device__ __forceinline__ int find_tensor(const TensorTable<kLists>& table, int c, int lo) {
  int hi = table.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table.first_chunk[mid] <= c) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// n elements (n <= kChunkSize) of one chunk; offsets within a chunk fit in int.
template <typename S, typename F, typename Op>
__device__ __forceinline__ void apply_chunk(S* __restrict__ slow, F* __restrict__ fast, int n,
                                            const Op& op) {
  constexpr int kWidth = vector_width<S, F>();
  using SVec = Vec<S, kWidth>;
  using FVec = Vec<F, kWidth>;
  int scalar_begin = 0;
  // The chunk start keeps the tensor's alignment (kChunkSize is a multiple of kWidth), so this test
  // is uniform over the block and a misaligned view simply takes the scalar loop.
  if (is_aligned(slow, sizeof(SVec)) && is_aligned(fast, sizeof(FVec))) {
    const int vectors = n / kWidth;
    auto* slow_vec = reinterpret_cast<SVec*>(slow);
    auto* fast_vec = reinterpret_cast<FVec*>(fast);
    for (int base = threadIdx.x; base < vectors; base += kBlockSize * kVectorsInFlight) {
      SVec s[kVectorsInFlight];
      FVec f[kVectorsInFlight];
      // A load past the end re-reads this thread's first vector instead of being skipped: with
      // unconditional loads all of them issue before the first is used, where predicated ones made
      // the compiler unpack each vector as it landed (stalling the loads behind it; 96 registers
      // instead of 46 for bfloat16). Its own vector, so no other thread's store is raced.
#pragma unroll
      for (int k = 0; k < kVectorsInFlight; ++k) {
        const int v = base + k * kBlockSize < vectors ? base + k * kBlockSize : base;
        s[k] = slow_vec[v];
        f[k] = fast_vec[v];
      }
#pragma unroll
      for (int k = 0; k < kVectorsInFlight; ++k) {
        const int v = base + k * kBlockSize;
        if (v < vectors) {
#pragma unroll
          for (int j = 0; j < kWidth; ++j) op(s[k].val[j], f[k].val[j]);
          slow_vec[v] = s[k];
          fast_vec[v] = f[k];
        }
      }
    }
    scalar_begin = vectors * kWidth;
  }
  for (int i = scalar_begin + threadIdx.x; i < n; i += kBlockSize) {
    S s = slow[i];
    F f = fast[i];
    op(s, f);
    slow[i] = s;
    fast[i] = f;
  }
}

// Calls visit(t, begin, n) for each chunk of the table that this block owns: n elements (at most
// kChunkSize) of tensor t starting at element begin.
template <int kLists, typename Visit>
__device__ __forceinline__ void for_each_chunk(const TensorTable<kLists>& table, const Visit& visit) {
  int t = 0;  // chunks only grow along the loop, so each search starts from the last tensor found
  for (int c = blockIdx.x; c < table.total_chunks; c += gridDim.x) {
    t = find_tensor(table, c, t);
    const int64_t begin = static_cast<int64_t>(c - table.first_chunk[t]) * kChunkSize;
    const int64_t left = table.numel[t] - begin;
    visit(t, begin, left < kChunkSize ? static_cast<int>(left) : kChunkSize);
  }
}

// Op::prepare() runs once per thread before any element is touched: it reads whatever the Op takes
// from device memory (a flag decided by earlier kernels) and returns false when there is nothing
// to do, so a gated launch costs one read per thread instead of a pass over memory.
template <typename S, typename F, typename Op>
__global__ void __launch_bounds__(kBlockSize)
    pairwise_kernel(const LOOKAHEAD_GRID_CONSTANT TensorTable<2> table, const Op op) {
  Op prepared = op;
  if (!prepared.prepare()) return;
  for_each_chunk(table, [&](int t, int64_t begin, int n) {
    apply_chunk(static_cast<S*>(table.data[0][t]) + begin,
                static_cast<F*>(table.data[1][t]) + begin, n, prepared);
  });
}

// Blocks of kKernel that fit on the device at once: the grid that keeps it full without a second
// wave. Cached per device and kernel; concurrent first calls compute the same value, so relaxed
// atomics suffice.
template <auto kKernel>
int resident_blocks(int device) {
  static std::atomic<int> cache[C10_COMPILE_TIME_MAX_GPUS];
  TORCH_INTERNAL_ASSERT(device >= 0 && device < C10_COMPILE_TIME_MAX_GPUS);
  int blocks = cache[device].load(std::memory_order_relaxed);
  if (blocks == 0) {
    int sms = 0;
    int per_sm = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &per_sm, kKernel, kBlockSize, /*dynamicSMemSize=*/0));
    blocks = std::max(1, sms * per_sm);
    cache[device].store(blocks, std::memory_order_relaxed);
  }
  return blocks;
}

// CUDA 12.x runtimes also run on older 12.0 drivers, which reject parameters over 4 KB; fail with a
// message instead of a bare launch error. From CUDA 13 the minimum driver is far newer.
inline void check_driver_takes_large_params() {
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010 && CUDART_VERSION < 13000
  static const int driver = [] {
    int version = 0;
    C10_CUDA_CHECK(cudaDriverGetVersion(&version));
    return version;
  }();
  TORCH_CHECK(driver >= 12010, "lookahead_cuda was built with CUDA ", CUDART_VERSION,
              ", whose kernels need a driver for CUDA 12.1 or newer; this driver supports ", driver);
#endif
}

// Packs items (anything with a non-zero `numel`; addresses(item) gives its kLists data pointers)
// into as few tables as fit, and calls launch(table) for each.
template <int kLists, typename Item, typename Addresses, typename Launch>
void for_each_table(const std::vector<Item>& items, const Addresses& addresses,
                    const Launch& launch) {
  using Table = TensorTable<kLists>;
  check_driver_takes_large_params();
  Table table;
  table.count = 0;
  table.total_chunks = 0;
  for (const Item& item : items) {
    TORCH_INTERNAL_ASSERT(item.numel > 0);
    const int64_t chunks = (item.numel + kChunkSize - 1) / kChunkSize;
    TORCH_CHECK(chunks <= kMaxChunksPerLaunch, "lookahead_cuda: a tensor of ", item.numel,
                " elements is beyond what one launch indexes");
    if (table.count == Table::kCapacity || table.total_chunks + chunks > kMaxChunksPerLaunch) {
      launch(table);
      table.count = 0;
      table.total_chunks = 0;
    }
    const auto pointers = addresses(item);
    for (int l = 0; l < kLists; ++l) table.data[l][table.count] = pointers[l];
    table.numel[table.count] = item.numel;
    table.first_chunk[table.count] = table.total_chunks;
    table.total_chunks += static_cast<int32_t>(chunks);
    ++table.count;
  }
  if (table.count > 0) launch(table);
}

// Applies op(slow_element, fast_element) to every element of every pair, on `stream`, in
// ceil(pairs / TensorTable<2>::kCapacity) launches. Pairs must be non-empty. Nothing is allocated or
// copied to the device, so the call can be captured in a CUDA graph.
template <typename S, typename F, typename Op>
void apply_pairwise(const std::vector<FlatPair>& pairs, const Op& op, cudaStream_t stream,
                    int device) {
  constexpr size_t kOpOffset =
      (sizeof(TensorTable<2>) + alignof(Op) - 1) / alignof(Op) * alignof(Op);
  static_assert(kOpOffset + sizeof(Op) <= kParamBytes,
                "the table and the Op together exceed the kernel parameter space");
  const int max_grid = resident_blocks<pairwise_kernel<S, F, Op>>(device);
  for_each_table<2>(
      pairs, [](const FlatPair& pair) { return std::array<void*, 2>{pair.slow, pair.fast}; },
      [&](const TensorTable<2>& table) {
        const int grid = std::min(table.total_chunks, max_grid);
        pairwise_kernel<S, F><<<grid, kBlockSize, 0, stream>>>(table, op);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

}  // namespace mta
}  // namespace lookahead
