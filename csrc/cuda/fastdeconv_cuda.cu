// CUDA entry points of FastDeconv's ops (patch statistics, Newton-Schulz, running update): the algorithm is in
// fastdeconv_driver.h, the kernels in fastdeconv_kernels.cuh.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "cuda/cuda_launcher.cuh"
#include "cuda/fastdeconv_kernels.cuh"
#include "cuda/running_update_kernel.cuh"
#include "fastdeconv_driver.h"

namespace aecr {
namespace {

constexpr int64_t kTileBudget = int64_t(1) << 26;  // patch entries per tile

using Driver = FastDeconvDriver<GpuFastDeconvKernels<CudaLauncher>>;

std::tuple<at::Tensor, at::Tensor> patch_statistics_cuda(const at::Tensor& input, at::IntArrayRef kernel_size,
                                                         at::IntArrayRef dilation, at::IntArrayRef padding,
                                                         int64_t sampling_stride, int64_t block, int64_t groups,
                                                         double eps) {
  const c10::cuda::CUDAGuard guard(input.device());
  return Driver::statistics(input, kernel_size, dilation, padding, sampling_stride, block, groups, eps, kTileBudget);
}

at::Tensor patch_statistics_backward_cuda(const at::Tensor& grad_mean, const at::Tensor& grad_cov,
                                          const at::Tensor& input, const at::Tensor& mean,
                                          at::IntArrayRef kernel_size, at::IntArrayRef dilation,
                                          at::IntArrayRef padding, int64_t sampling_stride, int64_t block,
                                          int64_t groups) {
  const c10::cuda::CUDAGuard guard(input.device());
  return Driver::statistics_backward(grad_mean, grad_cov, input, mean, kernel_size, dilation, padding,
                                     sampling_stride, block, groups, kTileBudget);
}

std::tuple<at::Tensor, at::Tensor> isqrt_newton_schulz_cuda(const at::Tensor& a, int64_t n_iter) {
  const c10::cuda::CUDAGuard guard(a.device());
  return Driver::isqrt(a, n_iter);
}

at::Tensor isqrt_newton_schulz_backward_cuda(const at::Tensor& grad, const at::Tensor& a, const at::Tensor& result,
                                             const at::Tensor& saved, int64_t n_iter) {
  const c10::cuda::CUDAGuard guard(a.device());
  return Driver::isqrt_backward(grad, a, result, saved, n_iter);
}

at::Tensor fastdeconv_update_running_cuda(at::Tensor& running_mean, at::Tensor& running_deconv,
                                          const at::Tensor& mean, const at::Tensor& deconv, double momentum) {
  check_running_update(running_mean, running_deconv, mean, deconv);
  const c10::cuda::CUDAGuard guard(mean.device());
  return running_update_launch(CudaLauncher{}, running_mean, running_deconv, mean, deconv, momentum);
}

}  // namespace

TORCH_LIBRARY_IMPL(aecr_ops, CUDA, m) {
  m.impl("patch_statistics", &patch_statistics_cuda);
  m.impl("patch_statistics_backward", &patch_statistics_backward_cuda);
  m.impl("isqrt_newton_schulz", &isqrt_newton_schulz_cuda);
  m.impl("isqrt_newton_schulz_backward", &isqrt_newton_schulz_backward_cuda);
  m.impl("fastdeconv_update_running", &fastdeconv_update_running_cuda);
}

}  // namespace aecr
