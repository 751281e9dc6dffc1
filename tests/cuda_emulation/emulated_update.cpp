// lookahead_update_ and its gated form, as cuda/lookahead_update.cu runs them, and the phantom
// launches of its float32 kernel.
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <vector>

#include "cuda/sync_ops.h"
#include "cuda/tensor_table.h"
#include "emulated_ops.h"
#include "op_skeleton.h"

namespace lookahead {
namespace emulation {
namespace {

// Item i's lists at (i + 1) << 44 and 2^43 bytes further: far apart, and far from any mapping.
constexpr int kPhantomShift = 44;

std::vector<FlatItem> phantom_items(const std::vector<int64_t>& numels) {
  std::vector<FlatItem> items;
  for (size_t i = 0; i < numels.size(); ++i) {
    TORCH_CHECK(numels[i] > 0 && numels[i] <= (int64_t{1} << (kPhantomShift - 3)),
                "a phantom item of ", numels[i], " elements");
    const uintptr_t base = static_cast<uintptr_t>(i + 1) << kPhantomShift;
    items.push_back({{reinterpret_cast<void*>(base),
                      reinterpret_cast<void*>(base + (uintptr_t{1} << (kPhantomShift - 1))),
                      nullptr},
                     numels[i]});
  }
  return items;
}

}  // namespace

Report emulate_update(const Tensors& slow, const Tensors& fast, double alpha,
                      const std::optional<at::Tensor>& due,
                      const std::optional<at::Tensor>& restore, const LaunchOptions& options) {
  Report report;
  const auto flat_kernel = [&](Gate gate) {
    return [&, gate](const std::vector<FlatItem>& flat) {
      launch_sync(slow[0].scalar_type(), fast[0].scalar_type(), alpha, gate,
                  EmulatedLaunch(flat, options, report));
    };
  };
  if (due) {
    run<Op::lookahead_update_if_>(flat_kernel(gate_of(*due, restore)), slow, fast, alpha, *due,
                                  restore);
  } else {
    run<Op::lookahead_update_>(flat_kernel(Gate{nullptr, nullptr}), slow, fast, alpha);
  }
  return report;
}

std::vector<TableSummary> pack_phantom(const std::vector<int64_t>& numels) {
  std::vector<TableSummary> tables;
  mta::for_each_table<2>(phantom_items(numels), [&](const mta::TensorTable<2>& table) {
    TableSummary summary{table.total_chunks, {}, {}, {}};
    for (int i = 0; i < table.count; ++i) {
      summary.items.push_back(
          static_cast<int64_t>(reinterpret_cast<uintptr_t>(table.data[0][i]) >> kPhantomShift) -
          1);
      summary.numel.push_back(table.numel[i]);
      summary.first_chunk.push_back(table.first_chunk[i]);
    }
    tables.push_back(std::move(summary));
  });
  return tables;
}

Report emulate_phantom_update(const std::vector<int64_t>& numels, const LaunchOptions& options) {
  Report report;
  LaunchOptions phantom = options;
  phantom.phantom = true;
  launch_sync(c10::kFloat, c10::kFloat, 0.5, Gate{nullptr, nullptr},
              EmulatedLaunch(phantom_items(numels), phantom, report));
  return report;
}

}  // namespace emulation
}  // namespace lookahead
