#include "access_checker.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <map>
#include <string>
#include <tuple>

#include "cuda/device_portability.h"
#include "cuda/tensor_table.h"
#include "device_memory.h"
#include "emulated_grid.h"

namespace lookahead {
namespace emulation {
namespace {

enum How : uint8_t { kVectorRead = 1, kVectorWrite = 2, kScalarRead = 4, kScalarWrite = 8 };

struct Extent {
  ExtentSpec spec;
  uintptr_t end;
  // Per element: running_thread() + 1 of the first thread to touch it (0: none), the reads and
  // writes (saturating), and the How bits of every access.
  std::vector<int32_t> owner;
  std::vector<uint8_t> reads;
  std::vector<uint8_t> writes;
  std::vector<uint8_t> how;
};

struct Launch {
  Report* report = nullptr;
  bool phantom = false;
  std::vector<Extent> extents;  // by address
  size_t last = 0;              // the extent of the previous access: the likely next one
  bool in_vector = false;
  std::map<std::tuple<int64_t, int, int64_t>, PhantomRecord> records;
  int64_t scalar_reads = 0;
  int64_t scalar_writes = 0;
  int64_t vector_loads = 0;
  int64_t vector_stores = 0;
  int64_t clamped_loads = 0;
};

Launch launch;

std::string element_name(const Extent& extent, int64_t index) {
  return "list " + std::to_string(extent.spec.list) + " of flat item " +
         std::to_string(extent.spec.item) + ", element " + std::to_string(index);
}

Extent* find_extent(uintptr_t address) {
  auto& extents = launch.extents;
  if (launch.last < extents.size()) {
    Extent& last = extents[launch.last];
    if (address >= last.spec.begin && address < last.end) return &last;
  }
  auto it = std::upper_bound(extents.begin(), extents.end(), address,
                             [](uintptr_t a, const Extent& e) { return a < e.spec.begin; });
  if (it == extents.begin()) return nullptr;
  --it;
  if (address >= it->end) return nullptr;
  launch.last = static_cast<size_t>(it - extents.begin());
  return &*it;
}

// Where an access went: the element it starts in, or how far outside the nearest tensor of the
// launch, in the allocation whose guard pages it hit if it hit any.
std::string place(uintptr_t address) {
  if (const Extent* inside = find_extent(address)) {
    const uintptr_t offset = address - inside->spec.begin;
    return "byte " + std::to_string(offset % inside->spec.element_bytes) + " of " +
           element_name(*inside, static_cast<int64_t>(offset / inside->spec.element_bytes));
  }
  uintptr_t low = 0;
  uintptr_t high = UINTPTR_MAX;
  const bool in_allocation = find_allocation(address, &low, &high);
  const Extent* nearest = nullptr;
  uintptr_t distance = UINTPTR_MAX;
  for (const Extent& extent : launch.extents) {
    if (extent.end <= low || extent.spec.begin >= high) continue;
    const uintptr_t d = address < extent.spec.begin ? extent.spec.begin - address
                                                     : address - extent.end;
    if (d < distance) {
      distance = d;
      nearest = &extent;
    }
  }
  if (nearest == nullptr || (!in_allocation && distance > (1 << 20))) return describe(address);
  const ExtentSpec& spec = nearest->spec;
  return std::to_string(distance) +
         (address < spec.begin ? " bytes before " : " bytes past the end of ") + "list " +
         std::to_string(spec.list) + " of flat item " + std::to_string(spec.item) + " (" +
         std::to_string(spec.numel) + " elements of " + std::to_string(spec.element_bytes) +
         " bytes)";
}

void record_phantom(const Extent& extent, uintptr_t address, bool write) {
  const int64_t element =
      static_cast<int64_t>((address - extent.spec.begin) / extent.spec.element_bytes);
  const int64_t thread = running_thread();
  auto [it, added] = launch.records.try_emplace({thread, extent.spec.list, extent.spec.item},
                                                PhantomRecord{thread, extent.spec.list,
                                                              extent.spec.item, element, element,
                                                              0, 0});
  PhantomRecord& record = it->second;
  record.first = std::min(record.first, element);
  record.last = std::max(record.last, element);
  ++(write ? record.writes : record.reads);
}

void count_paths(const Extent& extent, std::map<int64_t, int64_t>& chunks_per_block) {
  Report& report = *launch.report;
  for (int64_t begin = 0; begin < extent.spec.numel; begin += mta::kChunkSize) {
    const int64_t end = std::min<int64_t>(begin + mta::kChunkSize, extent.spec.numel);
    int64_t first_vector = -1;
    int64_t last_vector = -1;
    int64_t first_touched = -1;
    for (int64_t i = begin; i < end; ++i) {
      if (extent.how[i] != 0 && first_touched < 0) first_touched = i;
      if (extent.how[i] & (kVectorRead | kVectorWrite)) {
        if (first_vector < 0) first_vector = i;
        last_vector = i;
      }
    }
    if (first_touched < 0) continue;
    report.add("chunks", 1);
    ++chunks_per_block[(extent.owner[first_touched] - 1) / blockDim.x];
    for (int64_t i = begin; i < end; ++i) {
      if (!(extent.how[i] & (kScalarRead | kScalarWrite))) continue;
      if (first_vector < 0) {
        report.add("scalar_only_elements", 1);
      } else if (i < first_vector) {
        report.add("head_elements", 1);
      } else {
        report.add("tail_elements", 1);
      }
    }
    if (first_vector >= 0) report.add("vector_elements", last_vector - first_vector + 1);
  }
}

void check(const Extent& extent, Expect expect) {
  Report& report = *launch.report;
  for (int64_t i = 0; i < extent.spec.numel; ++i) {
    const int reads = extent.reads[i];
    const int writes = extent.writes[i];
    std::string wrong;
    if (expect == Expect::kWritten && writes == 0) wrong = "was never written";
    if ((expect == Expect::kRead || expect == Expect::kReadOnly) && reads == 0) {
      wrong = "was never read";
    }
    if (expect == Expect::kReadOnly && writes > 0) wrong = "was written by a read-only launch";
    if (expect == Expect::kUntouched && reads + writes > 0) {
      wrong = "was touched by a launch that must leave it alone";
    }
    if (!wrong.empty()) report.violation(element_name(extent, i) + " " + wrong);
  }
}

}  // namespace

void begin_launch(const std::vector<ExtentSpec>& extents, bool phantom, Report& report) {
  launch = Launch{};
  launch.report = &report;
  launch.phantom = phantom;
  for (const ExtentSpec& spec : extents) {
    Extent extent{spec, spec.begin + static_cast<uintptr_t>(spec.numel) * spec.element_bytes};
    if (!phantom) {
      extent.owner.assign(spec.numel, 0);
      extent.reads.assign(spec.numel, 0);
      extent.writes.assign(spec.numel, 0);
      extent.how.assign(spec.numel, 0);
    }
    launch.extents.push_back(std::move(extent));
  }
  std::sort(launch.extents.begin(), launch.extents.end(),
            [](const Extent& a, const Extent& b) { return a.spec.begin < b.spec.begin; });
}

void end_launch(const std::vector<Expect>& expect) {
  Report& report = *launch.report;
  report.add("scalar_reads", launch.scalar_reads);
  report.add("scalar_writes", launch.scalar_writes);
  report.add("vector_loads", launch.vector_loads);
  report.add("vector_stores", launch.vector_stores);
  report.add("clamped_loads", launch.clamped_loads);
  for (const auto& [key, record] : launch.records) report.records.push_back(record);
  if (launch.phantom) return;
  std::map<int64_t, int64_t> chunks_per_block;
  for (const Extent& extent : launch.extents) {
    TORCH_CHECK(extent.spec.list < static_cast<int>(expect.size()), "no expectation for list ",
                extent.spec.list);
    check(extent, expect[extent.spec.list]);
    if (extent.spec.list == 0) count_paths(extent, chunks_per_block);
  }
  for (const auto& [block, chunks] : chunks_per_block) report.max("max_chunks_per_block", chunks);
  report.add("blocks_with_work", static_cast<int64_t>(chunks_per_block.size()));
}

bool device_access(uintptr_t address, size_t bytes, bool write) {
  Report& report = *launch.report;
  Extent* extent = find_extent(address);
  const int64_t me = running_thread();
  const char* verb = write ? " writes " : " reads ";
  if (extent == nullptr || address + bytes > extent->end) {
    report.violation(thread_name(me) + verb + std::to_string(bytes) + " bytes out of bounds, at " +
                     place(address));
    return false;
  }
  if (launch.phantom) {
    record_phantom(*extent, address, write);
    return false;
  }
  const uintptr_t offset = address - extent->spec.begin;
  const int64_t index = static_cast<int64_t>(offset / extent->spec.element_bytes);
  if (offset % extent->spec.element_bytes != 0 ||
      bytes != static_cast<size_t>(extent->spec.element_bytes)) {
    report.violation(thread_name(me) + verb + std::to_string(bytes) + " bytes across elements of " +
                     element_name(*extent, index));
    return false;
  }
  int32_t& owner = extent->owner[index];
  if (owner == 0) {
    owner = static_cast<int32_t>(me + 1);
  } else if (owner != me + 1) {
    report.violation(thread_name(me) + verb + element_name(*extent, index) + ", which " +
                     thread_name(owner - 1) + " touched");
  }
  uint8_t& count = write ? extent->writes[index] : extent->reads[index];
  if (count < UINT8_MAX) ++count;
  if (write && count == 2) {
    report.violation(thread_name(me) + " writes " + element_name(*extent, index) +
                     " a second time");
  }
  if (launch.in_vector) {
    extent->how[index] |= write ? kVectorWrite : kVectorRead;
  } else {
    extent->how[index] |= write ? kScalarWrite : kScalarRead;
    ++(write ? launch.scalar_writes : launch.scalar_reads);
  }
  return true;
}

VectorAccess::VectorAccess(uintptr_t dst, uintptr_t src, size_t bytes) {
  const bool load = dst - running_stack_begin < running_stack_bytes;
  if (load == (src - running_stack_begin < running_stack_bytes)) return;  // not device memory
  const uintptr_t device = load ? src : dst;
  if (device % bytes != 0) {
    launch.report->violation(thread_name(running_thread()) + (load ? " loads " : " stores ") +
                             "a vector of " + std::to_string(bytes) + " bytes at " +
                             place(device) + ", off its alignment (a GPU faults)");
  }
  if (load) {
    ++launch.vector_loads;
    const Extent* extent = find_extent(src);
    if (extent != nullptr && !launch.phantom) {
      const auto index =
          static_cast<int64_t>((src - extent->spec.begin) / extent->spec.element_bytes);
      if (extent->reads[index] > 0 && extent->owner[index] == running_thread() + 1) {
        ++launch.clamped_loads;
      }
    }
  } else {
    ++launch.vector_stores;
  }
  launch.in_vector = true;
}

VectorAccess::~VectorAccess() { launch.in_vector = false; }

}  // namespace emulation
}  // namespace lookahead
