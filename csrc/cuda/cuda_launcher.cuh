// The CUDA launcher of the drivers written over a launcher (deform_conv_implicit_driver.h, deform_conv_gather.cuh):
// kernels on the current stream, each launch checked.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <utility>

namespace aecr {

struct CudaLauncher {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), dim3 grid, dim3 block, Args&&... args) const {
    kernel<<<grid, block, 0, stream>>>(std::forward<Args>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  int64_t multiprocessors() const { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
};

}  // namespace aecr
