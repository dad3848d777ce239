// Argument checks of the deform_conv2d ops, shared by the CPU and CUDA drivers.
//
// The Python layer checks the same things with friendlier messages; these checks protect callers of
// torch.ops.aecr_ops.* directly, so that no malformed call reaches a kernel.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>

#include "aecr/deform_conv.h"

namespace aecr {

inline void check_pair(at::IntArrayRef v, const char* name, int64_t minimum) {
  TORCH_CHECK(v.size() == 2, "deform_conv2d: `", name, "` must have 2 values, got ", v.size());
  TORCH_CHECK(v[0] >= minimum && v[1] >= minimum, "deform_conv2d: `", name, "` must be >= ", minimum,
              ", got ", v);
}

// `geometry`: offset and mask, which may be float32 beside fp16 / bf16 features (as torchvision and autocast keep
// them); every other tensor has the input's dtype.
inline void check_tensor(const at::Tensor& t, const char* name, int64_t dim, const at::Tensor& input,
                         bool geometry = false) {
  TORCH_CHECK(t.dim() == dim, "deform_conv2d: `", name, "` must be ", dim, "-D, got shape ", t.sizes());
  const bool low = input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16;
  TORCH_CHECK(t.scalar_type() == input.scalar_type() || (geometry && low && t.scalar_type() == at::kFloat),
              "deform_conv2d: `", name, "` has dtype ", t.scalar_type(), " but `input` has ", input.scalar_type(),
              geometry && low ? " (offset and mask may also be float32)" : "");
  TORCH_CHECK(t.device() == input.device(), "deform_conv2d: `", name, "` is on ", t.device(), " but `input` is on ",
              input.device());
}

// Checks every argument of the forward op and returns the problem's shape.
inline DeformConvShape check_deform_conv(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t offset_groups) {
  TORCH_CHECK(input.dim() == 4, "deform_conv2d: `input` must be 4-D [B, C, H, W], got shape ", input.sizes());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), "deform_conv2d: `input` must be a floating-point tensor, got ",
              input.scalar_type());
  check_tensor(weight, "weight", 4, input);
  check_tensor(offset, "offset", 4, input, /*geometry=*/true);
  if (mask.has_value()) check_tensor(*mask, "mask", 4, input, /*geometry=*/true);
  if (bias.has_value()) check_tensor(*bias, "bias", 1, input);
  check_pair(stride, "stride", 1);
  check_pair(padding, "padding", 0);
  check_pair(dilation, "dilation", 1);

  const int64_t batch = input.size(0), channels = input.size(1);
  const int64_t out_channels = weight.size(0), kh = weight.size(2), kw = weight.size(3);
  TORCH_CHECK(kh > 0 && kw > 0, "deform_conv2d: `weight` must have a non-empty kernel, got shape ", weight.sizes());
  TORCH_CHECK(groups >= 1 && channels % groups == 0 && out_channels % groups == 0,
              "deform_conv2d: `groups`=", groups, " must divide input channels ", channels, " and output channels ",
              out_channels);
  TORCH_CHECK(weight.size(1) * groups == channels, "deform_conv2d: `weight` must have shape [C_out, C_in/groups, kh, kw]"
              " = [", out_channels, ", ", channels / groups, ", ", kh, ", ", kw, "], got ", weight.sizes());
  TORCH_CHECK(offset_groups >= 1 && channels % offset_groups == 0, "deform_conv2d: `offset_groups`=", offset_groups,
              " must divide input channels ", channels);

  const int64_t out_h = (input.size(2) + 2 * padding[0] - (dilation[0] * (kh - 1) + 1)) / stride[0] + 1;
  const int64_t out_w = (input.size(3) + 2 * padding[1] - (dilation[1] * (kw - 1) + 1)) / stride[1] + 1;
  TORCH_CHECK(out_h > 0 && out_w > 0, "deform_conv2d: the output would be empty: input ", input.size(2), "x",
              input.size(3), " with kernel ", kh, "x", kw, ", padding ", padding, ", dilation ", dilation,
              ", stride ", stride);
  const std::vector<int64_t> offset_shape{batch, 2 * offset_groups * kh * kw, out_h, out_w};
  TORCH_CHECK(offset.sizes() == at::IntArrayRef(offset_shape),
              "deform_conv2d: `offset` must have shape [B, 2*offset_groups*kh*kw, Ho, Wo] = ", offset_shape,
              ", got ", offset.sizes());
  if (mask.has_value()) {
    const std::vector<int64_t> mask_shape{batch, offset_groups * kh * kw, out_h, out_w};
    TORCH_CHECK(mask->sizes() == at::IntArrayRef(mask_shape),
                "deform_conv2d: `mask` must have shape [B, offset_groups*kh*kw, Ho, Wo] = ", mask_shape, ", got ",
                mask->sizes());
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->size(0) == out_channels, "deform_conv2d: `bias` must have shape [", out_channels, "], got ",
                bias->sizes());
  }

  DeformConvShape s;
  s.channels = channels;
  s.height = input.size(2);
  s.width = input.size(3);
  s.out_height = out_h;
  s.out_width = out_w;
  s.kernel_h = kh;
  s.kernel_w = kw;
  s.stride_h = stride[0];
  s.stride_w = stride[1];
  s.pad_h = padding[0];
  s.pad_w = padding[1];
  s.dilation_h = dilation[0];
  s.dilation_w = dilation[1];
  s.offset_groups = offset_groups;
  return s;
}

