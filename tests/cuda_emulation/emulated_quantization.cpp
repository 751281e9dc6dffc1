// quantize_pseudo_gradients_ and dequantize_mean_, as cuda/quantization.cu runs them: validation,
// the real table packing and grid choice, and every thread of every block in the emulated grid.
// Their kernel reads and writes through plain pointers, not Probe elements, so what it touches is
// not recorded; the guard pages around every emulated tensor still stop an access far outside one.
#include <vector>

#include "cuda/quantization_kernel.h"
#include "emulated_ops.h"
#include "op_skeleton.h"

namespace lookahead {
namespace emulation {
namespace {

template <typename Kernel, typename Op>
void run_blockwise_thread(const void* parameters) {
  const auto& p = *static_cast<const Parameters<mta::TensorTable<4>, Op>*>(parameters);
  Kernel::kKernel(p.table, p.op);
}

template <typename Op>
void launch(const at::Tensor& slow, const at::Tensor& fast, const std::vector<FlatItem>& flat,
            const Op& op, const LaunchOptions& options, Report& report) {
  quantization::launch_blockwise(slow.scalar_type(), fast.scalar_type(), op,
                                 [&](auto kernel, const Op& chosen) {
    mta::for_each_table<4>(flat, [&](const mta::TensorTable<4>& table) {
      const int grid = mta::grid_size(table, options.max_grid);
      report.grids.push_back(grid);
      report.table_counts.push_back(table.count);
      report.add("launches", 1);
      report.max("parameter_bytes", mta::parameter_bytes<4, Op>());
      const Parameters<mta::TensorTable<4>, Op> parameters{table, chosen};
      run_grid(grid, quantization::kThreads, &run_blockwise_thread<decltype(kernel), Op>,
               &parameters, options.selection, options.timeout_s, report);
    });
  });
}

}  // namespace

Report emulate_quantize(const Tensors& slow, const Tensors& fast, const at::Tensor& payload,
                        const at::Tensor& scales, const LaunchOptions& options) {
  Report report;
  run<Op::quantize_pseudo_gradients_>([&](const std::vector<FlatItem>& flat) {
    launch(slow[0], fast[0], flat, quantization::QuantizeOp{}, options, report);
  }, slow, fast, payload, scales);
  return report;
}

Report emulate_dequantize_mean(const Tensors& slow, const Tensors& out, const at::Tensor& payloads,
                               const at::Tensor& scales, const LaunchOptions& options) {
  Report report;
  run<Op::dequantize_mean_>([&](const std::vector<FlatItem>& flat) {
    const quantization::DequantizeMeanOp op{payloads.size(1), scales.size(1),
                                            static_cast<int>(payloads.size(0))};
    launch(slow[0], out[0], flat, op, options, report);
  }, slow, out, payloads, scales);
  return report;
}

}  // namespace emulation
}  // namespace lookahead
