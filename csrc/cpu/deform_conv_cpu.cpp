// CPU driver of deform_conv2d: loops (at::parallel_for) around the per-element math of aecr/deform_conv.h,
// and GEMMs through at::mm (MKL / OpenBLAS).
//
// Work is split into tiles of up to kTile output pixels of one (image, offset group, tap): a tile's bilinear
// points are computed once and reused for every channel of the offset group. Each output element is written
// by exactly one thread in a fixed order, so results are bitwise identical run to run.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "aecr/deform_conv.h"
#include "deform_conv_args.h"

namespace aecr {
namespace {

constexpr int64_t kTile = 64;
constexpr int64_t kColumnBudget = int64_t(1) << 24;  // elements of the column buffer of one chunk

struct Tile {
  int64_t b, g, k, p0, len;
};

int64_t tiles_per_tap(const DeformConvShape& s) { return (s.pixels() + kTile - 1) / kTile; }

// Tile i of the [n, OG, K, tiles] grid.
Tile tile_from_index(const DeformConvShape& s, int64_t i) {
  const int64_t per_tap = tiles_per_tap(s);
  Tile t;
  t.p0 = (i % per_tap) * kTile;
  t.len = std::min(kTile, s.pixels() - t.p0);
  i /= per_tap;
  t.k = i % s.taps();
  i /= s.taps();
  t.g = i % s.offset_groups;
  t.b = i / s.offset_groups;
  return t;
}

template <typename T, typename V>
void tile_points(const DeformConvShape& s, const Tile& tile, const V* offset, const V* mask, BilinearPoint<T>* points,
                 T* masks) {
  for (int64_t q = 0; q < tile.len; ++q) {
    const SamplingSite site{tile.b, tile.g, tile.k, tile.p0 + q};
    points[q] = site_point<T>(s, site, offset);
    masks[q] = site_mask<T>(s, site, mask);
  }
}

// columns [C*K, n*P] of a chunk of n images. input/offset/mask point at the chunk's first image.
template <typename V>
void im2col(const DeformConvShape& s, int64_t n, const V* input, const V* offset, const V* mask, V* columns) {
  using T = V;  // float or double: sample in the storage type
  const int64_t cpg = s.channels_per_offset_group();
  at::parallel_for(0, n * s.offset_groups * s.taps() * tiles_per_tap(s), 1, [&](int64_t begin, int64_t end) {
    BilinearPoint<T> points[kTile];
    T masks[kTile];
    for (int64_t i = begin; i < end; ++i) {
      const Tile tile = tile_from_index(s, i);
      tile_points<T>(s, tile, offset, mask, points, masks);
      const V* image = input + tile.b * s.channels * s.plane();
      for (int64_t c = tile.g * cpg; c < (tile.g + 1) * cpg; ++c) {
        const V* plane = image + c * s.plane();
        V* row = columns + column_index(s, n, c, tile.k, tile.b, tile.p0);
        for (int64_t q = 0; q < tile.len; ++q) row[q] = column_value<T>(points[q], masks[q], plane);
      }
    }
  });
}

// Offset and mask gradients of a chunk from the column gradient (grad_mask may be null).
template <typename V>
void offset_mask_grad(const DeformConvShape& s, int64_t n, const V* input, const V* offset, const V* mask,
                      const V* grad_columns, V* grad_offset, V* grad_mask) {
  using T = V;
  const int64_t cpg = s.channels_per_offset_group();
  at::parallel_for(0, n * s.offset_groups * s.taps() * tiles_per_tap(s), 1, [&](int64_t begin, int64_t end) {
    BilinearPoint<T> points[kTile];
    T masks[kTile];
    SiteGradSums<T> sums[kTile];
    for (int64_t i = begin; i < end; ++i) {
      const Tile tile = tile_from_index(s, i);
      tile_points<T>(s, tile, offset, mask, points, masks);
      for (int64_t q = 0; q < tile.len; ++q) sums[q] = SiteGradSums<T>{T(0), T(0), T(0)};
      const V* image = input + tile.b * s.channels * s.plane();
      for (int64_t c = tile.g * cpg; c < (tile.g + 1) * cpg; ++c) {
        const V* plane = image + c * s.plane();
        const V* grow = grad_columns + column_index(s, n, c, tile.k, tile.b, tile.p0);
        for (int64_t q = 0; q < tile.len; ++q) accumulate_site_grad<T>(points[q], plane, grow[q], sums[q]);
      }
      for (int64_t q = 0; q < tile.len; ++q) {
        const SamplingSite site{tile.b, tile.g, tile.k, tile.p0 + q};
        store_site_grad<T>(s, site, masks[q], sums[q], grad_offset, grad_mask);
      }
    }
  });
}

// Input gradient of a chunk (adjoint of im2col). Threads own disjoint blocks of channel planes, so the
// scatter needs no atomics and each plane is summed in the same order whatever the thread count.
template <typename V>
void col2im(const DeformConvShape& s, int64_t n, const V* offset, const V* mask, const V* grad_columns,
            V* grad_input) {
  using T = V;
  const int64_t cpg = s.channels_per_offset_group();
  if (cpg == 0) return;
  const int64_t wanted_units = 4 * at::get_num_threads();
  const int64_t blocks = std::clamp<int64_t>((wanted_units + n * s.offset_groups - 1) / (n * s.offset_groups), 1, cpg);
  const int64_t block_size = (cpg + blocks - 1) / blocks;
  const int64_t blocks_per_group = (cpg + block_size - 1) / block_size;
  at::parallel_for(0, n * s.offset_groups * blocks_per_group, 1, [&](int64_t begin, int64_t end) {
    BilinearPoint<T> points[kTile];
    T masks[kTile];
    for (int64_t u = begin; u < end; ++u) {
      const int64_t blk = u % blocks_per_group;
      const int64_t g = (u / blocks_per_group) % s.offset_groups;
      const int64_t b = u / (blocks_per_group * s.offset_groups);
      const int64_t c_begin = g * cpg + blk * block_size;
      const int64_t c_end = std::min(c_begin + block_size, (g + 1) * cpg);
      for (int64_t k = 0; k < s.taps(); ++k) {
        for (int64_t p0 = 0; p0 < s.pixels(); p0 += kTile) {
          const Tile tile{b, g, k, p0, std::min(kTile, s.pixels() - p0)};
          tile_points<T>(s, tile, offset, mask, points, masks);
          for (int64_t c = c_begin; c < c_end; ++c) {
            V* plane = grad_input + (b * s.channels + c) * s.plane();
            const V* grow = grad_columns + column_index(s, n, c, k, b, p0);
            for (int64_t q = 0; q < tile.len; ++q) {
              bilinear_scatter<PlainAdd, T>(points[q], plane, masks[q] * grow[q]);
            }
          }
        }
      }
    }
  });
}

void check_cpu_dtype(const at::Tensor& input) {
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
              "deform_conv2d on the CPU supports float32 and float64, got `input` of dtype ", input.scalar_type(),
              " (float16 and bfloat16 run on CUDA)");
}

template <typename V>
const V* optional_data(const std::optional<at::Tensor>& t, int64_t element_offset) {
  return t.has_value() ? t->data_ptr<V>() + element_offset : nullptr;
}

at::Tensor deform_conv2d_cpu(const at::Tensor& input_, const at::Tensor& weight_, const at::Tensor& offset_,
                             const std::optional<at::Tensor>& mask_, const std::optional<at::Tensor>& bias,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                             int64_t offset_groups) {
  const DeformConvShape s =
      check_deform_conv(input_, weight_, offset_, mask_, bias, stride, padding, dilation, groups, offset_groups);
  check_cpu_dtype(input_);
  const at::Tensor input = input_.contiguous(), weight = weight_.contiguous(), offset = offset_.contiguous();
  const std::optional<at::Tensor> mask = mask_.has_value() ? std::optional<at::Tensor>(mask_->contiguous()) : mask_;

  const int64_t batch = input.size(0), out_channels = weight.size(0);
  const int64_t ck = s.channels / groups * s.taps(), og_out = out_channels / groups, P = s.pixels();
  at::Tensor output = at::empty({batch, out_channels, s.out_height, s.out_width}, input.options());
  if (output.numel() == 0) return output;

  const at::Tensor w = weight.view({groups, og_out, ck});
  const int64_t chunk = images_per_chunk(s, batch, kColumnBudget);
  at::Tensor buffer = at::empty({s.channels * s.taps() * chunk * P}, input.options());
  for (int64_t b0 = 0; b0 < batch; b0 += chunk) {
    const int64_t n = std::min(chunk, batch - b0);
    at::Tensor columns = buffer.narrow(0, 0, s.channels * s.taps() * n * P).view({s.channels * s.taps(), n * P});
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_conv2d_cpu", [&] {
      im2col<scalar_t>(s, n, input.data_ptr<scalar_t>() + b0 * s.channels * s.plane(),
                       offset.data_ptr<scalar_t>() + b0 * offset.stride(0),
                       optional_data<scalar_t>(mask, b0 * (mask ? mask->stride(0) : 0)), columns.data_ptr<scalar_t>());
    });
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_cpu(
    const at::Tensor& grad_output_, const at::Tensor& input_, const at::Tensor& weight_, const at::Tensor& offset_,
    const std::optional<at::Tensor>& mask_, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, int64_t offset_groups) {
  const DeformConvShape s = check_deform_conv(input_, weight_, offset_, mask_, std::nullopt, stride, padding, dilation,
                                              groups, offset_groups);
  check_cpu_dtype(input_);
  check_grad_output(grad_output_, input_, s, weight_.size(0));
  const at::Tensor input = input_.contiguous(), weight = weight_.contiguous(), offset = offset_.contiguous();
  const at::Tensor grad_output = grad_output_.contiguous();
  const std::optional<at::Tensor> mask = mask_.has_value() ? std::optional<at::Tensor>(mask_->contiguous()) : mask_;

  const int64_t batch = input.size(0), out_channels = weight.size(0);
  const int64_t ck = s.channels / groups * s.taps(), og_out = out_channels / groups, P = s.pixels();
  at::Tensor grad_input = at::zeros_like(input);
  at::Tensor grad_weight = at::zeros_like(weight);
  at::Tensor grad_offset = at::zeros_like(offset);
  at::Tensor grad_mask = mask.has_value() ? at::zeros_like(*mask) : at::empty({0}, input.options());
  at::Tensor grad_bias = grad_output.sum({0, 2, 3});
  if (batch == 0 || grad_output.numel() == 0) {
    return {grad_input, grad_weight, grad_offset, grad_mask, grad_bias};
  }

  const at::Tensor w = weight.view({groups, og_out, ck});
  const at::Tensor gw = grad_weight.view({groups, og_out, ck});
  const int64_t chunk = images_per_chunk(s, batch, kColumnBudget);
  at::Tensor buffer = at::empty({s.channels * s.taps() * chunk * P}, input.options());
  for (int64_t b0 = 0; b0 < batch; b0 += chunk) {
    const int64_t n = std::min(chunk, batch - b0);
    at::Tensor columns = buffer.narrow(0, 0, s.channels * s.taps() * n * P).view({s.channels * s.taps(), n * P});
    const at::Tensor gout = n == 1 ? grad_output[b0].view({out_channels, P})
                                   : grad_output.narrow(0, b0, n).view({n, out_channels, P}).transpose(0, 1).reshape(
                                         {out_channels, n * P});
    // Column gradient W^T grad_out, per weight group.
    for (int64_t g = 0; g < groups; ++g) {
      at::Tensor dst = columns.narrow(0, g * ck, ck);
      at::mm_out(dst, w[g].t(), gout.narrow(0, g * og_out, og_out));
    }
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_conv2d_backward_cpu", [&] {
      const scalar_t* in = input.data_ptr<scalar_t>() + b0 * s.channels * s.plane();
      const scalar_t* off = offset.data_ptr<scalar_t>() + b0 * offset.stride(0);
      const scalar_t* msk = optional_data<scalar_t>(mask, b0 * (mask ? mask->stride(0) : 0));
      scalar_t* gmask = mask ? grad_mask.data_ptr<scalar_t>() + b0 * grad_mask.stride(0) : nullptr;
      offset_mask_grad<scalar_t>(s, n, in, off, msk, columns.data_ptr<scalar_t>(),
                                 grad_offset.data_ptr<scalar_t>() + b0 * offset.stride(0), gmask);
      col2im<scalar_t>(s, n, off, msk, columns.data_ptr<scalar_t>(),
                       grad_input.data_ptr<scalar_t>() + b0 * s.channels * s.plane());
      // The weight gradient needs the columns themselves: recompute them into the same buffer.
      im2col<scalar_t>(s, n, in, off, msk, columns.data_ptr<scalar_t>());
    });
    for (int64_t g = 0; g < groups; ++g) {
      gw[g].addmm_(gout.narrow(0, g * og_out, og_out), columns.narrow(0, g * ck, ck).t());
    }
  }
  return {grad_input, grad_weight, grad_offset, grad_mask, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(aecr_ops, CPU, m) {
  m.impl("deform_conv2d", &deform_conv2d_cpu);
  m.impl("deform_conv2d_backward", &deform_conv2d_backward_cpu);
}

}  // namespace aecr
