// The launcher that the Ops' headers (sync_ops.h, found_nonfinite_op.h) call in place of
// multi_tensor_apply.cuh's: the real table packing and grid choice, then each launch run in the
// emulated grid (emulated_grid.h) on Probe elements (probe.h), its accesses checked
// (access_checker.h).
#pragma once

#include <c10/util/Exception.h>

#include <climits>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "access_checker.h"
#include "cuda/multi_tensor_kernel.h"
#include "cuda/tensor_table.h"
#include "emulated_grid.h"
#include "probe.h"
#include "report.h"
#include "validation.h"

namespace lookahead {
namespace emulation {

struct LaunchOptions {
  // What resident_blocks() gives on a GPU: its SMs times the blocks of the kernel each one holds.
  int max_grid = 1;
  Selection selection;
  double timeout_s = 60;
  std::vector<Expect> expect;  // per list
  bool phantom = false;        // the items' addresses are never dereferenced (access_checker.h)
  int only_table = -1;         // the one table to launch; -1: every one
};

// A launch's parameters as CUDA lays them out: the table, then the Op at its alignment.
template <typename Table, typename Op>
struct Parameters {
  Table table;
  Op op;
};

template <typename Op, typename... T>
void run_thread(const void* parameters) {
  const auto& p = *static_cast<const Parameters<mta::TensorTable<sizeof...(T)>, Op>*>(parameters);
  mta::elementwise_kernel<Op, Probe<T>...>(p.table, p.op);
}

class EmulatedLaunch {
 public:
  EmulatedLaunch(const std::vector<FlatItem>& flat, const LaunchOptions& options, Report& report)
      : flat_(flat), options_(options), report_(report) {}

  template <typename... T, typename Op>
  void operator()(mta::Elements<T...>, const Op& op) const {
    static_assert(((sizeof(Probe<T>) == sizeof(T) && alignof(Probe<T>) == alignof(T)) && ...),
                  "a Probe must lay out as its element");
    constexpr int kLists = sizeof...(T);
    using Table = mta::TensorTable<kLists>;
    using Launch = Parameters<Table, Op>;
    constexpr int kElementBytes[] = {static_cast<int>(sizeof(T))...};
    TORCH_CHECK(options_.phantom || options_.expect.size() == kLists,
                "one expectation per list: ", kLists);
    int index = 0;
    int64_t first_item = 0;
    mta::for_each_table<kLists>(flat_, [&](const Table& table) {
      if (options_.only_table < 0 || index == options_.only_table) {
        const int grid = mta::grid_size(table, options_.max_grid);
        TORCH_CHECK(options_.phantom || static_cast<int64_t>(grid) * mta::kBlockSize < INT32_MAX,
                    "a grid too large for the checks' thread numbers");
        report_.grids.push_back(grid);
        report_.table_counts.push_back(table.count);
        report_.add("launches", 1);
        report_.max("parameter_bytes", offsetof(Launch, op) + sizeof(Op));
        std::vector<ExtentSpec> extents;
        for (int i = 0; i < table.count; ++i) {
          for (int l = 0; l < kLists; ++l) {
            extents.push_back({reinterpret_cast<uintptr_t>(table.data[l][i]), table.numel[i],
                               kElementBytes[l], l, first_item + i});
          }
        }
        begin_launch(extents, options_.phantom, report_);
        const Launch parameters{table, op};
        run_grid(grid, mta::kBlockSize, &run_thread<Op, T...>, &parameters, options_.selection,
                 options_.timeout_s, report_);
        end_launch(options_.expect);
      }
      ++index;
      first_item += table.count;
    });
  }

 private:
  const std::vector<FlatItem>& flat_;
  const LaunchOptions& options_;
  Report& report_;
};

}  // namespace emulation
}  // namespace lookahead
