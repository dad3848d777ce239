// deform_conv2d on CUDA: the op entry points. The default ("simple") path is deform_conv_driver.h over the
// kernels of deform_conv_kernels.cuh; AECR_DCN_CUDA_PATH=implicit selects the implicit-GEMM path where it
// applies (deform_conv_implicit.cu).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "cuda/cuda_launcher.cuh"
#include "cuda/deform_conv_implicit.h"
#include "cuda/deform_conv_kernels.cuh"
#include "deform_conv_args.h"
#include "deform_conv_driver.h"

namespace aecr {
namespace {

bool implicit_path_runs(const at::Tensor& input, const at::Tensor& weight, const DeformConvShape& s,
                        int64_t groups) {
  return implicit_path_requested() && implicit_path_applies(input, weight, s, groups);
}

GpuDeformConvKernels<CudaLauncher> simple_path() {
  return GpuDeformConvKernels<CudaLauncher>{CudaLauncher{}, at::globalContext().deterministicAlgorithms()};
}

at::Tensor deform_conv2d_cuda(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
                              const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& bias,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t groups, int64_t offset_groups) {
  const DeformConvShape s =
      check_deform_conv(input, weight, offset, mask, bias, stride, padding, dilation, groups, offset_groups);
  const c10::cuda::CUDAGuard guard(input.device());
  if (implicit_path_runs(input, weight, s, groups)) {
    return deform_conv2d_implicit(s, input, weight, offset, mask, bias, groups);
  }
  return deform_conv2d_forward(simple_path(), s, input, weight, offset, mask, bias, groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
    const std::optional<at::Tensor>& mask, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, int64_t offset_groups, const c10::List<bool>& output_mask) {
  const DeformConvShape s = check_deform_conv(input, weight, offset, mask, std::nullopt, stride, padding, dilation,
                                              groups, offset_groups);
  check_grad_output(grad_output, input, s, weight.size(0));
  const DeformConvGrads needed = check_output_mask(output_mask, mask);
  const c10::cuda::CUDAGuard guard(input.device());
  if (implicit_path_runs(input, weight, s, groups)) {
    return deform_conv2d_backward_implicit(s, grad_output, input, weight, offset, mask, groups, needed);
  }
  return deform_conv2d_backward(simple_path(), s, grad_output, input, weight, offset, mask, groups, needed);
}

// Which path deform_conv2d takes for these arguments now: "simple" or "implicit".
std::string deform_conv2d_path_cuda(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
                                    const std::optional<at::Tensor>& mask, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                    int64_t offset_groups) {
  const DeformConvShape s =
      check_deform_conv(input, weight, offset, mask, std::nullopt, stride, padding, dilation, groups, offset_groups);
  const c10::cuda::CUDAGuard guard(input.device());
  return implicit_path_runs(input, weight, s, groups) ? "implicit" : "simple";
}

}  // namespace

TORCH_LIBRARY_IMPL(aecr_ops, CUDA, m) {
  m.impl("deform_conv2d", &deform_conv2d_cuda);
  m.impl("deform_conv2d_backward", &deform_conv2d_backward_cuda);
  m.impl("deform_conv2d_path", &deform_conv2d_path_cuda);
}

}  // namespace aecr
