// The emulated grid: every selected thread of every selected block runs the kernel on its own
// stack (a fiber), block after block. A thread runs until it returns or reaches __syncthreads_or;
// once every thread of the block waits there, all of them resume with the OR of their predicates,
// as on the GPU. Threads never run at the same time, which changes nothing for a kernel whose
// threads exchange no data; what they touch is checked by access_checker.h.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "report.h"

namespace lookahead {
namespace emulation {

// The blocks and threads that run; all of the grid's where empty. Only the index tests, on tables
// too large to walk whole, pick some.
struct Selection {
  std::vector<int> blocks;
  std::vector<int> threads;
};

using ThreadBody = void (*)(const void* parameters);

// Runs body(parameters) as the selected threads of a grid of `grid` blocks of `block_size`
// threads. A thread that returns while others of its block wait at the barrier (or reaches it a
// different number of times: undefined behaviour on a GPU), a launch still running after timeout_s
// and a fault (a guard page, a stack overflow) end the launch as a violation in `report`; the
// grid's counters go there too.
void run_grid(int grid, int block_size, ThreadBody body, const void* parameters,
              const Selection& selection, double timeout_s, Report& report);

// The running thread's own stack, where its locals live: what a GPU keeps in registers and local
// memory, not device memory.
extern uintptr_t running_stack_begin;
extern uintptr_t running_stack_bytes;

// Whether a kernel thread is running (the hooks of the checks run only then).
bool in_kernel();
// The report of the launch being run.
Report& running_report();
// blockIdx.x * blockDim.x + threadIdx.x of the running thread.
int64_t running_thread();
// "block 3 thread 17".
std::string thread_name(int64_t thread);

}  // namespace emulation
}  // namespace lookahead
