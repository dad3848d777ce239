// The CUDA kernels of deform_conv2d's default ("simple") path and their kernel class for deform_conv_driver.h,
// written over a launcher (cuda_launcher.cuh on the GPU, tests/cuda_emulation's EmulatedLauncher on the CPU):
// one thread per sampling site (image, offset group, tap, pixel) around the per-element math of
// aecr/deform_conv.h.
//
// Coordinates, bilinear weights and sums are in at::opmath_type (fp32 for fp16/bf16). The input gradient is a
// scatter into the driver's accumulator of that type: by default with atomics; in deterministic mode with a sort of the scatter
// targets and a gather in fixed order (deform_conv_gather.cuh), which gives bitwise reproducible results.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <optional>
#include <type_traits>

#include "aecr/deform_conv.h"
#include "cuda/deform_conv_gather.cuh"
#include "cuda/device_memory.cuh"
#include "cuda/launch.cuh"

namespace aecr {
namespace {

constexpr int64_t kColumnBudget = int64_t(1) << 28;  // elements of the column buffer of one chunk

struct AtomicAdd {
  template <typename P, typename A>
  AECR_HOST_DEVICE AECR_INLINE static void add(P dst, A v) {
#if defined(__CUDA_ARCH__) || defined(AECR_CUDA_EMULATION)
    atomicAdd(dst, v);
#else
    *dst += v;  // the host pass of nvcc: never runs
#endif
  }
};

template <typename V>
__global__ void __launch_bounds__(kThreads, kSamplingBlocks<V>) im2col_kernel(DeformConvShape s, ColumnChunk chunk,
                                                          Global<const V> input,
                                                          Global<const at::opmath_type<V>> offset,
                                                          Global<const at::opmath_type<V>> mask, Global<V> columns) {
  using T = at::opmath_type<V>;
  AECR_GRID_STRIDE_LOOP(i, 0, chunk.sites(s)) {
    const SamplingSite t = site_from_index(s, chunk, i);
    im2col_site<T>(s, chunk, t, input + t.b * s.channels * s.plane(), offset, mask, columns);
  }
}

// Reads the column gradient from `columns` and leaves the columns there. Either gradient may be null.
template <typename V>
__global__ void __launch_bounds__(kThreads, kSamplingBlocks<V>) offset_mask_grad_kernel(DeformConvShape s, ColumnChunk chunk,
                                                                    Global<const V> input,
                                                                    Global<const at::opmath_type<V>> offset,
                                                                    Global<const at::opmath_type<V>> mask,
                                                                    Global<V> columns,
                                                                    Global<at::opmath_type<V>> grad_offset,
                                                                    Global<at::opmath_type<V>> grad_mask) {
  using T = at::opmath_type<V>;
  AECR_GRID_STRIDE_LOOP(i, 0, chunk.sites(s)) {
    const SamplingSite t = site_from_index(s, chunk, i);
    offset_mask_grad_site<T>(s, chunk, t, input + t.b * s.channels * s.plane(), offset, mask, columns, grad_offset,
                             grad_mask);
  }
}

// Default input gradient: atomics into `grad_input` of the accumulation type A.
template <typename V, typename A>
__global__ void __launch_bounds__(kThreads, kScatterBlocks) col2im_atomic_kernel(DeformConvShape s, ColumnChunk chunk,
                                                                 Global<const at::opmath_type<V>> offset,
                                                                 Global<const at::opmath_type<V>> mask,
                                                                 Global<const V> grad_columns, Global<A> grad_input) {
  using T = at::opmath_type<V>;
  AECR_GRID_STRIDE_LOOP(i, 0, chunk.sites(s)) {
    const SamplingSite t = site_from_index(s, chunk, i);
    col2im_site<AtomicAdd, T>(s, chunk, t, offset, mask, grad_columns, grad_input + t.b * s.channels * s.plane());
  }
}

// The kernel class of deform_conv_driver.h on CUDA. `deterministic`: the input gradient without atomics.
template <class L>
struct GpuDeformConvKernels {
  L launch;
  bool deterministic = false;
  int64_t budget = kColumnBudget;

  int64_t column_budget(const at::TensorOptions&) const { return budget; }
  at::Tensor workspace(int64_t numel, const at::TensorOptions& options) const { return at::empty({numel}, options); }

  void im2col(const DeformConvShape& s, const ColumnChunk& c, const at::Tensor& input, const at::Tensor& offset,
              const std::optional<at::Tensor>& mask, at::Tensor& columns) const {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "deform_conv2d_cuda", [&] {
      using T = at::opmath_type<scalar_t>;
      launch(im2col_kernel<scalar_t>, dim3(grid_for(c.sites(s))), dim3(kThreads), s, c,
             device_ptr<const scalar_t>(input), device_ptr<const T>(offset), optional_ptr<const T>(mask),
             device_ptr<scalar_t>(columns));
    });
  }

  // Adds the chunk's input gradient into `grad_input`, of the accumulation type (fp32 for fp16 / bf16: the
  // driver's accumulator).
  void input_grad(const DeformConvShape& s, const ColumnChunk& c, const at::Tensor& offset,
                  const std::optional<at::Tensor>& mask, const at::Tensor& grad_columns, at::Tensor grad_input) const {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_columns.scalar_type(), "deform_conv2d_backward_cuda", [&] {
      using V = scalar_t;
      using T = at::opmath_type<V>;
      TORCH_INTERNAL_ASSERT(grad_input.scalar_type() == c10::CppTypeToScalarType<T>::value);
      if (deterministic) {
        deterministic_input_grad<V>(launch, s, c, offset, mask, grad_columns, grad_input);
        return;
      }
      launch(col2im_atomic_kernel<V, T>, dim3(grid_for(c.sites(s))), dim3(kThreads), s, c,
             device_ptr<const T>(offset), optional_ptr<const T>(mask), device_ptr<const V>(grad_columns),
             device_ptr<T>(grad_input));
    });
  }

  void offset_mask_grad(const DeformConvShape& s, const ColumnChunk& c, const at::Tensor& input,
                        const at::Tensor& offset, const std::optional<at::Tensor>& mask, at::Tensor& columns,
                        const std::optional<at::Tensor>& grad_offset, const std::optional<at::Tensor>& grad_mask) const {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "deform_conv2d_backward_cuda", [&] {
      using T = at::opmath_type<scalar_t>;
      launch(offset_mask_grad_kernel<scalar_t>, dim3(grid_for(c.sites(s))), dim3(kThreads), s, c,
             device_ptr<const scalar_t>(input), device_ptr<const T>(offset), optional_ptr<const T>(mask),
             device_ptr<scalar_t>(columns), optional_ptr<T>(grad_offset), optional_ptr<T>(grad_mask));
    });
  }
};

}  // namespace
}  // namespace aecr
