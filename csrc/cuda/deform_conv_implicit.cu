// The implicit-GEMM path of deform_conv2d on CUDA: when it applies, and its entry points (the CUDA launcher over
// deform_conv_implicit_driver.h; the kernels and their design are in deform_conv_implicit_kernels.cuh).
#include "cuda/deform_conv_implicit.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdlib>
#include <cstring>
#include <limits>

#include "cuda/cuda_launcher.cuh"
#include "cuda/deform_conv_implicit_driver.h"

namespace aecr {

bool implicit_path_requested() {
  const char* value = std::getenv("AECR_DCN_CUDA_PATH");
  if (value == nullptr || value[0] == '\0' || std::strcmp(value, "simple") == 0) return false;
  TORCH_CHECK(std::strcmp(value, "implicit") == 0,
              "deform_conv2d: the environment variable AECR_DCN_CUDA_PATH must be \"simple\" or \"implicit\", got \"",
              value, "\"");
  return true;
}

namespace {

// Whether the device runs tensor-core kernels compiled for sm_80 or newer: machine code built for it (a build
// that only has older PTX, JIT-compiled by the driver, would run the kernels' trapping fallback).
bool tensor_core_kernels_loaded(int device) {
  static int cached[64] = {};  // 0 unknown, 1 yes, 2 no
  int& known = cached[device % 64];
  if (known == 0) {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    cudaFuncAttributes attributes;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, implicit_forward_kernel<float>));
    known = attributes.binaryVersion >= 80 && attributes.ptxVersion >= 80 ? 1 : 2;
  }
  return known == 1;
}

}  // namespace

bool implicit_path_applies(const at::Tensor& input, const at::Tensor& weight, const DeformConvShape& s,
                           int64_t groups) {
  const at::ScalarType type = input.scalar_type();
  const bool tensor_core_type = type == at::kHalf || type == at::kBFloat16 ||
                                (type == at::kFloat && at::globalContext().allowTF32CuBLAS());
  if (!tensor_core_type || input.numel() == 0) return false;
  if (s.plane() > std::numeric_limits<int>::max()) return false;
  const Geometry q = geometry_of(s, input, weight, groups);
  if (!implicit_grids_fit(s, q)) return false;
  const cudaDeviceProp* device = at::cuda::getDeviceProperties(input.get_device());
  if (implicit_workspace_bytes(s, q, input.size(0), static_cast<int64_t>(input.element_size()), weight.numel(),
                               device->multiProcessorCount) > kImplicitWorkspaceBudget) {
    return false;
  }
  return device->major >= 8 && tensor_core_kernels_loaded(input.get_device());
}

at::Tensor deform_conv2d_implicit(const DeformConvShape& s, const at::Tensor& input, const at::Tensor& weight,
                                  const at::Tensor& offset, const std::optional<at::Tensor>& mask,
                                  const std::optional<at::Tensor>& bias, int64_t groups) {
  const c10::cuda::CUDAGuard guard(input.device());
  return implicit_forward(CudaLauncher{}, s, input, weight, offset, mask, bias, groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_implicit(
    const DeformConvShape& s, const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& offset, const std::optional<at::Tensor>& mask, int64_t groups, const DeformConvGrads& needed) {
  const c10::cuda::CUDAGuard guard(input.device());
  return implicit_backward(CudaLauncher{}, s, grad_output, input, weight, offset, mask, groups,
                           at::globalContext().deterministicAlgorithms(), needed);
}

}  // namespace aecr
