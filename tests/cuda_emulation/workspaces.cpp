// Poisoned workspaces of the CUDA emulator (workspaces.h): a CPU allocator that fills and registers, and the
// registry that kernels' accesses consult.
#include "workspaces.h"

#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstring>
#include <map>
#include <memory>
#include <mutex>

#include "traffic.h"

namespace aecr_emulation {

namespace {

constexpr unsigned char kPoison = 0xff;
// Both the poisoning allocator and the one it replaces are set at this priority, so that each can replace the
// other (c10 keeps an allocator of a higher priority than the one offered).
constexpr uint8_t kPriority = 100;

struct Registry {
  std::mutex mutex;
  std::map<uintptr_t, std::unique_ptr<Workspace>> by_start;
  int depth = 0;
  c10::Allocator* replaced = nullptr;
};

Registry& registry() {
  static Registry r;
  return r;
}

void release(void* data) {
  {
    Registry& r = registry();
    const std::lock_guard<std::mutex> lock(r.mutex);
    r.by_start.erase(reinterpret_cast<uintptr_t>(data));
  }
  c10::profiledCPUMemoryReporter().Delete(data);
  c10::free_cpu(data);
}

class PoisoningAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    void* data = c10::alloc_cpu(bytes);
    if (data != nullptr) {
      std::memset(data, counting() ? 0 : kPoison, bytes);  // zeros while measuring: see traffic.h
      auto w = std::make_unique<Workspace>();
      w->lo = static_cast<const unsigned char*>(data);
      w->bytes = bytes;
      Registry& r = registry();
      const std::lock_guard<std::mutex> lock(r.mutex);
      r.by_start[reinterpret_cast<uintptr_t>(data)] = std::move(w);
    }
    c10::profiledCPUMemoryReporter().New(data, bytes);  // as the default allocator reports, for the profiler
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }
};

PoisoningAllocator& poisoning_allocator() {
  static PoisoningAllocator a;
  return a;
}

}  // namespace

Workspace* find_workspace(const void* at) {
  Registry& r = registry();
  const std::lock_guard<std::mutex> lock(r.mutex);
  const auto address = reinterpret_cast<uintptr_t>(at);
  auto it = r.by_start.upper_bound(address);
  if (it == r.by_start.begin()) return nullptr;
  --it;
  Workspace* w = it->second.get();
  return address < it->first + w->bytes ? w : nullptr;
}

bool check_workspace(Workspace& w, const unsigned char* at, size_t bytes, bool reads, bool writes) {
  if (w.written.empty()) w.written.assign(w.bytes, 0);
  const size_t first = static_cast<size_t>(at - w.lo);
  bool unwritten = false, poisoned = true;
  if (reads) {
    for (size_t i = 0; i < bytes; ++i) {
      if (w.written[first + i] != 0) continue;
      unwritten = true;
      poisoned &= at[i] == kPoison;
    }
  }
  if (writes) std::memset(w.written.data() + first, 1, bytes);
  return unwritten && poisoned;
}

PoisonedWorkspaces::PoisonedWorkspaces() {
  Registry& r = registry();
  const std::lock_guard<std::mutex> lock(r.mutex);
  if (r.depth++ == 0) {
    r.replaced = c10::GetCPUAllocator();
    c10::SetCPUAllocator(&poisoning_allocator(), kPriority);
  }
}

PoisonedWorkspaces::~PoisonedWorkspaces() {
  Registry& r = registry();
  const std::lock_guard<std::mutex> lock(r.mutex);
  if (--r.depth == 0) c10::SetCPUAllocator(r.replaced, kPriority);
}

}  // namespace aecr_emulation
