// What one emulated call found: the violations (the first few spelled out, all counted) and the
// counters that tell the tests which paths of the kernel ran.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace lookahead {
namespace emulation {

// The elements [first, last] of one list of one flat item that one thread touched in a phantom
// launch, and how many reads and writes that took.
struct PhantomRecord {
  int64_t thread;
  int list;
  int64_t item;
  int64_t first;
  int64_t last;
  int64_t reads;
  int64_t writes;
};

struct Report {
  static constexpr size_t kSpelledOut = 20;

  std::vector<std::string> violations;
  int64_t violation_count = 0;
  std::map<std::string, int64_t> counters;
  std::vector<int64_t> grids;         // per launch
  std::vector<int64_t> table_counts;  // tensors per launch
  std::vector<PhantomRecord> records;

  void violation(const std::string& what) {
    if (violations.size() < kSpelledOut) violations.push_back(what);
    ++violation_count;
  }
  void add(const std::string& counter, int64_t amount) { counters[counter] += amount; }
  void max(const std::string& counter, int64_t value) {
    int64_t& current = counters[counter];
    if (value > current) current = value;
  }
};

}  // namespace emulation
}  // namespace lookahead
