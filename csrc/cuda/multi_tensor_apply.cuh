// The project's own multi-tensor apply: one kernel launch visits every element of one or more lists
// of tensors (slow and fast weights; momentum buffers; a list to check), calling an Op that holds
// only the math on the elements at the same position in each list.
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
//   counts. The table then costs 28 bytes per tensor pair (8 more per extra list) and none per
//   block: in the 32 KB parameter space of CUDA 12.1+ one launch covers 1167 pairs (143 in 4 KB),
//   every parameter of GPT-2 or of a 7B transformer, and the grid is sized to fill the GPU once.
// - 16-byte vector accesses for the bulk of each chunk, a scalar loop for its tail, and a scalar
//   head for tensors that start off a vector boundary (a view such as flat[1:] into a packed buffer)
//   when every list starts the same number of elements off it: only a few elements lose speed.
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
#include <utility>
#include <vector>

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
// Vectors per list, thread and loop trip for two lists: independent loads hide latency. Other list
// counts keep about the same bytes in flight (so about the same registers: 96 per thread with
// three lists at 4 vectors each, against 46-64 for two, halved the resident blocks).
constexpr int kVectorsInFlight = 4;

template <int kLists>
constexpr int vectors_in_flight() {
  return kVectorsInFlight * 2 / kLists > 0 ? kVectorsInFlight * 2 / kLists : 1;
}
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

// What an Op provides besides operator()(T&... elements), the math on one element of each list.
struct ElementwiseOp {
  // Whether the kernel stores the elements back (false: the lists are only read).
  static constexpr bool kWrites = true;
  // Runs once per thread before any element is touched: reads whatever the Op takes from device
  // memory (a flag decided by earlier kernels) and returns false when there is nothing to do, so a
  // gated launch costs one read per thread instead of a pass over memory. Must be uniform over the
  // grid: whole blocks leave.
  __device__ __forceinline__ bool prepare() { return true; }
  // Runs once per thread after the last chunk, reached by every thread of a block that prepared.
  __device__ __forceinline__ void finish() {}
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T val[N];
};

// Elements per vector access: 16 bytes of the widest element type.
template <typename... T>
constexpr int vector_width() {
  return 16 / static_cast<int>(std::max({sizeof(T)...}));
}

// One vector of each list, loaded, updated element by element, and stored together.
template <int kWidth, typename... T>
struct Vectors;

template <int kWidth>
struct Vectors<kWidth> {
  __device__ __forceinline__ void load(int) {}
  __device__ __forceinline__ void store(int) const {}
  template <typename Op, typename... E>
  __device__ __forceinline__ void apply(Op& op, int, E&... elements) {
    op(elements...);
  }
};

template <int kWidth, typename T, typename... Rest>
struct Vectors<kWidth, T, Rest...> {
  Vec<T, kWidth> head;
  Vectors<kWidth, Rest...> rest;

  __device__ __forceinline__ void load(int v, const T* data, const Rest*... others) {
    head = reinterpret_cast<const Vec<T, kWidth>*>(data)[v];
    rest.load(v, others...);
  }
  __device__ __forceinline__ void store(int v, T* data, Rest*... others) const {
    reinterpret_cast<Vec<T, kWidth>*>(data)[v] = head;
    rest.store(v, others...);
  }
  template <typename Op, typename... E>
  __device__ __forceinline__ void apply(Op& op, int j, E&... elements) {
    rest.apply(op, j, elements..., head.val[j]);
  }
};

// Elements from p to its next kWidth-element boundary.
template <int kWidth, typename T>
__device__ __forceinline__ int elements_off_boundary(const T* p) {
  const auto index = static_cast<int>((reinterpret_cast<uintptr_t>(p) / sizeof(T)) % kWidth);
  return (kWidth - index) % kWidth;
}

// The scalar head before every list is on a vector boundary; -1 if the lists are not equally far
// from theirs (then no element can move in vectors), or not even element-aligned.
template <int kWidth, typename T, typename... Rest>
__device__ __forceinline__ int common_head(const T* first, const Rest*... rest) {
  const bool element_aligned = ((reinterpret_cast<uintptr_t>(first) % sizeof(T) == 0) && ... &&
                                (reinterpret_cast<uintptr_t>(rest) % sizeof(Rest) == 0));
  const int head = elements_off_boundary<kWidth>(first);
  const bool same = ((elements_off_boundary<kWidth>(rest) == head) && ...);
  return element_aligned && same ? head : -1;
}

