// CUDA kernels of FastDeconv's ops (patch statistics, Newton-Schulz); the algorithm is in fastdeconv_driver.h.
//
// The statistics (F <= 64) take two launches and never store the patches (cuda/patch_moments.cuh); larger F uses
// the driver's tiles. The input gradient is a gather (one thread per input element sums the patch entries that
// read it), so it is deterministic without atomics. The matrix form of Newton-Schulz runs one block per matrix in
// one launch (cuda/newton_schulz_kernels.cuh).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "aecr/newton_schulz.h"
#include "aecr/patch_stats.h"
#include "cuda/cuda_launcher.cuh"
#include "cuda/launch.cuh"
#include "cuda/newton_schulz_kernels.cuh"
#include "cuda/patch_moments.cuh"
#include "cuda/running_update_kernel.cuh"
#include "fastdeconv_driver.h"

namespace aecr {
namespace {

constexpr int64_t kTileBudget = int64_t(1) << 26;  // patch entries per tile

template <typename V>
__global__ void build_tile_kernel(PatchShape s, int64_t r0, int64_t rows, const V* input, const V* shift, V* tile) {
  AECR_GRID_STRIDE_LOOP(e, 0, s.groups * rows * s.interleave * s.features) {
    tile[e] = tile_value<V>(s, r0, rows, e, input, shift);
  }
}

template <typename V>
__global__ void gather_input_grad_kernel(PatchShape s, int64_t begin, int64_t end, int64_t r0, int64_t rows,
                                         const V* grad_tile, V* grad_input) {
  AECR_GRID_STRIDE_LOOP(i, begin, end) { grad_input[i] = gather_input_grad<V>(s, i, r0, rows, grad_tile); }
}

template <typename V>
__global__ void ns_spectral_values_kernel(const V* lambda, V* out, int64_t n, int64_t n_iter) {
  AECR_GRID_STRIDE_LOOP(i, 0, n) { out[i] = scalar_iteration<V>(lambda[i], n_iter); }
}

template <typename V>
__global__ void ns_divided_differences_kernel(const V* lambda, V* out, int64_t batch, int64_t f, int64_t n_iter) {
  AECR_GRID_STRIDE_LOOP(i, 0, batch * f * f) {
    const int64_t j = i % f, row = i / f;  // row = b * f + i_
    out[i] = divided_difference<V>(lambda[row], lambda[(row / f) * f + j], n_iter);
  }
}

struct CudaKernels {
  static bool moments(const PatchShape& s, const at::Tensor& input, double eps, at::Tensor& mean, at::Tensor& cov) {
    if (s.features > kMomentMaxFeatures) return false;
    const c10::cuda::CUDAGuard guard(input.device());
    patch_moments(CudaLauncher{}, s, input, eps, mean, cov);
    return true;
  }

  static void build_tile(const PatchShape& s, int64_t n0, int64_t n1, const at::Tensor& input,
                         const at::Tensor& shift, at::Tensor& tile) {
    const c10::cuda::CUDAGuard guard(input.device());
    const int64_t r0 = s.first_row(n0), rows = s.first_row(n1) - r0;
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "build_tile_cuda", [&] {
      build_tile_kernel<scalar_t><<<grid_for(tile.numel()), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          s, r0, rows, input.data_ptr<scalar_t>(), shift.defined() ? shift.data_ptr<scalar_t>() : nullptr,
          tile.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void gather_input_grad(const PatchShape& s, int64_t n0, int64_t n1, int64_t r0, int64_t rows,
                                const at::Tensor& grad_tile, at::Tensor& grad_input) {
    const c10::cuda::CUDAGuard guard(grad_input.device());
    const int64_t per_image = s.channels * s.plane();
    AT_DISPATCH_FLOATING_TYPES(grad_input.scalar_type(), "gather_input_grad_cuda", [&] {
      gather_input_grad_kernel<scalar_t>
          <<<grid_for((n1 - n0) * per_image), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
              s, n0 * per_image, n1 * per_image, r0, rows, grad_tile.data_ptr<scalar_t>(),
              grad_input.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static at::Tensor ns_fused_forward(const at::Tensor& a, const at::Tensor& norm, int64_t n_iter) {
    const c10::cuda::CUDAGuard guard(a.device());
    return ns_fused_forward_launch(CudaLauncher{}, a, norm, n_iter);
  }

  static at::Tensor ns_fused_backward(const at::Tensor& a, const at::Tensor& norm, const at::Tensor& grad,
                                      int64_t n_iter) {
    const c10::cuda::CUDAGuard guard(a.device());
    return ns_fused_backward_launch(CudaLauncher{}, a, norm, grad, n_iter);
  }

  static at::Tensor ns_spectral_values(const at::Tensor& lambda_, int64_t n_iter) {
    const c10::cuda::CUDAGuard guard(lambda_.device());
    const at::Tensor lambda = lambda_.contiguous();
    at::Tensor out = at::empty_like(lambda);
    AT_DISPATCH_FLOATING_TYPES(lambda.scalar_type(), "ns_spectral_values_cuda", [&] {
      ns_spectral_values_kernel<scalar_t><<<grid_for(lambda.numel()), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          lambda.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), lambda.numel(), n_iter);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return out;
  }

  static at::Tensor ns_divided_differences(const at::Tensor& lambda_, int64_t n_iter) {
    const c10::cuda::CUDAGuard guard(lambda_.device());
    const at::Tensor lambda = lambda_.contiguous();
    const int64_t batch = lambda.size(0), f = lambda.size(1);
    at::Tensor out = at::empty({batch, f, f}, lambda.options());
    AT_DISPATCH_FLOATING_TYPES(lambda.scalar_type(), "ns_divided_differences_cuda", [&] {
      ns_divided_differences_kernel<scalar_t><<<grid_for(out.numel()), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          lambda.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), batch, f, n_iter);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return out;
  }
};

using Driver = FastDeconvDriver<CudaKernels>;

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
