// Ops that break the kernel's rules on purpose, one per kind of violation, run through the real
// kernel: the tests of the checks themselves (a check that cannot fail checks nothing).
#include <c10/util/Exception.h>

#include <string>
#include <vector>

#include "cuda/multi_tensor_kernel.h"
#include "emulated_ops.h"
#include "op_skeleton.h"
#include "probe.h"

namespace lookahead {
namespace emulation {
namespace {

enum class Fault {
  kUnwritten,
  kShared,
  kOutOfBounds,
  kMisalignedVector,
  kDivergentBarrier,
  kHang,
  kFault
};

Fault fault_named(const std::string& name) {
  if (name == "unwritten") return Fault::kUnwritten;
  if (name == "shared") return Fault::kShared;
  if (name == "out_of_bounds") return Fault::kOutOfBounds;
  if (name == "misaligned_vector") return Fault::kMisalignedVector;
  if (name == "divergent_barrier") return Fault::kDivergentBarrier;
  if (name == "hang") return Fault::kHang;
  if (name == "fault") return Fault::kFault;
  TORCH_CHECK(false, "no fault named ", name);
}

struct FaultyOp : mta::ElementwiseOp {
  static constexpr bool kWrites = false;  // so "unwritten": the launch writes nothing
  Fault fault;
  Probe<float>* data;  // the first tensor
  int64_t numel;
  const volatile bool* flag;

  bool first_thread() const { return blockIdx.x == 0 && threadIdx.x == 0; }

  bool prepare() {
    if (fault == Fault::kHang && blockIdx.x == 0 && threadIdx.x == 5) {
      while (!*flag) {
      }
    }
    return true;
  }

  template <typename T>
  void operator()(T&) {}

  void finish() {
    switch (fault) {
      case Fault::kShared:
        data[0] = data[1];
        break;
      case Fault::kOutOfBounds:
        if (first_thread()) static_cast<void>(static_cast<float>(data[numel]));
        break;
      case Fault::kMisalignedVector:
        if (first_thread()) {
          mta::Vec<Probe<float>, 4> v;
          v = *reinterpret_cast<const mta::Vec<Probe<float>, 4>*>(data + 1);
        }
        break;
      case Fault::kDivergentBarrier:
        if (threadIdx.x == 0) __syncthreads_or(1);
        break;
      case Fault::kFault:
        if (first_thread()) static_cast<void>(flag[1]);
        break;
      default:
        break;
    }
  }
};

}  // namespace

Report emulate_faulty(const std::string& fault, const Tensors& tensors, const at::Tensor& flag,
                      const LaunchOptions& options) {
  Report report;
  TORCH_CHECK(tensors[0].scalar_type() == c10::kFloat && !flag.item<bool>(), "float32, flag false");
  run<Op::found_nonfinite_>([&](const std::vector<FlatItem>& flat) {
    const FaultyOp op{{},
                      fault_named(fault),
                      static_cast<Probe<float>*>(flat[0].data[0]),
                      flat[0].numel,
                      flag.data_ptr<bool>()};
    EmulatedLaunch(flat, options, report)(mta::Elements<float>{}, op);
  }, tensors, flag, std::nullopt);
  return report;
}

}  // namespace emulation
}  // namespace lookahead
