#include "emulated_grid.h"

#include <c10/util/Exception.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#include <array>
#include <cmath>
#include <setjmp.h>
#include <numeric>
#include <sstream>
#include <vector>

#include "cuda/device_portability.h"
#include "device_memory.h"

uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

namespace lookahead {
namespace emulation {

uintptr_t running_stack_begin = 0;
uintptr_t running_stack_bytes = 0;

namespace {

// A thread's frame holds its copy of the kernel's parameters (the table: up to 32 KB) besides the
// kernel's own locals and the checks' calls.
constexpr size_t kStackBytes = 256 << 10;

enum class State { kRunnable, kAtBarrier, kReturned };

struct Fiber {
  ucontext_t context;
  State state;
  int predicate;
  int result;
};

ucontext_t scheduler;
std::vector<Fiber> fibers;
Fiber* running = nullptr;
Report* report_of_launch = nullptr;
ThreadBody running_body = nullptr;
const void* running_parameters = nullptr;

sigjmp_buf escape;
volatile sig_atomic_t trapped_signal = 0;
void* volatile fault_address = nullptr;

size_t page_bytes() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }

// One stack per thread of a block, each above a guard page, reused by every block and launch.
char* stack_of(int thread) {
  static char* stacks = nullptr;
  static int count = 0;
  const size_t slot = kStackBytes + page_bytes();
  if (thread >= count) {
    TORCH_CHECK(stacks == nullptr, "the emulated blocks changed size");
    count = static_cast<int>(fibers.size());
    void* memory = mmap(nullptr, slot * count, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TORCH_CHECK(memory != MAP_FAILED, "cannot map the emulated threads' stacks");
    stacks = static_cast<char*>(memory);
    for (int t = 0; t < count; ++t) mprotect(stacks + slot * t, page_bytes(), PROT_NONE);
  }
  return stacks + slot * thread + page_bytes();
}

void thread_main() {
  running_body(running_parameters);
  running->state = State::kReturned;
}  // uc_link: back to the scheduler

void resume(int thread) {
  threadIdx = {static_cast<unsigned>(thread), 0, 0};
  running = &fibers[thread];
  running_stack_begin = reinterpret_cast<uintptr_t>(stack_of(thread));
  running_stack_bytes = kStackBytes;
  swapcontext(&scheduler, &running->context);
  running = nullptr;
}

void start(int thread) {
  Fiber& fiber = fibers[thread];
  getcontext(&fiber.context);
  fiber.context.uc_stack.ss_sp = stack_of(thread);
  fiber.context.uc_stack.ss_size = kStackBytes;
  fiber.context.uc_link = &scheduler;
  makecontext(&fiber.context, &thread_main, 0);
  fiber.state = State::kRunnable;
}

// Runs one block to its end; false if its threads broke the barrier's rules.
bool run_block(const std::vector<int>& threads, Report& report) {
  for (int t : threads) start(t);
  for (int barrier = 0;; ++barrier) {
    for (int t : threads) {
      if (fibers[t].state == State::kRunnable) resume(t);
    }
    int waiting = -1;
    int returned = -1;
    for (int t : threads) {
      if (fibers[t].state == State::kAtBarrier && waiting < 0) waiting = t;
      if (fibers[t].state == State::kReturned && returned < 0) returned = t;
    }
    if (waiting < 0) return true;
    const int64_t block = static_cast<int64_t>(blockIdx.x) * blockDim.x;
    if (returned >= 0) {
      report.violation(thread_name(block + returned) + " returned while " +
                       thread_name(block + waiting) + " waits at __syncthreads_or #" +
                       std::to_string(barrier + 1) + " (every thread of a block must reach it)");
      return false;
    }
    int any = 0;
    for (int t : threads) any |= fibers[t].predicate != 0;
    for (int t : threads) {
      fibers[t].result = any;
      fibers[t].state = State::kRunnable;
    }
    report.add("barriers", 1);
    report.add("barrier_ors", any);
  }
}

void trap(int signal, siginfo_t* info, void*) {
  trapped_signal = signal;
  fault_address = info->si_addr;
  siglongjmp(escape, 1);
}

// For the launch's duration: faults and the watchdog's signal end it through `escape`, on a stack
// of their own (a thread's may be what overflowed). The timer signals this thread only: torch's
// other threads must never run the handler.
class Traps {
 public:
  explicit Traps(double timeout_s) {
    alternate_.ss_sp = alternate_stack_.data();
    alternate_.ss_size = alternate_stack_.size();
    alternate_.ss_flags = 0;
    sigaltstack(&alternate_, &old_alternate_);
    struct sigaction action = {};
    action.sa_sigaction = &trap;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    for (size_t i = 0; i < kSignals.size(); ++i) sigaction(kSignals[i], &action, &old_[i]);
    sigevent event = {};
    event.sigev_notify = SIGEV_THREAD_ID;
    event.sigev_signo = SIGALRM;
    event._sigev_un._tid = static_cast<pid_t>(syscall(SYS_gettid));
    TORCH_CHECK(timer_create(CLOCK_MONOTONIC, &event, &timer_) == 0, "no watchdog timer");
    itimerspec when = {};
    when.it_value.tv_sec = static_cast<time_t>(timeout_s);
    when.it_value.tv_nsec = static_cast<long>((timeout_s - std::floor(timeout_s)) * 1e9);
    timer_settime(timer_, 0, &when, nullptr);
  }
  ~Traps() {
    timer_delete(timer_);
    sigset_t alarm;
    sigset_t old_mask;
    sigemptyset(&alarm);
    sigaddset(&alarm, SIGALRM);
    pthread_sigmask(SIG_BLOCK, &alarm, &old_mask);
    const timespec now = {0, 0};
    sigtimedwait(&alarm, nullptr, &now);  // a signal sent just before the timer went
    for (size_t i = 0; i < kSignals.size(); ++i) sigaction(kSignals[i], &old_[i], nullptr);
    pthread_sigmask(SIG_SETMASK, &old_mask, nullptr);
    sigaltstack(&old_alternate_, nullptr);
  }
  Traps(const Traps&) = delete;
  Traps& operator=(const Traps&) = delete;

 private:
  static constexpr std::array<int, 3> kSignals = {SIGSEGV, SIGBUS, SIGALRM};
  std::array<char, 64 << 10> alternate_stack_;
  stack_t alternate_;
  stack_t old_alternate_;
  std::array<struct sigaction, kSignals.size()> old_;
  timer_t timer_;
};

std::vector<int> all(int count) {
  std::vector<int> indices(count);
  std::iota(indices.begin(), indices.end(), 0);
  return indices;
}

void run_blocks(const std::vector<int>& blocks, const std::vector<int>& threads, Report& report) {
  for (int b : blocks) {
    blockIdx = {static_cast<unsigned>(b), 0, 0};
    report.add("blocks", 1);
    report.add("threads", static_cast<int64_t>(threads.size()));
    if (!run_block(threads, report)) return;
  }
}

}  // namespace

bool in_kernel() { return running != nullptr; }

Report& running_report() { return *report_of_launch; }

int64_t running_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

std::string thread_name(int64_t thread) {
  return "block " + std::to_string(thread / blockDim.x) + " thread " +
         std::to_string(thread % blockDim.x);
}

void run_grid(int grid, int block_size, ThreadBody body, const void* parameters,
              const Selection& selection, double timeout_s, Report& report) {
  TORCH_CHECK(grid > 0 && block_size > 0, "an empty grid");
  gridDim = {static_cast<unsigned>(grid), 1, 1};
  blockDim = {static_cast<unsigned>(block_size), 1, 1};
  if (fibers.size() < static_cast<size_t>(block_size)) fibers.resize(block_size);
  report_of_launch = &report;
  running_body = body;
  running_parameters = parameters;
  const std::vector<int> blocks = selection.blocks.empty() ? all(grid) : selection.blocks;
  const std::vector<int> threads = selection.threads.empty() ? all(block_size) : selection.threads;
  const Traps traps(timeout_s);
  if (sigsetjmp(escape, 1) == 0) {
    run_blocks(blocks, threads, report);
  } else {
    const std::string who = thread_name(running_thread());
    running = nullptr;
    if (trapped_signal == SIGALRM) {
      std::ostringstream text;
      text << "the launch was still running after " << timeout_s << " s, in " << who
           << " (a loop that never ends?)";
      report.violation(text.str());
    } else {
      report.violation(who + " faulted at " + describe(reinterpret_cast<uintptr_t>(fault_address)));
    }
  }
}

}  // namespace emulation
}  // namespace lookahead

int __syncthreads_or(int predicate) {
  using lookahead::emulation::running;
  TORCH_CHECK(running != nullptr, "__syncthreads_or outside an emulated kernel");
  auto* self = running;
  self->predicate = predicate;
  self->state = lookahead::emulation::State::kAtBarrier;
  swapcontext(&self->context, &lookahead::emulation::scheduler);
  return self->result;
}
