// What compute-sanitizer's memcheck and racecheck would say of a launch, from every access the
// kernel makes to device memory (probe.h reports each one): an access outside the tensors of the
// launch, reads included; an element touched by two threads; an element written twice, or not
// written (or not read) where the launch must; a vector access off its alignment. Each violation
// names the block, thread, list, flat item and element.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "report.h"

namespace lookahead {
namespace emulation {

// What a launch must do to every element of a list.
enum class Expect {
  kWritten,    // written exactly once (and read at most by its one thread)
  kRead,       // read; written at most once (a restore stores the slow weights back unchanged)
  kReadOnly,   // read, never written
  kUntouched,  // neither (a gate that stays closed)
  kAny,        // written at most once
};

// One tensor of one list of a launch.
struct ExtentSpec {
  uintptr_t begin;
  int64_t numel;
  int element_bytes;
  int list;
  int64_t item;  // its index among the call's flat items
};

// Phantom launches (the index tests' tables of tensors too large to allocate) have addresses that
// are never dereferenced: each access is only recorded (Report::records).
void begin_launch(const std::vector<ExtentSpec>& extents, bool phantom, Report& report);
// Checks every element against `expect` (one per list), and adds the launch's counters.
void end_launch(const std::vector<Expect>& expect);

// An access of `bytes` at `address` by the running thread, outside its own stack: recorded, and
// true when it may be dereferenced (inside one element of a tensor of the launch).
bool device_access(uintptr_t address, size_t bytes, bool write);

// Between construction and destruction the element accesses are one vector load or store of
// `bytes` (from src to dst): its device side must be aligned to `bytes`.
class VectorAccess {
 public:
  VectorAccess(uintptr_t dst, uintptr_t src, size_t bytes);
  ~VectorAccess();
  VectorAccess(const VectorAccess&) = delete;
  VectorAccess& operator=(const VectorAccess&) = delete;
};

}  // namespace emulation
}  // namespace lookahead