inline void check_grad_output(const at::Tensor& grad_output, const at::Tensor& input, const DeformConvShape& s,
                              int64_t out_channels) {
  check_tensor(grad_output, "grad_output", 4, input);
  const std::vector<int64_t> shape{input.size(0), out_channels, s.out_height, s.out_width};
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(shape), "deform_conv2d_backward: `grad_output` must have shape ",
              shape, ", got ", grad_output.sizes());
}

// The data of an optional tensor from an element offset on, or null when it is absent (no mask).
template <typename V>
const V* optional_data(const std::optional<at::Tensor>& t, int64_t element_offset) {
  return t.has_value() ? t->data_ptr<V>() + element_offset : nullptr;
}

// The writable data of an optional tensor, or null when it is absent (a gradient not asked for).
template <typename V>
V* mutable_data(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<V>() : nullptr;
}

// Which gradients deform_conv2d_backward computes (its `output_mask`, in the order of its results). The mask
// gradient is computed only when there is a mask.
struct DeformConvGrads {
  bool input = true, weight = true, offset = true, mask = true, bias = true;

  bool column_grad() const { return input || offset || mask; }  // needs W^T grad_out
  bool sampling() const { return offset || mask; }               // needs the offset and mask pass
};

inline DeformConvGrads check_output_mask(const c10::List<bool>& output_mask, const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(output_mask.size() == 5, "deform_conv2d_backward: `output_mask` must have 5 values (input, weight, "
              "offset, mask, bias), got ", output_mask.size());
  DeformConvGrads g;
  g.input = output_mask[0];
  g.weight = output_mask[1];
  g.offset = output_mask[2];
  g.mask = output_mask[3] && mask.has_value();
  g.bias = output_mask[4];
  return g;
}

// How the column work is cut: `images` whole images per chunk while one image's columns [C*K, P] fit `budget`
// elements, else one image per chunk and `pixels` output pixels of it (at least one).
struct ChunkPlan {
  int64_t images, pixels;
};

inline ChunkPlan plan_chunks(const DeformConvShape& s, int64_t batch, int64_t budget) {
  const int64_t rows = std::max<int64_t>(1, s.channels * s.taps()), P = s.pixels();
  if (rows * P <= budget) return ChunkPlan{std::max<int64_t>(1, std::min<int64_t>(batch, budget / (rows * P))), P};
  return ChunkPlan{1, std::max<int64_t>(1, budget / rows)};
}

// Calls fn(first image, chunk) for every chunk of the plan, images in order and pixels in order within one.
template <class Fn>
void for_each_chunk(const DeformConvShape& s, int64_t batch, const ChunkPlan& plan, const Fn& fn) {
  const int64_t P = s.pixels();
  for (int64_t b0 = 0; b0 < batch; b0 += plan.images) {
    const int64_t n = std::min(plan.images, batch - b0);
    for (int64_t p0 = 0; p0 < P; p0 += plan.pixels) fn(b0, ColumnChunk{n, p0, std::min(plan.pixels, P - p0)});
  }
}

}  // namespace aecr