// n elements (n <= kChunkSize) of one chunk of each list; offsets within a chunk fit in int. A
// chunk starts kChunkSize elements (a multiple of kWidth) after the previous one, so the head is
// the same for every chunk of a tensor and the branches below are uniform over the block.
template <typename Op, typename... T>
__device__ __forceinline__ void apply_chunk(Op& op, int n, T* __restrict__... data) {
  constexpr int kWidth = vector_width<T...>();
  constexpr int kInFlight = vectors_in_flight<static_cast<int>(sizeof...(T))>();
  int scalar_begin = 0;
  const int head = common_head<kWidth>(data...);
  if (head >= 0 && head < n) {
    for (int i = threadIdx.x; i < head; i += kBlockSize) op(data[i]...);
    const int vectors = (n - head) / kWidth;
    for (int base = threadIdx.x; base < vectors; base += kBlockSize * kInFlight) {
      Vectors<kWidth, T...> v[kInFlight];
      // A load past the end re-reads this thread's first vector instead of being skipped: with
      // unconditional loads all of them issue before the first is used, where predicated ones made
      // the compiler unpack each vector as it landed (stalling the loads behind it; 96 registers
      // instead of 46 for bfloat16). Its own vector, so no other thread's store is raced.
#pragma unroll
      for (int k = 0; k < kInFlight; ++k) {
        const int index = base + k * kBlockSize < vectors ? base + k * kBlockSize : base;
        v[k].load(index, (data + head)...);
      }
#pragma unroll
      for (int k = 0; k < kInFlight; ++k) {
        const int index = base + k * kBlockSize;
        if (index < vectors) {
#pragma unroll
          for (int j = 0; j < kWidth; ++j) v[k].apply(op, j);
          if constexpr (Op::kWrites) v[k].store(index, (data + head)...);
        }
      }
    }
    scalar_begin = head + vectors * kWidth;
  }
  for (int i = scalar_begin + threadIdx.x; i < n; i += kBlockSize) op(data[i]...);
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

template <typename Op, typename... T, size_t... L>
__device__ __forceinline__ void apply_table_chunk(Op& op, const TensorTable<sizeof...(T)>& table,
                                                  int t, int64_t begin, int n,
                                                  std::index_sequence<L...>) {
  apply_chunk(op, n, (static_cast<T*>(table.data[L][t]) + begin)...);
}

// Each block walks its chunks in a grid-stride loop: n elements (at most kChunkSize) of tensor t
// starting at element begin.
template <typename Op, typename... T>
__global__ void __launch_bounds__(kBlockSize)
    elementwise_kernel(const LOOKAHEAD_GRID_CONSTANT TensorTable<sizeof...(T)> table, const Op op) {
  Op prepared = op;
  if (!prepared.prepare()) return;
  int t = 0;  // chunks only grow along the loop, so each search starts from the last tensor found
  for (int c = blockIdx.x; c < table.total_chunks; c += gridDim.x) {
    t = find_tensor(table, c, t);
    const int64_t begin = static_cast<int64_t>(c - table.first_chunk[t]) * kChunkSize;
    const int64_t left = table.numel[t] - begin;
    apply_table_chunk<Op, T...>(prepared, table, t, begin,
                                left < kChunkSize ? static_cast<int>(left) : kChunkSize,
                                std::index_sequence_for<T...>{});
  }
  prepared.finish();
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
    const std::array<void*, kLists> pointers = addresses(item);
    for (int l = 0; l < kLists; ++l) table.data[l][table.count] = pointers[l];
    table.numel[table.count] = item.numel;
    table.first_chunk[table.count] = table.total_chunks;
    table.total_chunks += static_cast<int32_t>(chunks);
    ++table.count;
  }
  if (table.count > 0) launch(table);
}

// Calls op(list0[i], list1[i], ...) for every element of every item (elements of types T...), on
// `stream`, in as few launches as the tables allow. Items must be non-empty. Nothing is allocated
// or copied to the device, so the call can be captured in a CUDA graph.
template <typename... T, typename Op, typename Item, typename Addresses>
void apply(const std::vector<Item>& items, const Addresses& addresses, const Op& op,
           cudaStream_t stream, int device) {
  constexpr int kLists = sizeof...(T);
  using Table = TensorTable<kLists>;
  constexpr size_t kOpOffset = (sizeof(Table) + alignof(Op) - 1) / alignof(Op) * alignof(Op);
  static_assert(sizeof(Table) + kReservedParamBytes <= kParamBytes &&
                    kOpOffset + sizeof(Op) <= kParamBytes,
                "the table and the Op together exceed the kernel parameter space");
  const int max_grid = resident_blocks<elementwise_kernel<Op, T...>>(device);
  for_each_table<kLists>(items, addresses, [&](const Table& table) {
    const int grid = std::min(table.total_chunks, max_grid);
    elementwise_kernel<Op, T...><<<grid, kBlockSize, 0, stream>>>(table, op);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace mta
}  // namespace lookahead
