// CUDA driver of deform_conv2d, the simple path (the reference of the implicit-GEMM path in
// deform_conv_implicit.cu, which AECR_DCN_CUDA_PATH=implicit selects): one thread per sampling site (image,
// offset group, tap, pixel) around the per-element math of aecr/deform_conv.h; GEMMs through at::mm (cuBLAS;
// tensor cores for fp16/bf16, TF32 when PyTorch allows it).
//
// Coordinates, bilinear weights and sums are in at::opmath_type (fp32 for fp16/bf16). The input gradient is
// a scatter: by default with atomics into an fp32 (fp64) buffer; under torch.use_deterministic_algorithms(True)
// with a sort of the scatter targets and a gather in fixed order, which gives bitwise reproducible results.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>

#include "aecr/deform_conv.h"
#include "cuda/cuda_launcher.cuh"
#include "cuda/deform_conv_gather.cuh"
#include "cuda/deform_conv_implicit.h"
#include "cuda/launch.cuh"
#include "deform_conv_args.h"

namespace aecr {
namespace {

constexpr int64_t kColumnBudget = int64_t(1) << 28;  // elements of the column buffer of one chunk

struct AtomicAdd {
  template <typename A>
  AECR_HOST_DEVICE AECR_INLINE static void add(A* dst, A v) {
#ifdef __CUDA_ARCH__
    atomicAdd(dst, v);
#else
    *dst += v;
#endif
  }
};

template <typename V>
__global__ void im2col_kernel(DeformConvShape s, int64_t n, const V* input, const V* offset, const V* mask,
                              V* columns) {
  using T = at::opmath_type<V>;
  AECR_GRID_STRIDE_LOOP(i, 0, n * s.offset_groups * s.taps() * s.pixels()) {
    const SamplingSite t = site_from_index(s, i);
    im2col_site<T>(s, n, t, input + t.b * s.channels * s.plane(), offset, mask, columns);
  }
}

template <typename V>
__global__ void offset_mask_grad_kernel(DeformConvShape s, int64_t n, const V* input, const V* offset, const V* mask,
                                        const V* grad_columns, V* grad_offset, V* grad_mask) {
  using T = at::opmath_type<V>;
  AECR_GRID_STRIDE_LOOP(i, 0, n * s.offset_groups * s.taps() * s.pixels()) {
    const SamplingSite t = site_from_index(s, i);
    offset_mask_grad_site<T>(s, n, t, input + t.b * s.channels * s.plane(), offset, mask, grad_columns, grad_offset,
                             grad_mask);
  }
}

// Default input gradient: atomics into `grad_input` of the accumulation type A.
template <typename V, typename A>
__global__ void col2im_atomic_kernel(DeformConvShape s, int64_t n, const V* offset, const V* mask,
                                     const V* grad_columns, A* grad_input) {
  using T = at::opmath_type<V>;
  AECR_GRID_STRIDE_LOOP(i, 0, n * s.offset_groups * s.taps() * s.pixels()) {
    const SamplingSite t = site_from_index(s, i);
    col2im_site<AtomicAdd, T>(s, n, t, offset, mask, grad_columns, grad_input + t.b * s.channels * s.plane());
  }
}

void check_launch() { C10_CUDA_KERNEL_LAUNCH_CHECK(); }

at::Tensor deform_conv2d_cuda(const at::Tensor& input_, const at::Tensor& weight_, const at::Tensor& offset_,
                              const std::optional<at::Tensor>& mask_, const std::optional<at::Tensor>& bias,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t groups, int64_t offset_groups) {
  const DeformConvShape s =
      check_deform_conv(input_, weight_, offset_, mask_, bias, stride, padding, dilation, groups, offset_groups);
  const c10::cuda::CUDAGuard guard(input_.device());
  const at::Tensor input = input_.contiguous(), weight = weight_.contiguous(), offset = offset_.contiguous();
  const std::optional<at::Tensor> mask = mask_.has_value() ? std::optional<at::Tensor>(mask_->contiguous()) : mask_;

  const int64_t batch = input.size(0), out_channels = weight.size(0);
  const int64_t ck = s.channels / groups * s.taps(), og_out = out_channels / groups, P = s.pixels();
  at::Tensor output = at::empty({batch, out_channels, s.out_height, s.out_width}, input.options());
  if (output.numel() == 0) return output;
  if (implicit_path_requested() && implicit_path_applies(input, weight, s, groups)) {
    return deform_conv2d_implicit(s, input, weight, offset, mask, bias, groups);
  }

  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor w = weight.view({groups, og_out, ck});
  const int64_t chunk = images_per_chunk(s, batch, kColumnBudget);
  at::Tensor buffer = at::empty({s.channels * s.taps() * chunk * P}, input.options());
  for (int64_t b0 = 0; b0 < batch; b0 += chunk) {
    const int64_t n = std::min(chunk, batch - b0);
    at::Tensor columns = buffer.narrow(0, 0, s.channels * s.taps() * n * P).view({s.channels * s.taps(), n * P});
    const int64_t sites = n * s.offset_groups * s.taps() * P;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "deform_conv2d_cuda", [&] {
      im2col_kernel<scalar_t><<<grid_for(sites), kThreads, 0, stream>>>(
          s, n, input.data_ptr<scalar_t>() + b0 * s.channels * s.plane(),
          offset.data_ptr<scalar_t>() + b0 * offset.stride(0),
          optional_data<scalar_t>(mask, b0 * (mask ? mask->stride(0) : 0)), columns.data_ptr<scalar_t>());
      check_launch();
    });
    at::Tensor out = n == 1 ? output[b0].view({out_channels, P}) : at::empty({out_channels, n * P}, input.options());
    for (int64_t g = 0; g < groups; ++g) {
      at::Tensor dst = out.narrow(0, g * og_out, og_out);
      at::mm_out(dst, w[g], columns.narrow(0, g * ck, ck));
    }
    if (n > 1) output.narrow(0, b0, n).view({n, out_channels, P}).copy_(out.view({out_channels, n, P}).transpose(0, 1));
  }
  if (bias.has_value()) output.add_(bias->view({1, out_channels, 1, 1}));
  return output;
}

// Input gradient of a chunk into grad_input (the chunk's images, zero on entry).
template <typename V>
void input_grad_chunk(const DeformConvShape& s, int64_t n, const V* offset, const V* mask, const V* grad_columns,
                      at::Tensor grad_input, cudaStream_t stream) {
  using T = at::opmath_type<V>;
  const int64_t sites = n * s.offset_groups * s.taps() * s.pixels();
  if (at::globalContext().deterministicAlgorithms()) {
    deterministic_input_grad<V>(CudaLauncher{stream}, s, n, offset, mask, grad_columns, grad_input);
    return;
  }
  if constexpr (std::is_same<T, V>::value) {
    col2im_atomic_kernel<V, T><<<grid_for(sites), kThreads, 0, stream>>>(
        s, n, offset, mask, grad_columns, grad_input.data_ptr<V>());
    check_launch();
  } else {
    at::Tensor acc = at::zeros(grad_input.sizes(), grad_input.options().dtype(c10::CppTypeToScalarType<T>::value));
    col2im_atomic_kernel<V, T><<<grid_for(sites), kThreads, 0, stream>>>(s, n, offset, mask, grad_columns,
                                                                         acc.data_ptr<T>());
    check_launch();
    grad_input.copy_(acc);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_cuda(
    const at::Tensor& grad_output_, const at::Tensor& input_, const at::Tensor& weight_, const at::Tensor& offset_,
    const std::optional<at::Tensor>& mask_, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, int64_t offset_groups) {
  const DeformConvShape s = check_deform_conv(input_, weight_, offset_, mask_, std::nullopt, stride, padding, dilation,
                                              groups, offset_groups);
  check_grad_output(grad_output_, input_, s, weight_.size(0));
  const c10::cuda::CUDAGuard guard(input_.device());
  const at::Tensor input = input_.contiguous(), weight = weight_.contiguous(), offset = offset_.contiguous();
  const at::Tensor grad_output = grad_output_.contiguous();
  const std::optional<at::Tensor> mask = mask_.has_value() ? std::optional<at::Tensor>(mask_->contiguous()) : mask_;

  const int64_t batch = input.size(0), out_channels = weight.size(0);
  const int64_t ck = s.channels / groups * s.taps(), og_out = out_channels / groups, P = s.pixels();
  at::Tensor grad_input = at::zeros_like(input);
  at::Tensor grad_offset = at::zeros_like(offset);
  at::Tensor grad_mask = mask.has_value() ? at::zeros_like(*mask) : at::empty({0}, input.options());
  // fp16/bf16 weight gradients are summed over chunks in fp32.
  at::Tensor grad_weight_acc = at::zeros(weight.sizes(), weight.options().dtype(at::toOpMathType(weight.scalar_type())));
  at::Tensor grad_bias = grad_output.sum({0, 2, 3}, /*keepdim=*/false, at::toOpMathType(grad_output.scalar_type()));
  if (batch == 0 || grad_output.numel() == 0) {
    return {grad_input, grad_weight_acc.to(weight.scalar_type()), grad_offset, grad_mask,
            grad_bias.to(weight.scalar_type())};
  }
  if (implicit_path_requested() && implicit_path_applies(input, weight, s, groups)) {
    return deform_conv2d_backward_implicit(s, grad_output, input, weight, offset, mask, groups);
  }

  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor w = weight.view({groups, og_out, ck});
  const at::Tensor gw = grad_weight_acc.view({groups, og_out, ck});
  const int64_t chunk = images_per_chunk(s, batch, kColumnBudget);
  at::Tensor buffer = at::empty({s.channels * s.taps() * chunk * P}, input.options());
  for (int64_t b0 = 0; b0 < batch; b0 += chunk) {
    const int64_t n = std::min(chunk, batch - b0);
    at::Tensor columns = buffer.narrow(0, 0, s.channels * s.taps() * n * P).view({s.channels * s.taps(), n * P});
    const at::Tensor gout = n == 1 ? grad_output[b0].view({out_channels, P})
                                   : grad_output.narrow(0, b0, n).view({n, out_channels, P}).transpose(0, 1).reshape(
                                         {out_channels, n * P});
    for (int64_t g = 0; g < groups; ++g) {
      at::Tensor dst = columns.narrow(0, g * ck, ck);
      at::mm_out(dst, w[g].t(), gout.narrow(0, g * og_out, og_out));
    }
    const int64_t sites = n * s.offset_groups * s.taps() * P;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "deform_conv2d_backward_cuda", [&] {
      const scalar_t* in = input.data_ptr<scalar_t>() + b0 * s.channels * s.plane();
      const scalar_t* off = offset.data_ptr<scalar_t>() + b0 * offset.stride(0);
      const scalar_t* msk = optional_data<scalar_t>(mask, b0 * (mask ? mask->stride(0) : 0));
      scalar_t* gmask = mask ? grad_mask.data_ptr<scalar_t>() + b0 * grad_mask.stride(0) : nullptr;
      offset_mask_grad_kernel<scalar_t><<<grid_for(sites), kThreads, 0, stream>>>(
          s, n, in, off, msk, columns.data_ptr<scalar_t>(), grad_offset.data_ptr<scalar_t>() + b0 * offset.stride(0),
          gmask);
      check_launch();
      input_grad_chunk<scalar_t>(s, n, off, msk, columns.data_ptr<scalar_t>(), grad_input.narrow(0, b0, n), stream);
      im2col_kernel<scalar_t><<<grid_for(sites), kThreads, 0, stream>>>(s, n, in, off, msk,
                                                                        columns.data_ptr<scalar_t>());
      check_launch();
    });
    for (int64_t g = 0; g < groups; ++g) {
      const at::Tensor part = at::mm(gout.narrow(0, g * og_out, og_out), columns.narrow(0, g * ck, ck).t());
      gw[g].add_(part);
    }
  }
  return {grad_input, grad_weight_acc.to(weight.scalar_type()), grad_offset, grad_mask,
          grad_bias.to(weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(aecr_ops, CUDA, m) {
  m.impl("deform_conv2d", &deform_conv2d_cuda);
  m.impl("deform_conv2d_backward", &deform_conv2d_backward_cuda);
}

}  // namespace aecr
