// A CPU emulator of the CUDA features this project's kernels use, so that every kernel and its driver runs in
// the CPU tests (no GPU needed). Include it before the kernels, with AECR_CUDA_EMULATION defined.
//
//   emulator.h     launches, the threads of a block as fibers, barriers, launch limits, barrier divergence
//   memory.h       checked global pointers and __shared__ arrays: bounds, races, uninitialised shared memory
//   workspaces.h   poisoned allocations of the drivers, and reads of them before any write
//   traffic.h      the counts of a launch's memory traffic and FLOPs, for the time model
//   intrinsics.h   __syncthreads, __syncwarp, shuffles, fp16 / bf16, WMMA
//
// Kernels declare their memory through csrc/cuda/device_memory.cuh (`Global<T>`, `Shared<T[N]>`,
// `device_ptr(tensor)`), which is plain pointers and arrays under nvcc and the checked types here. It models
// results and the rules above, not timing, memory ordering beyond barriers, or the rounding inside a real MMA.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "emulator.h"
#include "intrinsics.h"
#include "memory.h"
#include "traffic.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define AECR_DYNAMIC_SHARED(T, name) const auto name = aecr_emulation::dynamic_shared<T>()

namespace aecr_emulation {

template <typename T>
using Global = Ptr<T>;
template <typename A>
using Shared = SharedArray<A>;

// A kernel argument from a tensor: element `offset` on, within the tensor's elements (the tensor must be
// contiguous, as every kernel indexes its arguments).
template <typename T>
Ptr<T> device_ptr(const at::Tensor& t, int64_t offset = 0) {
  using V = std::remove_const_t<T>;
  TORCH_CHECK(t.is_contiguous(), "CUDA emulation: a kernel argument from a non-contiguous tensor (sizes ", t.sizes(),
              ", strides ", t.strides(), "): kernels index their arguments as contiguous");
  V* base = t.data_ptr<V>();
  const auto* lo = reinterpret_cast<const unsigned char*>(base);
  return Ptr<T>(base + offset, Extent{lo, lo + t.numel() * sizeof(V), nullptr, -1, true, find_workspace(lo)});
}

// The same for a byte tensor holding structures.
template <typename T>
Ptr<T> device_ptr_as(const at::Tensor& bytes) {
  TORCH_CHECK(bytes.is_contiguous() && bytes.scalar_type() == at::kByte, "CUDA emulation: device_ptr_as of a byte tensor");
  auto* base = static_cast<unsigned char*>(bytes.data_ptr());
  return Ptr<T>(reinterpret_cast<T*>(base), Extent{base, base + bytes.numel(), nullptr, -1, true, find_workspace(base)});
}

template <typename T>
Ptr<T> optional_ptr(const std::optional<at::Tensor>& t, int64_t offset = 0) {
  return t.has_value() ? device_ptr<T>(*t, offset) : Ptr<T>();
}

template <typename T>
Ptr<T> defined_ptr(const at::Tensor& t) {
  return t.defined() ? device_ptr<T>(t) : Ptr<T>();
}

// The launcher of the drivers (see csrc/cuda/cuda_launcher.cuh for the production one).
struct EmulatedLauncher {
  size_t shared_bytes = 0;

  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), dim3 grid, dim3 block, Args&&... args) const {
    launch(kernel, LaunchShape{grid, block, shared_bytes}, std::forward<Args>(args)...);
  }
  // Launches with `bytes` of dynamic shared memory.
  EmulatedLauncher with_shared_memory(size_t bytes) const { return EmulatedLauncher{bytes}; }
  // cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes).
  template <typename... Params>
  void allow_shared_memory(void (*kernel)(Params...), size_t bytes) const {
    kernel_info(reinterpret_cast<const void*>(kernel)).dynamic_shared_limit = static_cast<int64_t>(bytes);
  }
  int64_t multiprocessors() const { return aecr_emulation::multiprocessors(); }
};

}  // namespace aecr_emulation

using aecr_emulation::atomicAdd;
using aecr_emulation::atomicOr;
using aecr_emulation::EmulatedLauncher;
