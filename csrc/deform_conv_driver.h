// deform_conv2d's algorithms, written once over device kernel classes.
//
// 1. Column chunks (CUDA's default, "simple", path): for each chunk (of images, or of the pixels of one image when
//    an image's columns exceed the budget), the columns [C*K, width] are sampled from the input and multiplied by
//    the weight (at::mm: cuBLAS); in the backward the column gradient W^T grad_out is scattered back to the input,
//    reduced per sampling site into the offset and mask gradients, and (turned back into the columns) multiplied
//    by grad_out for the weight gradient.
// 2. Pixel tiles of channels-last rows (the CPU): the input is read channels-last ([B, H, W, C]), so that a
//    bilinear corner is one contiguous row of channels. The output pixels are cut into tiles whose column rows
//    [pixels, C*K] fit in the cache (TilePlan); each tile is sampled and at once multiplied by the packed weight
//    [C_out, K*C/groups] into its output rows, so the columns never travel to main memory. The backward runs the
//    same tiles over chunks of rows within a budget: the tile's column gradient (grad_out rows x packed weight),
//    the offset and mask gradients from it while it is in cache, then per chunk the input-gradient scatter and
//    one weight-gradient GEMM.
// Both do only the work of the gradients asked for (DeformConvGrads).
//
// The per-element work is a kernel class. Column chunks (cuda/deform_conv_kernels.cuh, which the CUDA build and
// the CPU emulator of tests/cuda_emulation both use): for one chunk c (ColumnChunk: n images, a pixel range of
// each), with offset, mask (optional), input and the gradients narrowed to the chunk's images, all contiguous:
//
//   int64_t column_budget(const at::TensorOptions&) const   elements of one chunk's column buffer
//   at::Tensor workspace(int64_t numel, const at::TensorOptions&) const
//   void im2col(s, c, input, offset, mask, columns) const
//   void input_grad(s, c, offset, mask, grad_columns, grad_input) const
//        adds into grad_input, of the accumulation type (fp32 for fp16 / bf16)
//   void offset_mask_grad(s, c, input, offset, mask, columns, grad_offset, grad_mask) const
//        reads the column gradient from `columns` and leaves the columns themselves there; either gradient
//        may be absent (std::nullopt)
//
// Pixel tiles (cpu/deform_conv_cpu.cpp), over a RowsInput (channels-last features, offset, mask):
//
//   int64_t tile_budget(const at::TensorOptions&) const      elements of one tile's column rows
//   int64_t column_budget(const at::TensorOptions&) const    elements of one backward chunk's buffers together
//   at::Tensor workspace(int64_t numel, const at::TensorOptions&) const
//   at::Tensor relaid(t, memory_format) const                t.contiguous(memory_format), done faster
//   void linear(dst, a, b, accumulate) const      dst = a b^T, or dst += a b^T (a [M, K], b [N, K]): the GEMMs
//   void transpose_into(src, dst) const           dst = src^T (src [m, n], dst [n, m], rows of unit stride)
//   void for_each_tile(plan, first, end, scratch_numel, options, body) const
//        calls body(i, scratch) for the tiles i in [first, end) of the plan, in parallel where it can, each call
//        with `scratch_numel` elements of its own
//   void sample_rows(s, layout, input, tile, columns) const            columns [tile.pixels, layout.row]
//   void add_bias(out, bias, rows) const
//        adds the bias to a tile's output: rows [pixels, C_out] (rows) or columns [C_out, pixels]
//   void sampling_grad_rows(s, layout, input, tile, grad_columns, columns, grad_offset, grad_mask) const
//        offset and mask gradients from the tile's column gradient rows; its column rows too when `columns` is
//        given; either gradient may be absent
//   void scatter_rows(s, layout, input, plan, first, end, grad_columns, grad_features) const
//        the input gradient of the tiles [first, end) from their column-gradient rows (the chunk's), added
//        into grad_features (channels-last)
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <optional>
#include <tuple>
#include <vector>

