// The element type the emulation instantiates the real kernel with: a T of the same size and
// alignment whose every load and store goes through access_checker.h first, so that the checks see
// each access the kernel makes without a line of the kernel changing. An access the checks refuse
// (outside the launch's tensors) is not made: a read gives zero, a write is dropped.
//
// Locals (what a GPU keeps in registers) live on the running thread's stack and pass unchecked. A
// vector is a Vec<Probe<T>, N>: its copy is one vector access of the checks, made of element
// accesses as Vec's own copy is.
#pragma once

#include <cstddef>
#include <cstdint>

#include "access_checker.h"
#include "cuda/multi_tensor_kernel.h"
#include "emulated_grid.h"

namespace lookahead {
namespace emulation {

inline bool on_own_stack(const void* p) {
  return reinterpret_cast<uintptr_t>(p) - running_stack_begin < running_stack_bytes;
}

template <typename T>
class Probe {
 public:
  Probe() = default;
  Probe(const Probe& other) { store(other.load()); }
  template <typename U>
  explicit Probe(const U& value) {
    store(static_cast<T>(value));
  }
  Probe& operator=(const Probe& other) {
    store(other.load());
    return *this;
  }
  template <typename U>
  explicit operator U() const {
    return static_cast<U>(load());
  }

 private:
  T load() const {
    if (on_own_stack(this) || device_access(reinterpret_cast<uintptr_t>(this), sizeof(T), false)) {
      return value_;
    }
    return T(0);
  }
  void store(T value) {
    if (on_own_stack(this) || device_access(reinterpret_cast<uintptr_t>(this), sizeof(T), true)) {
      value_ = value;
    }
  }

  T value_;
};

}  // namespace emulation

namespace mta {

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec<emulation::Probe<T>, N> {
  emulation::Probe<T> val[N];

  Vec() = default;
  Vec(const Vec& other) { *this = other; }
  Vec& operator=(const Vec& other) {
    const emulation::VectorAccess access(reinterpret_cast<uintptr_t>(this),
                                         reinterpret_cast<uintptr_t>(&other), sizeof(Vec));
    for (int i = 0; i < N; ++i) val[i] = other.val[i];
    return *this;
  }
};

}  // namespace mta

}  // namespace lookahead
