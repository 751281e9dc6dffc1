// What the tests call: the ops as the CUDA backend runs them (cuda/lookahead_update.cu,
// cuda/found_nonfinite.cu: validation, the flat tensors through the kernel, ATen for any other),
// on tensors in the emulated device's memory and with every launch emulated; the index tests'
// phantom launches; and Ops that break the rules, for the tests of the checks themselves.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "emulated_launch.h"
#include "report.h"

namespace lookahead {
namespace emulation {

using Tensors = std::vector<at::Tensor>;

Report emulate_update(const Tensors& slow, const Tensors& fast, double alpha,
                      const std::optional<at::Tensor>& due,
                      const std::optional<at::Tensor>& restore, const LaunchOptions& options);

Report emulate_momentum_update(const Tensors& slow, const Tensors& fast, const Tensors& momentum,
                               double lr, double mu, bool nesterov,
                               const std::optional<at::Tensor>& due,
                               const std::optional<at::Tensor>& restore,
                               const LaunchOptions& options);

Report emulate_found_nonfinite(const Tensors& tensors, const at::Tensor& found,
                               const std::optional<at::Tensor>& due, const LaunchOptions& options);

// quantize_pseudo_gradients_ and dequantize_mean_ (cuda/quantization.cu's kernel).
Report emulate_quantize(const Tensors& slow, const Tensors& fast, const at::Tensor& payload,
                        const at::Tensor& scales, const LaunchOptions& options);

Report emulate_dequantize_mean(const Tensors& slow, const Tensors& out, const at::Tensor& payloads,
                               const at::Tensor& scales, const LaunchOptions& options);

// One launch's table for two lists.
struct TableSummary {
  int32_t total_chunks;
  std::vector<int64_t> items;  // the flat item of each entry, from its packed addresses
  std::vector<int64_t> numel;
  std::vector<int32_t> first_chunk;
};

// The tables of a float32 sync over items of these sizes, at addresses never dereferenced.
std::vector<TableSummary> pack_phantom(const std::vector<int64_t>& numels);

// That sync's launch of table options.only_table, for the selected blocks and threads only.
Report emulate_phantom_update(const std::vector<int64_t>& numels, const LaunchOptions& options);

// A read-only launch over float32 tensors whose Op commits `fault`: "unwritten", "shared",
// "out_of_bounds", "misaligned_vector", "divergent_barrier", "hang" or "fault"; `flag` is a
// one-element bool tensor (false).
Report emulate_faulty(const std::string& fault, const Tensors& tensors, const at::Tensor& flag,
                      const LaunchOptions& options);

}  // namespace emulation
}  // namespace lookahead
