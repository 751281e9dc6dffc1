// The emulation is compiled with -fsanitize=signed-integer-overflow,shift,bounds,
// integer-divide-by-zero but linked without the sanitizer's runtime: these are the handlers the
// compiler calls, and each one found in a kernel thread is a violation of the launch. An int32
// chunk index that overflows, or a table read past its capacity, is silent on a GPU.
#include <cstdint>
#include <string>

#include "emulated_grid.h"
#include "report.h"

namespace lookahead {
namespace emulation {

namespace {

struct SourceLocation {
  const char* file;
  uint32_t line;
  uint32_t column;
};

void found(const SourceLocation& where, const char* what) {
  if (!in_kernel()) return;  // the host's own code
  running_report().violation(thread_name(running_thread()) + ": " + what + " at " +
                                        where.file + ":" + std::to_string(where.line) + ":" +
                                        std::to_string(where.column));
}

}  // namespace
}  // namespace emulation
}  // namespace lookahead

using lookahead::emulation::SourceLocation;

extern "C" {
void __ubsan_handle_add_overflow(const SourceLocation* where, uintptr_t, uintptr_t) {
  lookahead::emulation::found(*where, "signed integer overflow in an addition");
}
void __ubsan_handle_sub_overflow(const SourceLocation* where, uintptr_t, uintptr_t) {
  lookahead::emulation::found(*where, "signed integer overflow in a subtraction");
}
void __ubsan_handle_mul_overflow(const SourceLocation* where, uintptr_t, uintptr_t) {
  lookahead::emulation::found(*where, "signed integer overflow in a multiplication");
}
void __ubsan_handle_negate_overflow(const SourceLocation* where, uintptr_t) {
  lookahead::emulation::found(*where, "signed integer overflow in a negation");
}
void __ubsan_handle_divrem_overflow(const SourceLocation* where, uintptr_t, uintptr_t) {
  lookahead::emulation::found(*where, "a division by zero or overflowing");
}
void __ubsan_handle_shift_out_of_bounds(const SourceLocation* where, uintptr_t, uintptr_t) {
  lookahead::emulation::found(*where, "a shift out of range");
}
void __ubsan_handle_out_of_bounds(const SourceLocation* where, uintptr_t) {
  lookahead::emulation::found(*where, "an array index out of bounds");
}
}
