// The project's own multi-tensor apply, its device code: one kernel launch visits every element of
// one or more lists of tensors (slow and fast weights; momentum buffers; a list to check), calling
// an Op that holds only the math on the elements at the same position in each list. The table it
// walks is tensor_table.h's; the launch is multi_tensor_apply.cuh's.
//
// 16-byte vector accesses for the bulk of each chunk, a scalar loop for its tail, and a scalar head
// for tensors that start off a vector boundary (a view such as flat[1:] into a packed buffer) when
// every list starts the same number of elements off it: only a few elements lose speed.
//
// No shared memory, no data exchanged between threads and one block barrier (in an Op's finish):
// the kernel runs unchanged in tests/cuda_emulation's emulated grid.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <utility>

#include "device_portability.h"
#include "tensor_table.h"

namespace lookahead {
namespace mta {

// Parameters read with a dynamic index must stay in the constant bank, not be copied to each
// thread's local memory; __grid_constant__ guarantees that.
#if defined(CUDART_VERSION) && CUDART_VERSION >= 11070
#define LOOKAHEAD_GRID_CONSTANT __grid_constant__
#else
#define LOOKAHEAD_GRID_CONSTANT
#endif

constexpr int kBlockSize = 512;
// Vectors per list, thread and loop trip for two lists: independent loads hide latency. Other list
// counts keep about the same bytes in flight (so about the same registers: 96 per thread with
// three lists at 4 vectors each, against 46-64 for two, halved the resident blocks).
constexpr int kVectorsInFlight = 4;

template <int kLists>
constexpr int vectors_in_flight() {
  return kVectorsInFlight * 2 / kLists > 0 ? kVectorsInFlight * 2 / kLists : 1;
}

// The element types of a launch's lists, in order: what a launcher instantiates the kernel with.
template <typename... T>
struct Elements {};

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

}  // namespace mta
}  // namespace lookahead
