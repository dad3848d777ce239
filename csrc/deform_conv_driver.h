// deform_conv2d's algorithm, written once for the CPU and for CUDA's default ("simple") path: for each chunk (of
// images, or of the pixels of one image when an image's columns exceed the budget), the columns [C*K, width] are
// sampled from the input and multiplied by the weight (at::mm: MKL, cuBLAS); in the backward the column gradient
// W^T grad_out is scattered back to the input, reduced per sampling site into the offset and mask gradients, and
// (turned back into the columns) multiplied by grad_out for the weight gradient. The backward does only the work
// of the gradients asked for (DeformConvGrads).
//
// The per-element work is a kernel class (cpu/deform_conv_cpu.cpp; cuda/deform_conv_kernels.cuh, which the CUDA
// build and the CPU emulator of tests/cuda_emulation both use). For one chunk c (ColumnChunk: n images, a pixel
// range of each), with offset, mask (optional), input and the gradients narrowed to the chunk's images, all
// contiguous:
//
//   int64_t column_budget(const at::TensorOptions&) const   elements of one chunk's column buffer
//   at::Tensor workspace(int64_t numel, const at::TensorOptions&) const
//   void im2col(s, c, input, offset, mask, columns) const
//   void input_grad(s, c, offset, mask, grad_columns, grad_input) const      adds into grad_input
//   void offset_mask_grad(s, c, input, offset, mask, columns, grad_offset, grad_mask) const
//        reads the column gradient from `columns` and leaves the columns themselves there; either gradient
//        may be absent (std::nullopt)
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
  const int64_t rows = s.channels * s.taps();
  at::Tensor output = at::empty({batch, out_channels, s.out_height, s.out_width}, input.options());
  if (output.numel() == 0) return output;

  const at::Tensor w = weight.view({groups, og_out, ck});
  const ChunkPlan plan = plan_chunks(s, batch, kernels.column_budget(input.options()));
  const at::Tensor buffer = kernels.workspace(rows * plan.images * plan.pixels, input.options());
  for_each_chunk(s, batch, plan, [&](int64_t b0, const ColumnChunk& c) {
    at::Tensor columns = buffer.narrow(0, 0, rows * c.width()).view({rows, c.width()});
    kernels.im2col(s, c, input.narrow(0, b0, c.images), offset.narrow(0, b0, c.images), images(mask, b0, c.images),
                   columns);
    // One image: the GEMM writes straight into the output (its pixel range); several: into [C_out, n*P], then
    // transposed.
    at::Tensor out = c.images == 1 ? output[b0].view({out_channels, P}).narrow(1, c.pixel_begin, c.pixels)
                                   : at::empty({out_channels, c.width()}, input.options());
    for (int64_t g = 0; g < groups; ++g) {
      at::Tensor dst = out.narrow(0, g * og_out, og_out);
      at::mm_out(dst, w[g], columns.narrow(0, g * ck, ck));
    }
    if (c.images > 1) {
      output.narrow(0, b0, c.images).view({c.images, out_channels, P}).copy_(
          out.view({out_channels, c.images, P}).transpose(0, 1));
    }
  });
  if (bias.has_value()) output.add_(bias->view({1, out_channels, 1, 1}));
  return output;
}

