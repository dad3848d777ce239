// deform_conv2d's algorithm, written once for the CPU and for CUDA's default ("simple") path: for each chunk of
// images, the columns [C*K, n*P] are sampled from the input and multiplied by the weight (at::mm: MKL, cuBLAS);
// in the backward the column gradient W^T grad_out is scattered back to the input, reduced per sampling site
// into the offset and mask gradients, and (turned back into the columns) multiplied by grad_out for the weight
// gradient.
//
// The per-element work is a kernel class (cpu/deform_conv_cpu.cpp; cuda/deform_conv_kernels.cuh, which the CUDA
// build and the CPU emulator of tests/cuda_emulation both use). For one chunk of n images, with offset, mask
// (optional), input and the gradients narrowed to the chunk, all contiguous:
//
//   int64_t column_budget() const                           elements of one chunk's column buffer
//   at::Tensor workspace(int64_t numel, const at::TensorOptions&) const
//   void im2col(s, n, input, offset, mask, columns) const
//   void input_grad(s, n, offset, mask, grad_columns, grad_input) const      (grad_input is zero on entry)
//   void offset_mask_grad(s, n, input, offset, mask, columns, grad_offset, grad_mask) const
//        reads the column gradient from `columns` and leaves the columns themselves there
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <optional>
#include <tuple>

#include "aecr/deform_conv.h"
#include "deform_conv_args.h"

namespace aecr {

inline std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : t;
}

// Images [b0, b0 + n) of a batch.
inline std::optional<at::Tensor> images(const std::optional<at::Tensor>& t, int64_t b0, int64_t n) {
  return t.has_value() ? std::optional<at::Tensor>(t->narrow(0, b0, n)) : t;
}

// The forward op's result for checked arguments of shape `s`.
template <class K>
at::Tensor deform_conv2d_forward(const K& kernels, const DeformConvShape& s, const at::Tensor& input_,
                                 const at::Tensor& weight_, const at::Tensor& offset_,
                                 const std::optional<at::Tensor>& mask_, const std::optional<at::Tensor>& bias,
                                 int64_t groups) {
  const at::Tensor input = input_.contiguous(), weight = weight_.contiguous(), offset = offset_.contiguous();
  const std::optional<at::Tensor> mask = contiguous(mask_);
  const int64_t batch = input.size(0), out_channels = weight.size(0);
  const int64_t ck = s.channels / groups * s.taps(), og_out = out_channels / groups, P = s.pixels();
  at::Tensor output = at::empty({batch, out_channels, s.out_height, s.out_width}, input.options());
  if (output.numel() == 0) return output;

  const at::Tensor w = weight.view({groups, og_out, ck});
  const int64_t chunk = images_per_chunk(s, batch, kernels.column_budget());
  const at::Tensor buffer = kernels.workspace(s.channels * s.taps() * chunk * P, input.options());
  for (int64_t b0 = 0; b0 < batch; b0 += chunk) {
    const int64_t n = std::min(chunk, batch - b0);
    at::Tensor columns = buffer.narrow(0, 0, s.channels * s.taps() * n * P).view({s.channels * s.taps(), n * P});
    kernels.im2col(s, n, input.narrow(0, b0, n), offset.narrow(0, b0, n), images(mask, b0, n), columns);
    // One image: the GEMM writes straight into the output; several: into [C_out, n*P], then transposed.
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

// (grad_input, grad_weight, grad_offset, grad_mask, grad_bias) for checked arguments of shape `s`; grad_mask is
// empty without a mask. Weight and bias gradients of fp16 / bf16 are summed in fp32.
template <class K>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward(
    const K& kernels, const DeformConvShape& s, const at::Tensor& grad_output_, const at::Tensor& input_,
    const at::Tensor& weight_, const at::Tensor& offset_, const std::optional<at::Tensor>& mask_, int64_t groups) {
  const at::Tensor input = input_.contiguous(), weight = weight_.contiguous(), offset = offset_.contiguous();
  const at::Tensor grad_output = grad_output_.contiguous();
  const std::optional<at::Tensor> mask = contiguous(mask_);
  const int64_t batch = input.size(0), out_channels = weight.size(0);
  const int64_t ck = s.channels / groups * s.taps(), og_out = out_channels / groups, P = s.pixels();
  const at::ScalarType acc_type = at::toOpMathType(weight.scalar_type());

  at::Tensor grad_input = at::zeros_like(input);
  at::Tensor grad_offset = at::zeros_like(offset);
  at::Tensor grad_mask = mask.has_value() ? at::zeros_like(*mask) : at::empty({0}, input.options());
  at::Tensor grad_weight = at::zeros(weight.sizes(), weight.options().dtype(acc_type));
  const at::Tensor grad_bias = grad_output.sum({0, 2, 3}, /*keepdim=*/false, acc_type).to(weight.scalar_type());
  if (batch == 0 || grad_output.numel() == 0) {
    return {grad_input, grad_weight.to(weight.scalar_type()), grad_offset, grad_mask, grad_bias};
  }

  const at::Tensor w = weight.view({groups, og_out, ck});
  const at::Tensor gw = grad_weight.view({groups, og_out, ck});
  const int64_t chunk = images_per_chunk(s, batch, kernels.column_budget());
  const int64_t rows = s.channels * s.taps();
  const at::Tensor buffer = kernels.workspace(rows * chunk * P, input.options());
  for (int64_t b0 = 0; b0 < batch; b0 += chunk) {
    const int64_t n = std::min(chunk, batch - b0);
    at::Tensor columns = buffer.narrow(0, 0, rows * n * P).view({rows, n * P});
    const at::Tensor gout = n == 1 ? grad_output[b0].view({out_channels, P})
                                   : grad_output.narrow(0, b0, n).view({n, out_channels, P}).transpose(0, 1).reshape(
                                         {out_channels, n * P});
    for (int64_t g = 0; g < groups; ++g) {  // the column gradient W^T grad_out, per weight group
      at::Tensor dst = columns.narrow(0, g * ck, ck);
      at::mm_out(dst, w[g].t(), gout.narrow(0, g * og_out, og_out));
    }
    const at::Tensor offset_n = offset.narrow(0, b0, n);
    const std::optional<at::Tensor> mask_n = images(mask, b0, n);
    kernels.input_grad(s, n, offset_n, mask_n, columns, grad_input.narrow(0, b0, n));
    kernels.offset_mask_grad(s, n, input.narrow(0, b0, n), offset_n, mask_n, columns, grad_offset.narrow(0, b0, n),
                             mask.has_value() ? std::optional<at::Tensor>(grad_mask.narrow(0, b0, n)) : std::nullopt);
    for (int64_t g = 0; g < groups; ++g) {
      const at::Tensor a = gout.narrow(0, g * og_out, og_out), b = columns.narrow(0, g * ck, ck).t();
      if (acc_type == weight.scalar_type()) {
        gw[g].addmm_(a, b);
      } else {
        gw[g].add_(at::mm(a, b));
      }
    }
  }
  return {grad_input, grad_weight.to(weight.scalar_type()), grad_offset, grad_mask, grad_bias};
}

}  // namespace aecr
