// The CUDA kernels of FastDeconv's ops and their kernel class for fastdeconv_driver.h, written over a launcher
// (cuda_launcher.cuh on the GPU, tests/cuda_emulation's EmulatedLauncher on the CPU).
//
// The statistics (F <= 64) take two launches and never store the patches (patch_moments.cuh); larger F uses the
// driver's tiles (build_tile_kernel). The input gradient is a gather (one thread per input element sums the
// patch entries that read it), so it is deterministic without atomics. The matrix form of Newton-Schulz runs
// one block per matrix in one launch (newton_schulz_kernels.cuh); larger matrices run it in the driver as batched
// GEMMs (kSpectralForm false), since the spectral form's eigendecomposition would wait for the GPU.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "aecr/newton_schulz.h"
#include "aecr/patch_stats.h"
#include "cuda/device_memory.cuh"
#include "cuda/launch.cuh"
#include "cuda/newton_schulz_kernels.cuh"
#include "cuda/patch_moments.cuh"

namespace aecr {
namespace {

template <typename V>
__global__ void __launch_bounds__(kThreads, 1) build_tile_kernel(PatchShape s, int64_t r0, int64_t rows,
                                                              Global<const V> input, Global<const V> shift,
                                                              Global<V> tile) {
  AECR_GRID_STRIDE_LOOP(e, 0, s.groups * rows * s.interleave * s.features) {
    tile[e] = tile_value<V>(s, r0, rows, e, input, shift);
  }
}

template <typename V>
__global__ void __launch_bounds__(kThreads, 1) patch_input_grad_kernel(PatchShape s, int64_t begin, int64_t end,
                                                                    int64_t r0, int64_t rows,
                                                                    Global<const V> grad_tile, Global<V> grad_input) {
  AECR_GRID_STRIDE_LOOP(i, begin, end) { grad_input[i] = gather_input_grad<V>(s, i, r0, rows, grad_tile); }
}

// The kernel class of fastdeconv_driver.h on CUDA (launches on the current stream; the op entry points set the
// device).
template <class L>
struct GpuFastDeconvKernels {
  static constexpr bool kSpectralForm = false;

  static bool moments(const PatchShape& s, const at::Tensor& input, double eps, at::Tensor& mean, at::Tensor& cov) {
    if (s.features > kMomentMaxFeatures) return false;
    patch_moments(L{}, s, input, eps, mean, cov);
    return true;
  }

  static void build_tile(const PatchShape& s, int64_t n0, int64_t n1, const at::Tensor& input,
                         const at::Tensor& shift, at::Tensor& tile) {
    const int64_t r0 = s.first_row(n0), rows = s.first_row(n1) - r0;
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "build_tile_cuda", [&] {
      L{}(build_tile_kernel<scalar_t>, dim3(grid_for(tile.numel())), dim3(kThreads), s, r0, rows,
          device_ptr<const scalar_t>(input), defined_ptr<const scalar_t>(shift), device_ptr<scalar_t>(tile));
    });
  }

  static void gather_input_grad(const PatchShape& s, int64_t n0, int64_t n1, int64_t r0, int64_t rows,
                                const at::Tensor& grad_tile, at::Tensor& grad_input) {
    const int64_t per_image = s.channels * s.plane();
    AT_DISPATCH_FLOATING_TYPES(grad_input.scalar_type(), "gather_input_grad_cuda", [&] {
      L{}(patch_input_grad_kernel<scalar_t>, dim3(grid_for((n1 - n0) * per_image)), dim3(kThreads), s, n0 * per_image,
          n1 * per_image, r0, rows, device_ptr<const scalar_t>(grad_tile), device_ptr<scalar_t>(grad_input));
    });
  }

  static at::Tensor ns_fused_forward(const at::Tensor& a, const at::Tensor& norm, int64_t n_iter) {
    return ns_fused_forward_launch(L{}, a, norm, n_iter);
  }

  static at::Tensor ns_fused_backward(const at::Tensor& a, const at::Tensor& norm, const at::Tensor& grad,
                                      int64_t n_iter) {
    return ns_fused_backward_launch(L{}, a, norm, grad, n_iter);
  }
};

}  // namespace
}  // namespace aecr