#include "aecr/deform_conv.h"
#include "deform_conv_args.h"

namespace aecr {

inline std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : t;
}

// The geometry (offset, mask) contiguous in `dtype`: the CUDA kernels read it in the features' accumulation type
// (float32 for fp16 / bf16 features, which may come with float32 offsets: autocast keeps them so), so that sampling
// positions never carry the features' rounding.
inline at::Tensor geometry(const at::Tensor& t, at::ScalarType dtype) { return t.to(dtype).contiguous(); }
inline std::optional<at::Tensor> geometry(const std::optional<at::Tensor>& t, at::ScalarType dtype) {
  return t.has_value() ? std::optional<at::Tensor>(geometry(*t, dtype)) : t;
}

// A geometry gradient back in the dtype of the caller's geometry tensor `like` (none: left as it is).
inline at::Tensor in_dtype_of(const at::Tensor& grad, const std::optional<at::Tensor>& like) {
  return like.has_value() ? grad.to(like->scalar_type()) : grad;
}

// After column chunk c of the images [b0, b0 + c.images): when it was their last pixel chunk, rounds their input
// gradient, summed in the float32 accumulator `sum` ([images of a chunk, C, H, W]), into grad_input once and
// clears the accumulator for the next images.
inline void flush_input_sum(at::Tensor& sum, at::Tensor& grad_input, int64_t b0, const ColumnChunk& c,
                            int64_t pixels) {
  if (c.pixel_begin + c.pixels != pixels) return;
  grad_input.narrow(0, b0, c.images).copy_(sum.narrow(0, 0, c.images));
  if (b0 + c.images < grad_input.size(0)) sum.zero_();
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
  const at::Tensor input = input_.contiguous(), weight = weight_.contiguous();
  const at::Tensor offset = geometry(offset_, at::toOpMathType(input.scalar_type()));
  const std::optional<at::Tensor> mask = geometry(mask_, at::toOpMathType(input.scalar_type()));
  const int64_t batch = input.size(0), out_channels = weight.size(0);
  const int64_t ck = s.channels / groups * s.taps(), og_out = out_channels / groups, P = s.pixels();
  const int64_t rows = s.channels * s.taps();
  at::Tensor output = at::empty({batch, out_channels, s.out_height, s.out_width}, input.options());
  if (output.numel() == 0) return output;

  const at::Tensor w = weight.view({groups, og_out, ck});
  const ChunkPlan plan = plan_chunks(s, batch, kernels.column_budget(input.options()));
  const at::Tensor buffer = kernels.workspace(rows * plan.images * plan.pixels, input.options());
  // The GEMMs write straight into each image's output [C_out, P] (its pixel range), with the bias as the GEMM's
  // C operand (beta 1), so that fp16 / bf16 outputs are rounded once (review R6: a transposed copy of several
  // images' products, and the bias added in a second pass in the low dtype).
  const std::optional<at::Tensor> bias_ = contiguous(bias);
  for_each_chunk(s, batch, plan, [&](int64_t b0, const ColumnChunk& c) {
    at::Tensor columns = buffer.narrow(0, 0, rows * c.width()).view({rows, c.width()});
    kernels.im2col(s, c, input.narrow(0, b0, c.images), offset.narrow(0, b0, c.images), images(mask, b0, c.images),
                   columns);
    for (int64_t i = 0; i < c.images; ++i) {
      const at::Tensor out = output[b0 + i].view({out_channels, P}).narrow(1, c.pixel_begin, c.pixels);
      const at::Tensor cols = columns.narrow(1, i * c.pixels, c.pixels);
      for (int64_t g = 0; g < groups; ++g) {
        at::Tensor dst = out.narrow(0, g * og_out, og_out);
        const at::Tensor x = cols.narrow(0, g * ck, ck);
        if (bias_.has_value()) {
          const at::Tensor b = bias_->narrow(0, g * og_out, og_out).view({og_out, 1}).expand({og_out, c.pixels});
          at::addmm_out(dst, b, w[g], x);
        } else {
          at::mm_out(dst, w[g], x);
        }
      }
    }
  });
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
  const at::Tensor input = input_.contiguous(), weight = weight_.contiguous();
  const at::Tensor offset = geometry(offset_, at::toOpMathType(input.scalar_type()));
  const at::Tensor grad_output = grad_output_.contiguous();
  const std::optional<at::Tensor> mask = geometry(mask_, at::toOpMathType(input.scalar_type()));
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
  // The geometry's gradients in the geometry's own dtypes.
  const auto result = [&] {
    return std::make_tuple(grad_input, grad_weight.to(weight.scalar_type()), in_dtype_of(grad_offset, offset_),
                           in_dtype_of(grad_mask, mask_), grad_bias);
  };
  if (batch == 0 || grad_output.numel() == 0 || !(needed.column_grad() || needed.weight)) return result();

  const at::Tensor w = weight.view({groups, og_out, ck});
  const at::Tensor gw = needed.weight ? grad_weight.view({groups, og_out, ck}) : at::Tensor();
  const int64_t rows = s.channels * s.taps();
  const ChunkPlan plan = plan_chunks(s, batch, kernels.column_budget(input.options()));
  const at::Tensor buffer = kernels.workspace(rows * plan.images * plan.pixels, input.options());
  // The input gradient is summed in the accumulation type: for fp16 / bf16 in one fp32 buffer of a chunk's images
  // (at most the column budget / K elements), which each of their pixel chunks adds into and which is rounded into
  // grad_input once, after their last.
  const at::ScalarType input_acc = at::toOpMathType(input.scalar_type());
  const bool low_input = needed.input && input_acc != input.scalar_type();
  at::Tensor input_sum = low_input ? at::zeros({plan.images, s.channels, s.height, s.width},
                                               input.options().dtype(input_acc))
                                   : at::Tensor();
  // fp16 / bf16: each image's weight-gradient product in fp32, added into the fp32 sum (rounded once, at the end).
  at::Tensor product = needed.weight && acc_type != weight.scalar_type()
                           ? at::empty({og_out, ck}, weight.options().dtype(acc_type))
                           : at::Tensor();
  for_each_chunk(s, batch, plan, [&](int64_t b0, const ColumnChunk& c) {
    at::Tensor columns = buffer.narrow(0, 0, rows * c.width()).view({rows, c.width()});
    // Image i of the chunk: its grad_output [C_out, pixels] (a view, no transposed copy) and its columns.
    const auto gout = [&](int64_t i) {
      return grad_output[b0 + i].view({out_channels, P}).narrow(1, c.pixel_begin, c.pixels);
    };
    const auto image_columns = [&](int64_t i) { return columns.narrow(1, i * c.pixels, c.pixels); };
    const at::Tensor input_n = input.narrow(0, b0, c.images), offset_n = offset.narrow(0, b0, c.images);
    const std::optional<at::Tensor> mask_n = images(mask, b0, c.images);
    if (needed.column_grad()) {
      for (int64_t i = 0; i < c.images; ++i) {
        for (int64_t g = 0; g < groups; ++g) {  // the column gradient W^T grad_out, per image and weight group
          at::Tensor dst = image_columns(i).narrow(0, g * ck, ck);
          at::mm_out(dst, w[g].t(), gout(i).narrow(0, g * og_out, og_out));
        }
      }
      if (needed.input) {
        kernels.input_grad(s, c, offset_n, mask_n, columns,
                           low_input ? input_sum.narrow(0, 0, c.images) : grad_input.narrow(0, b0, c.images));
        if (low_input) flush_input_sum(input_sum, grad_input, b0, c, P);
      }
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
    for (int64_t i = 0; i < c.images; ++i) {
      for (int64_t g = 0; g < groups; ++g) {
        const at::Tensor a = gout(i).narrow(0, g * og_out, og_out), b = image_columns(i).narrow(0, g * ck, ck).t();
        if (acc_type == weight.scalar_type()) {
          gw[g].addmm_(a, b);
        } else {
          gw[g].add_(at::mm_out(product, a, b, acc_type));  // cuBLAS: fp32 output, no rounding
        }
      }
    }
  });
  return result();
}

// ---- Pixel tiles of channels-last rows ------------------------------------------------------------------------

// Channels of one offset group within one weight group: the input channels [channel, channel + count) of offset
// group `group` go to the columns [column + k * tap_stride, + count) of a pixel's row, for tap k.
struct ChannelRun {
  int64_t group, channel, count, column;
};

// A pixel's column row: [groups][K][C / groups] (weight group, tap, channel), so that weight group g's columns
// [g * group_columns, (g + 1) * group_columns) meet the packed weight's rows of that group.
struct RowLayout {
  int64_t row, tap_stride, group_columns;
  std::vector<ChannelRun> runs;      // by offset group, then channel
  std::vector<int64_t> tap_h, tap_w;  // each tap's place in the kernel window: i * dilation_h, j * dilation_w
};

inline RowLayout row_layout(const DeformConvShape& s, int64_t groups) {
  RowLayout layout;
  layout.tap_stride = s.channels / groups;
  layout.group_columns = s.taps() * layout.tap_stride;
  layout.row = groups * layout.group_columns;
  for (int64_t k = 0; k < s.taps(); ++k) {
    layout.tap_h.push_back(k / s.kernel_w * s.dilation_h);
    layout.tap_w.push_back(k % s.kernel_w * s.dilation_w);
  }
  const int64_t cpg = s.channels_per_offset_group();
  for (int64_t g = 0; g < s.offset_groups; ++g) {
    for (int64_t c = g * cpg; c < (g + 1) * cpg;) {
      const int64_t weight_group = c / layout.tap_stride;
      const int64_t end = std::min((g + 1) * cpg, (weight_group + 1) * layout.tap_stride);
      layout.runs.push_back(
          ChannelRun{g, c, end - c, weight_group * layout.group_columns + (c - weight_group * layout.tap_stride)});
      c = end;
    }
  }
  return layout;
}

// The weight as rows [C_out, K * C / groups] in the column rows' order (tap, then channel).
inline at::Tensor packed_weight(const at::Tensor& weight) {
  return weight.permute({0, 2, 3, 1}).contiguous().view({weight.size(0), -1});
}

// The packed weight's gradient [C_out, K * C / groups] back in the weight's shape [C_out, C / groups, kh, kw].
inline at::Tensor unpacked_weight(const at::Tensor& packed, const at::Tensor& weight) {
  return packed.view({weight.size(0), weight.size(2), weight.size(3), weight.size(1)}).permute({0, 3, 1, 2})
      .contiguous();
}

// Output pixels [pixel_begin, pixel_begin + pixels) of image b; row() is the first one's row in [B * P] order.
struct PixelTile {
  int64_t b, pixel_begin, pixels;
};

// Tiles of `tile_pixels` pixels of one image each (an image's last may be shorter), numbered image by image.
struct TilePlan {
  int64_t tile_pixels, tiles_per_image, batch, image_pixels;

  int64_t count() const { return batch * tiles_per_image; }
  PixelTile tile(int64_t i) const {
    const int64_t b = i / tiles_per_image, p0 = (i % tiles_per_image) * tile_pixels;
    return PixelTile{b, p0, std::min(tile_pixels, image_pixels - p0)};
  }
  int64_t row(int64_t i) const {  // the first row of tile i (end: the rows of every tile before i)
    return i >= count() ? batch * image_pixels : (i / tiles_per_image) * image_pixels + (i % tiles_per_image) * tile_pixels;
  }
};

// Tiles of about `budget` elements of column rows [pixels, row] each, but of at least kMinTilePixels pixels (the
// GEMM library packs the whole weight for every tile: a tile of few rows, as a budget of 512 channels leaves,
// spent more time packing than multiplying), and at least kMinTiles of them in the batch where an image has the
// pixels (so that the threads share the work evenly), all of one size, a multiple of 16 pixels unless the image
// has fewer. The plan depends on the shape only, never on the thread count, so every result is summed in the same
// order whatever the thread count.
constexpr int64_t kMinTilePixels = 128;
constexpr int64_t kMinTiles = 8;

inline TilePlan plan_tiles(const DeformConvShape& s, int64_t batch, int64_t row, int64_t budget) {
  const int64_t P = s.pixels();
  const int64_t wanted = std::min(P, std::max(kMinTilePixels, budget / std::max<int64_t>(1, row) / 16 * 16));
  int64_t tiles = (P + wanted - 1) / wanted;
  if (tiles * batch < kMinTiles) {
    tiles = std::min((kMinTiles + batch - 1) / batch, std::max<int64_t>(1, P / 16));
  }
  const int64_t pixels = std::min(P, ((P + tiles - 1) / tiles + 15) / 16 * 16);
  return TilePlan{pixels, (P + pixels - 1) / pixels, batch, P};
}

// What the tiles read: channels-last features [B, H, W, C] (as an NCHW-shaped tensor with channels-last
// strides), offset and mask contiguous.
struct RowsInput {
  at::Tensor features, offset;
  std::optional<at::Tensor> mask;
};

// Whether deform_conv2d's output and input gradient are channels-last: when the input is (as F.conv2d decides).
inline bool channels_last_result(const at::Tensor& input) {
  return input.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

// [B, C, H, W] tensor t as rows [B * H * W, C] (t channels-last).
inline at::Tensor as_rows(const at::Tensor& t) { return t.permute({0, 2, 3, 1}).reshape({-1, t.size(1)}); }

template <class K>
at::Tensor deform_conv2d_forward_rows(const K& kernels, const DeformConvShape& s, const at::Tensor& input,
                                      const at::Tensor& weight, const at::Tensor& offset,
                                      const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& bias,
                                      int64_t groups) {
  const RowsInput in{kernels.relaid(input, at::MemoryFormat::ChannelsLast), offset.contiguous(), contiguous(mask)};
  const int64_t batch = input.size(0), out_channels = weight.size(0), og_out = out_channels / groups;
  const bool direct = channels_last_result(input);
  at::Tensor output = at::empty({batch, out_channels, s.out_height, s.out_width},
                                input.options().memory_format(direct ? at::MemoryFormat::ChannelsLast
                                                                     : at::MemoryFormat::Contiguous));
  if (output.numel() == 0) return output;
  const RowLayout layout = row_layout(s, groups);
  const at::Tensor packed = packed_weight(weight);
  const std::optional<at::Tensor> bias_ = contiguous(bias);
  // The GEMM writes straight into the output: a tile's rows [pixels, C_out] of a channels-last one, its columns
  // [C_out, pixels] of each image's [C_out, P] otherwise.
  const at::Tensor out_rows = direct ? as_rows(output) : output.view({batch, out_channels, s.pixels()});
  const TilePlan plan = plan_tiles(s, batch, layout.row, kernels.tile_budget(input.options()));
  kernels.for_each_tile(plan, 0, plan.count(), plan.tile_pixels * layout.row, input.options(),
                        [&](int64_t i, const at::Tensor& mine) {
    const PixelTile t = plan.tile(i);
    const at::Tensor columns = mine.narrow(0, 0, t.pixels * layout.row).view({t.pixels, layout.row});
    kernels.sample_rows(s, layout, in, t, columns);
    const at::Tensor rows = direct ? out_rows.narrow(0, plan.row(i), t.pixels)
                                   : out_rows[t.b].narrow(1, t.pixel_begin, t.pixels);
    for (int64_t g = 0; g < groups; ++g) {
      const at::Tensor w = packed.narrow(0, g * og_out, og_out);
      const at::Tensor x = columns.narrow(1, g * layout.group_columns, layout.group_columns);
      if (direct) {
        at::Tensor dst = rows.narrow(1, g * og_out, og_out);
        kernels.linear(dst, x, w, false);
      } else {
        at::Tensor dst = rows.narrow(0, g * og_out, og_out);
        kernels.linear(dst, w, x, false);
      }
    }
    if (bias_.has_value()) kernels.add_bias(rows, *bias_, direct);
  });
  return output;
}

// (grad_input, grad_weight, grad_offset, grad_mask, grad_bias) as deform_conv2d_backward, over pixel tiles. The
// input gradient is channels-last when the input is.
// The leading dimension of a chunk's transposed rows: `rows` rounded up to 16 elements and to an odd multiple of
// them, so that the rows of a transposed block do not all fall into one cache set (a power-of-two stride, as 2
// images of 64 x 64 give, made the transposes take longer than the sampling).
inline int64_t padded_rows(int64_t rows) {
  const int64_t blocks = (rows + 15) / 16;
  return (blocks % 2 == 0 ? blocks + 1 : blocks) * 16;
}

template <class K>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_rows(
    const K& kernels, const DeformConvShape& s, const at::Tensor& grad_output, const at::Tensor& input,
    const at::Tensor& weight, const at::Tensor& offset, const std::optional<at::Tensor>& mask_, int64_t groups,
    const DeformConvGrads& needed) {
  const RowsInput in{kernels.relaid(input, at::MemoryFormat::ChannelsLast), offset.contiguous(), contiguous(mask_)};
  const int64_t batch = input.size(0), out_channels = weight.size(0), og_out = out_channels / groups;
  const auto none = [&] { return at::empty({0}, input.options()); };  // a new one for each: outputs must not alias

  at::Tensor grad_features = needed.input ? at::zeros_like(in.features) : none();
  at::Tensor grad_offset = needed.offset ? at::zeros_like(in.offset) : none();
  at::Tensor grad_mask = needed.mask ? at::zeros_like(*in.mask) : none();
  at::Tensor grad_packed = needed.weight ? at::zeros({out_channels, weight.numel() / out_channels}, weight.options())
                                         : none();
  const at::Tensor grad_bias = needed.bias ? grad_output.sum({0, 2, 3}) : none();
  const auto result = [&] {
    at::Tensor grad_input = grad_features;
    if (needed.input && !channels_last_result(input)) {
      grad_input = kernels.relaid(grad_features, at::MemoryFormat::Contiguous);
    }
    return std::make_tuple(grad_input, needed.weight ? unpacked_weight(grad_packed, weight) : grad_packed,
                           grad_offset, grad_mask, grad_bias);
  };
  if (batch == 0 || grad_output.numel() == 0 || !(needed.column_grad() || needed.weight)) return result();

  const RowLayout layout = row_layout(s, groups);
  const at::Tensor packed = packed_weight(weight);
  const at::Tensor packed_t = needed.column_grad() ? packed.t().contiguous() : at::Tensor();  // [K * C / groups, C_out]
  const at::Tensor gout = as_rows(kernels.relaid(grad_output, at::MemoryFormat::ChannelsLast));
  const TilePlan plan = plan_tiles(s, batch, layout.row, kernels.tile_budget(input.options()));
  // Per chunk of tiles: the column-gradient rows (for the input gradient) of all its tiles, and for the weight
  // gradient their column rows and grad_out rows, both transposed ([row, ld], [C_out, ld]: padded_rows), so that
  // the weight-gradient GEMM is kernels.linear's a b^T of contiguous operands. A tile keeps in its scratch what
  // the chunk does not need, and samples its column rows there before they are transposed into the chunk's.
  const int64_t per_row = (needed.input ? layout.row : 0) + (needed.weight ? layout.row + out_channels : 0);
  const int64_t chunk_tiles = std::max<int64_t>(
      1, per_row == 0 ? plan.count() : kernels.column_budget(input.options()) / (per_row * plan.tile_pixels));
  const int64_t chunk_rows = std::min(chunk_tiles * plan.tile_pixels, batch * s.pixels());
  const at::Tensor buffer =
      kernels.workspace(std::max<int64_t>(1, per_row * padded_rows(chunk_rows)), input.options());
  const int64_t transposed_at = needed.input ? chunk_rows * layout.row : 0;
  const at::Tensor grad_columns_all =
      needed.input ? buffer.narrow(0, 0, transposed_at).view({chunk_rows, layout.row}) : at::Tensor();
  const int64_t tile_columns = plan.tile_pixels * layout.row;
  const int64_t scratch = (needed.weight ? 2 : 1) * tile_columns;
  const std::optional<at::Tensor> grad_offset_ =
      needed.offset ? std::optional<at::Tensor>(grad_offset) : std::nullopt;
  const std::optional<at::Tensor> grad_mask_ = needed.mask ? std::optional<at::Tensor>(grad_mask) : std::nullopt;

  for (int64_t first = 0; first < plan.count(); first += chunk_tiles) {
    const int64_t end = std::min(plan.count(), first + chunk_tiles);
    const int64_t row0 = plan.row(first), rows = plan.row(end) - row0, ld = padded_rows(rows);
    at::Tensor columns_t, gout_t;  // [row, ld], [C_out, ld]; the columns [rows, ld) zero
    if (needed.weight) {
      columns_t = buffer.narrow(0, transposed_at, layout.row * ld).view({layout.row, ld});
      gout_t = buffer.narrow(0, transposed_at + layout.row * ld, out_channels * ld).view({out_channels, ld});
      columns_t.narrow(1, rows, ld - rows).zero_();
      gout_t.narrow(1, rows, ld - rows).zero_();
    }
    kernels.for_each_tile(plan, first, end, scratch, input.options(), [&](int64_t i, const at::Tensor& mine) {
      const PixelTile t = plan.tile(i);
      const int64_t r = plan.row(i) - row0;
      const at::Tensor own = mine.narrow(0, 0, t.pixels * layout.row).view({t.pixels, layout.row});
      const std::optional<at::Tensor> columns =
          needed.weight ? std::optional<at::Tensor>(mine.narrow(0, tile_columns, t.pixels * layout.row)
                                                        .view({t.pixels, layout.row}))
                        : std::nullopt;
      const at::Tensor gout_tile = gout.narrow(0, plan.row(i), t.pixels);
      if (!needed.column_grad()) {  // the weight gradient alone: the columns, no column gradient
        kernels.sample_rows(s, layout, in, t, *columns);
      } else {
        at::Tensor grad_columns = needed.input ? grad_columns_all.narrow(0, r, t.pixels) : own;
        for (int64_t g = 0; g < groups; ++g) {  // the column gradient grad_out W, per weight group
          at::Tensor dst = grad_columns.narrow(1, g * layout.group_columns, layout.group_columns);
          kernels.linear(dst, gout_tile.narrow(1, g * og_out, og_out), packed_t.narrow(1, g * og_out, og_out),
                         false);
        }
        if (needed.sampling()) {
          kernels.sampling_grad_rows(s, layout, in, t, grad_columns, columns, grad_offset_, grad_mask_);
        } else if (needed.weight) {
          kernels.sample_rows(s, layout, in, t, *columns);
        }
      }
      if (needed.weight) {
        kernels.transpose_into(*columns, columns_t.narrow(1, r, t.pixels));
        kernels.transpose_into(gout_tile, gout_t.narrow(1, r, t.pixels));
      }
    });
    if (needed.input) {
      kernels.scatter_rows(s, layout, in, plan, first, end, grad_columns_all.narrow(0, 0, rows), grad_features);
    }
    if (needed.weight) {
      for (int64_t g = 0; g < groups; ++g) {
        at::Tensor dst = grad_packed.narrow(0, g * og_out, og_out);
        kernels.linear(dst, gout_t.narrow(0, g * og_out, og_out),
                       columns_t.narrow(0, g * layout.group_columns, layout.group_columns), true);
      }
    }
  }
  return result();
}

}  // namespace aecr
