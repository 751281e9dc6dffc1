#include "device_memory.h"

#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <map>
#include <sstream>

namespace lookahead {
namespace emulation {
namespace {

struct Mapping {
  uintptr_t end;         // of the whole mapping
  uintptr_t data;        // the tensor's bytes: [data, data_end)
  uintptr_t data_end;
};

// By the mapping's first byte.
std::map<uintptr_t, Mapping>& mappings() {
  static std::map<uintptr_t, Mapping> all;
  return all;
}

constexpr size_t kGuardBefore = 64 << 10;
constexpr size_t kGuardAfter = 1 << 20;

const Mapping* find(uintptr_t address) {
  auto& all = mappings();
  auto it = all.upper_bound(address);
  if (it == all.begin()) return nullptr;
  --it;
  return address < it->second.end ? &it->second : nullptr;
}

}  // namespace

at::Tensor guarded_empty(int64_t numel, c10::ScalarType dtype) {
  TORCH_CHECK(numel >= 0, "a negative size");
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t element = c10::elementSize(dtype);
  const size_t bytes = static_cast<size_t>(numel) * element;
  const size_t alignment = element == 1 ? 1 : 64;
  const size_t data_bytes = ((bytes + alignment - 1 + page - 1) / page + (bytes == 0)) * page;
  const size_t total = kGuardBefore + data_bytes + kGuardAfter;
  void* memory =
      mmap(nullptr, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  TORCH_CHECK(memory != MAP_FAILED, "cannot map ", total, " bytes");
  const auto begin = reinterpret_cast<uintptr_t>(memory);
  mprotect(reinterpret_cast<void*>(begin + kGuardBefore), data_bytes, PROT_READ | PROT_WRITE);
  const uintptr_t data_end_limit = begin + kGuardBefore + data_bytes;
  const uintptr_t data = (data_end_limit - bytes) / alignment * alignment;
  std::memset(reinterpret_cast<void*>(data), 0xff, bytes);
  mappings()[begin] = {begin + total, data, data + bytes};
  return at::from_blob(
      reinterpret_cast<void*>(data), {numel},
      [begin, total](void*) {
        mappings().erase(begin);
        munmap(reinterpret_cast<void*>(begin), total);
      },
      at::TensorOptions().dtype(dtype));
}

bool find_allocation(uintptr_t address, uintptr_t* begin, uintptr_t* end) {
  const Mapping* mapping = find(address);
  if (mapping == nullptr) return false;
  *begin = mapping->data;
  *end = mapping->data_end;
  return true;
}

std::string describe(uintptr_t address) {
  std::ostringstream text;
  text << "0x" << std::hex << address << std::dec;
  const Mapping* mapping = find(address);
  if (mapping == nullptr) {
    text << ", in no device memory and not the thread's own stack";
  } else if (address < mapping->data) {
    text << ", " << mapping->data - address << " bytes before a device allocation";
  } else if (address >= mapping->data_end) {
    text << ", " << address - mapping->data_end << " bytes after the end of a device allocation";
  } else {
    text << ", inside a device allocation";
  }
  return text.str();
}

}  // namespace emulation
}  // namespace lookahead