// (grad_input, grad_weight, grad_offset, grad_mask, grad_bias) for checked arguments of shape `s`. A gradient
// not asked for in `needed`, and grad_mask without a mask, is an empty tensor [0] and costs nothing. Weight and
// bias gradients of fp16 / bf16 are summed in fp32.
template <class K>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward(
    const K& kernels, const DeformConvShape& s, const at::Tensor& grad_output_, const at::Tensor& input_,
    const at::Tensor& weight_, const at::Tensor& offset_, const std::optional<at::Tensor>& mask_, int64_t groups,
    const DeformConvGrads& needed) {
  const at::Tensor input = input_.contiguous(), weight = weight_.contiguous(), offset = offset_.contiguous();
  const at::Tensor grad_output = grad_output_.contiguous();
  const std::optional<at::Tensor> mask = contiguous(mask_);
  const int64_t batch = input.size(0), out_channels = weight.size(0);
  const int64_t ck = s.channels / groups * s.taps(), og_out = out_channels / groups, P = s.pixels();
  const at::ScalarType acc_type = at::toOpMathType(weight.scalar_type());
  const auto none = [&] { return at::empty({0}, input.options()); };  // a new one for each: outputs must not alias

  at::Tensor grad_input = needed.input ? at::zeros_like(input) : none();
  at::Tensor grad_offset = needed.offset ? at::zeros_like(offset) : none();
  at::Tensor grad_mask = needed.mask ? at::zeros_like(*mask) : none();
  at::Tensor grad_weight = needed.weight ? at::zeros(weight.sizes(), weight.options().dtype(acc_type)) : none();
  const at::Tensor grad_bias =
      needed.bias ? grad_output.sum({0, 2, 3}, /*keepdim=*/false, acc_type).to(weight.scalar_type()) : none();
  const auto result = [&] {
    return std::make_tuple(grad_input, grad_weight.to(weight.scalar_type()), grad_offset, grad_mask, grad_bias);
  };
  if (batch == 0 || grad_output.numel() == 0 || !(needed.column_grad() || needed.weight)) return result();

  const at::Tensor w = weight.view({groups, og_out, ck});
  const at::Tensor gw = needed.weight ? grad_weight.view({groups, og_out, ck}) : at::Tensor();
  const int64_t rows = s.channels * s.taps();
  const ChunkPlan plan = plan_chunks(s, batch, kernels.column_budget(input.options()));
  const at::Tensor buffer = kernels.workspace(rows * plan.images * plan.pixels, input.options());
  for_each_chunk(s, batch, plan, [&](int64_t b0, const ColumnChunk& c) {
    at::Tensor columns = buffer.narrow(0, 0, rows * c.width()).view({rows, c.width()});
    const at::Tensor gout =
        c.images == 1 ? grad_output[b0].view({out_channels, P}).narrow(1, c.pixel_begin, c.pixels)
                      : grad_output.narrow(0, b0, c.images).view({c.images, out_channels, P}).transpose(0, 1).reshape(
                            {out_channels, c.width()});
    const at::Tensor input_n = input.narrow(0, b0, c.images), offset_n = offset.narrow(0, b0, c.images);
    const std::optional<at::Tensor> mask_n = images(mask, b0, c.images);
    if (needed.column_grad()) {
      for (int64_t g = 0; g < groups; ++g) {  // the column gradient W^T grad_out, per weight group
        at::Tensor dst = columns.narrow(0, g * ck, ck);
        at::mm_out(dst, w[g].t(), gout.narrow(0, g * og_out, og_out));
      }
      if (needed.input) kernels.input_grad(s, c, offset_n, mask_n, columns, grad_input.narrow(0, b0, c.images));
      if (needed.sampling()) {
        kernels.offset_mask_grad(s, c, input_n, offset_n, mask_n, columns,
                                 needed.offset ? std::optional<at::Tensor>(grad_offset.narrow(0, b0, c.images))
                                               : std::nullopt,
                                 needed.mask ? std::optional<at::Tensor>(grad_mask.narrow(0, b0, c.images))
                                             : std::nullopt);
      } else if (needed.weight) {
        kernels.im2col(s, c, input_n, offset_n, mask_n, columns);
      }
    } else {  // the weight gradient alone: the columns, no column gradient
      kernels.im2col(s, c, input_n, offset_n, mask_n, columns);
    }
    if (!needed.weight) return;
    for (int64_t g = 0; g < groups; ++g) {
      const at::Tensor a = gout.narrow(0, g * og_out, og_out), b = columns.narrow(0, g * ck, ck).t();
      if (acc_type == weight.scalar_type()) {
        gw[g].addmm_(a, b);
      } else {
        gw[g].add_(at::mm(a, b));
      }
    }
  });
  return result();
}

}  // namespace aecr
