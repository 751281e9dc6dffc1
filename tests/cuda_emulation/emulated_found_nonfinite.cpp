// found_nonfinite_, as cuda/found_nonfinite.cu runs it.
#include <vector>

#include "cuda/found_nonfinite_op.h"
#include "emulated_ops.h"
#include "op_skeleton.h"

namespace lookahead {
namespace emulation {

Report emulate_found_nonfinite(const Tensors& tensors, const at::Tensor& found,
                               const std::optional<at::Tensor>& due, const LaunchOptions& options) {
  Report report;
  run<Op::found_nonfinite_>([&](const std::vector<FlatItem>& flat) {
    launch_found_nonfinite(tensors[0].scalar_type(), due ? due->data_ptr<bool>() : nullptr,
                           found.data_ptr<bool>(), EmulatedLaunch(flat, options, report));
  }, tensors, found, due);
  return report;
}

}  // namespace emulation
}  // namespace lookahead
