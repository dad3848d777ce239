// Poisoned workspaces for the CUDA emulator (review E4). While a `PoisonedWorkspaces` scope is alive, every CPU
// allocation (every at::empty of a driver: its outputs, columns, plans, partial sums) comes back filled with 0xFF
// bytes (NaN in every floating-point type, -1 in integers) and is registered as a workspace. Kernels' accesses to
// a workspace are recorded byte by byte for as long as it lives, across launches, and a kernel's read (or atomic
// update) of bytes that no kernel has written and that still hold the poison is an error: a read before any
// write. Host code that fills a workspace (at::zeros, a copy, a cuBLAS call emulated by at::mm) overwrites the
// poison, so what it wrote is not mistaken for unwritten memory; only a host write of all-0xFF bytes would be.
// While the emulator counts traffic (traffic.h) allocations are zeroed instead and not checked.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace aecr_emulation {

struct Workspace {
  const unsigned char* lo = nullptr;
  size_t bytes = 0;
  std::vector<unsigned char> written;  // by byte: a kernel wrote it (allocated at a kernel's first access)
};

// The workspace holding `at`, or null (memory not allocated in a scope, or already freed).
Workspace* find_workspace(const void* at);

// Records a kernel's access to workspace `w` (called by touch()); true when it reads bytes no kernel wrote that
// still hold the poison.
bool check_workspace(Workspace& w, const unsigned char* at, size_t bytes, bool reads, bool writes);

// Installs the poisoning CPU allocator for its lifetime (scopes nest; tensors outlive them safely).
class PoisonedWorkspaces {
 public:
  PoisonedWorkspaces();
  ~PoisonedWorkspaces();
  PoisonedWorkspaces(const PoisonedWorkspaces&) = delete;
  PoisonedWorkspaces& operator=(const PoisonedWorkspaces&) = delete;
};

// fn with its arguments, called inside a scope: for binding the drivers (`m.def("f", poisoned(&f))`).
template <typename R, typename... Args>
auto poisoned(R (*fn)(Args...)) {
  return [fn](Args... args) -> R {
    const PoisonedWorkspaces scope;
    return fn(static_cast<Args>(args)...);
  };
}

}  // namespace aecr_emulation
