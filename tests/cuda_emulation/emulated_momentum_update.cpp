// lookahead_momentum_update_ and its gated form, as cuda/lookahead_update.cu runs them.
#include <vector>

#include "cuda/sync_ops.h"
#include "emulated_ops.h"
#include "op_skeleton.h"

namespace lookahead {
namespace emulation {

Report emulate_momentum_update(const Tensors& slow, const Tensors& fast, const Tensors& momentum,
                               double lr, double mu, bool nesterov,
                               const std::optional<at::Tensor>& due,
                               const std::optional<at::Tensor>& restore,
                               const LaunchOptions& options) {
  Report report;
  const auto flat_kernel = [&](Gate gate) {
    return [&, gate](const std::vector<FlatItem>& flat) {
      launch_momentum_sync(slow[0].scalar_type(), fast[0].scalar_type(), lr, mu, nesterov, gate,
                           EmulatedLaunch(flat, options, report));
    };
  };
  if (due) {
    run<Op::lookahead_momentum_update_if_>(flat_kernel(gate_of(*due, restore)), slow, fast,
                                           momentum, lr, mu, nesterov, *due, restore);
  } else {
    run<Op::lookahead_momentum_update_>(flat_kernel(Gate{nullptr, nullptr}), slow, fast, momentum,
                                        lr, mu, nesterov);
  }
  return report;
}

}  // namespace emulation
}  // namespace lookahead
