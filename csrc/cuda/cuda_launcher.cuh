// The CUDA launcher of the drivers written over a launcher (deform_conv_driver.h's GPU kernels, the implicit
// path, FastDeconv's kernels): kernels on the current stream, each launch checked. tests/cuda_emulation has the
// same interface on the CPU (EmulatedLauncher):
//
//   launch(kernel, dim3 grid, dim3 block, args...)     kernel<<<grid, block, shared bytes, stream>>>(args...)
//   launch.with_shared_memory(bytes)                   the same launcher with that much dynamic shared memory
//   launch.allow_shared_memory(kernel, bytes)          lets the kernel use more than 48 KB of it
//   launch.multiprocessors()                           streaming multiprocessors of the device
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <utility>

namespace aecr {

struct CudaLauncher {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  size_t shared_bytes = 0;

  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), dim3 grid, dim3 block, Args&&... args) const {
    kernel<<<grid, block, shared_bytes, stream>>>(std::forward<Args>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  CudaLauncher with_shared_memory(size_t bytes) const { return CudaLauncher{stream, bytes}; }

  template <typename... Params>
  void allow_shared_memory(void (*kernel)(Params...), size_t bytes) const {
    C10_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }

  int64_t multiprocessors() const { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
};

}  // namespace aecr
