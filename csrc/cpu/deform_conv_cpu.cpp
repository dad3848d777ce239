// CPU driver of deform_conv2d: loops (at::parallel_for) around the per-element math of aecr/deform_conv.h,
// and GEMMs through at::mm (MKL / OpenBLAS).
//
// Work is split into tiles of up to kTile output pixels of one (image, offset group, tap): a tile's bilinear
// points (from bilinear_point) are computed once, laid out as arrays so that the loops over pixels vectorise,
// and reused for a block of channels whose planes stay in cache. The backward rebuilds the columns inside the
// offset-gradient pass. Each output element is written by exactly one thread in a fixed order, so results are
// bitwise identical run to run and do not depend on the number of threads (the GEMMs aside).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <tuple>
#include <vector>

#include "aecr/deform_conv.h"
#include "deform_conv_args.h"

namespace aecr {
namespace {

constexpr int64_t kTile = 128;
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

// The bilinear points of a tile's sites (from bilinear_point), as a structure of arrays with plane offsets of
// type I (int32 when a plane has fewer than 2^31 pixels), so that the loops over pixels vectorise with
// gathers. Corners outside the plane have offset 0 and weight 0.
template <typename T, typename I>
struct TilePlan {
  I index[4][kTile];
  T weight[4][kTile];
  T d_h[4][kTile];
  T d_w[4][kTile];
  T mask[kTile];
  int64_t len;

  template <typename V>
  void fill(const DeformConvShape& s, const Tile& tile, const V* offset, const V* mask_data, bool derivatives) {
    len = tile.len;
    for (int64_t q = 0; q < len; ++q) {
      const SamplingSite site{tile.b, tile.g, tile.k, tile.p0 + q};
      const BilinearPoint<T> p = site_point<T>(s, site, offset);
      for (int j = 0; j < 4; ++j) {
        index[j][q] = static_cast<I>(p.index[j]);
        weight[j][q] = p.weight[j];
        if (derivatives) {
          d_h[j][q] = p.d_h[j];
          d_w[j][q] = p.d_w[j];
        }
      }
      mask[q] = site_mask<T>(s, site, mask_data);
    }
  }

  // row[q] = column_value(point q, plane): mask * (w0 x0 + w1 x1 + w2 x2 + w3 x3), summed in that order.
  template <typename V>
  void sample(const V* plane, V* row) const {
    for (int64_t q = 0; q < len; ++q) {
      T v = weight[0][q] * static_cast<T>(plane[index[0][q]]);
      v += weight[1][q] * static_cast<T>(plane[index[1][q]]);
      v += weight[2][q] * static_cast<T>(plane[index[2][q]]);
      v += weight[3][q] * static_cast<T>(plane[index[3][q]]);
      row[q] = static_cast<V>(mask[q] * v);
    }
  }

  // accumulate_site_grad for every point: sums over channels of gcol * (value, d value/dh, d value/dw). The
  // column values themselves fall out on the way: written to column_row (as sample() would) unless null.
  template <typename V>
  void accumulate_grad(const V* plane, const V* grad_row, T* sum_v, T* sum_h, T* sum_w, V* column_row) const {
    for (int64_t q = 0; q < len; ++q) {
      const T x0 = static_cast<T>(plane[index[0][q]]), x1 = static_cast<T>(plane[index[1][q]]);
      const T x2 = static_cast<T>(plane[index[2][q]]), x3 = static_cast<T>(plane[index[3][q]]);
      const T g = static_cast<T>(grad_row[q]);
      T v = weight[0][q] * x0, gh = d_h[0][q] * x0, gw = d_w[0][q] * x0;
      v += weight[1][q] * x1;
      gh += d_h[1][q] * x1;
      gw += d_w[1][q] * x1;
      v += weight[2][q] * x2;
      gh += d_h[2][q] * x2;
      gw += d_w[2][q] * x2;
      v += weight[3][q] * x3;
      gh += d_h[3][q] * x3;
      gw += d_w[3][q] * x3;
      sum_v[q] += g * v;
      sum_h[q] += g * gh;
      sum_w[q] += g * gw;
      if (column_row != nullptr) column_row[q] = static_cast<V>(mask[q] * v);
    }
  }

  // bilinear_scatter of mask * gcol for every point (a scatter: not vectorised, corners may collide).
  template <typename V>
  void scatter(const V* grad_row, V* grad_plane) const {
    for (int64_t q = 0; q < len; ++q) {
      const T g = mask[q] * static_cast<T>(grad_row[q]);
      for (int j = 0; j < 4; ++j) {
        if (weight[j][q] != T(0)) grad_plane[index[j][q]] += static_cast<V>(g * weight[j][q]);
      }
    }
  }
};

// Calls fn(std::integral_constant-like tag) with I = int32_t when plane offsets fit, else int64_t.
template <class Fn>
void with_index_type(const DeformConvShape& s, const Fn& fn) {
  if (s.plane() < (int64_t(1) << 31)) {
    fn(int32_t(0));
  } else {
    fn(int64_t(0));
  }
}

// Channels whose planes are worked on together, so that they stay in cache while every tile of sites is
// sampled from them (a tile loop inside a loop over all channels would stream the whole image per tile).
template <typename V>
int64_t channel_block(const DeformConvShape& s) {
  return std::max<int64_t>(1, (int64_t(256) << 10) / std::max<int64_t>(1, s.plane() * int64_t(sizeof(V))));
}

// Calls body(tile index, tile) for the tiles [begin, end) once per block of channels of each tile's offset group,
// block by block: body(i, tile, c_begin, c_end).
template <typename V, class Body>
void for_tiles_by_channel_block(const DeformConvShape& s, int64_t begin, int64_t end, const Body& body) {
  const int64_t cpg = s.channels_per_offset_group(), step = channel_block<V>(s);
  for (int64_t c0 = 0; c0 < cpg; c0 += step) {
    for (int64_t i = begin; i < end; ++i) {
      const Tile tile = tile_from_index(s, i);
      body(i, tile, tile.g * cpg + c0, tile.g * cpg + std::min(cpg, c0 + step));
    }
  }
}

// columns [C*K, n*P] of a chunk of n images. input/offset/mask point at the chunk's first image.
template <typename V>
void im2col(const DeformConvShape& s, int64_t n, const V* input, const V* offset, const V* mask, V* columns) {
  with_index_type(s, [&](auto tag) {
    using I = decltype(tag);
    at::parallel_for(0, n * s.offset_groups * s.taps() * tiles_per_tap(s), 1, [&](int64_t begin, int64_t end) {
      auto plan = std::make_unique<TilePlan<V, I>>();
      for_tiles_by_channel_block<V>(s, begin, end, [&](int64_t, const Tile& tile, int64_t c_begin, int64_t c_end) {
        plan->fill(s, tile, offset, mask, false);
        const V* image = input + tile.b * s.channels * s.plane();
        for (int64_t c = c_begin; c < c_end; ++c) {
          plan->sample(image + c * s.plane(), columns + column_index(s, n, c, tile.k, tile.b, tile.p0));
        }
      });
    });
  });
}

// Offset and mask gradients of a chunk from the column gradient (grad_mask may be null), and the columns
// themselves into `columns` (for the weight gradient). Each thread owns a range of tiles and sums over the
// channels in a fixed order, block after block.
template <typename V>
void offset_mask_grad(const DeformConvShape& s, int64_t n, const V* input, const V* offset, const V* mask,
                      const V* grad_columns, V* grad_offset, V* grad_mask, V* columns) {
  with_index_type(s, [&](auto tag) {
    using I = decltype(tag);
    at::parallel_for(0, n * s.offset_groups * s.taps() * tiles_per_tap(s), 1, [&](int64_t begin, int64_t end) {
      auto plan = std::make_unique<TilePlan<V, I>>();
      std::vector<V> sums(3 * kTile * (end - begin), V(0));  // (value, h, w) per site of the range
      for_tiles_by_channel_block<V>(s, begin, end, [&](int64_t i, const Tile& tile, int64_t c_begin, int64_t c_end) {
        plan->fill(s, tile, offset, mask, true);
        V* sum = sums.data() + 3 * kTile * (i - begin);
        const V* image = input + tile.b * s.channels * s.plane();
        for (int64_t c = c_begin; c < c_end; ++c) {
          const int64_t at = column_index(s, n, c, tile.k, tile.b, tile.p0);
          plan->accumulate_grad(image + c * s.plane(), grad_columns + at, sum, sum + kTile, sum + 2 * kTile,
                                columns + at);
        }
      });
      for (int64_t i = begin; i < end; ++i) {
        const Tile tile = tile_from_index(s, i);
        const V* sum = sums.data() + 3 * kTile * (i - begin);
        for (int64_t q = 0; q < tile.len; ++q) {
          const SamplingSite site{tile.b, tile.g, tile.k, tile.p0 + q};
          store_site_grad<V>(s, site, site_mask<V>(s, site, mask),
                             SiteGradSums<V>{sum[q], sum[kTile + q], sum[2 * kTile + q]}, grad_offset, grad_mask);
        }
      }
    });
  });
}

// Input gradient of a chunk (adjoint of im2col). Threads own disjoint blocks of channel planes, so the
// scatter needs no atomics and each plane is summed in the same order whatever the thread count.
template <typename V>
void col2im(const DeformConvShape& s, int64_t n, const V* offset, const V* mask, const V* grad_columns,
            V* grad_input) {
  const int64_t cpg = s.channels_per_offset_group();
  if (cpg == 0) return;
  const int64_t wanted_units = 4 * at::get_num_threads();
  const int64_t blocks = std::clamp<int64_t>((wanted_units + n * s.offset_groups - 1) / (n * s.offset_groups), 1, cpg);
  const int64_t block_size = (cpg + blocks - 1) / blocks;
  const int64_t blocks_per_group = (cpg + block_size - 1) / block_size;
  with_index_type(s, [&](auto tag) {
    using I = decltype(tag);
    at::parallel_for(0, n * s.offset_groups * blocks_per_group, 1, [&](int64_t begin, int64_t end) {
      auto plan = std::make_unique<TilePlan<V, I>>();
      for (int64_t u = begin; u < end; ++u) {
        const int64_t blk = u % blocks_per_group;
        const int64_t g = (u / blocks_per_group) % s.offset_groups;
        const int64_t b = u / (blocks_per_group * s.offset_groups);
        const int64_t c_begin = g * cpg + blk * block_size;
        const int64_t c_end = std::min(c_begin + block_size, (g + 1) * cpg);
        for (int64_t k = 0; k < s.taps(); ++k) {
          for (int64_t p0 = 0; p0 < s.pixels(); p0 += kTile) {
            const Tile tile{b, g, k, p0, std::min(kTile, s.pixels() - p0)};
            plan->fill(s, tile, offset, mask, false);
            for (int64_t c = c_begin; c < c_end; ++c) {
              plan->scatter(grad_columns + column_index(s, n, c, k, b, p0),
                            grad_input + (b * s.channels + c) * s.plane());
            }
          }
        }
      }
    });
  });
}

// Column buffers, kept per thread, dtype and slot between calls: a fresh buffer of tens of megabytes costs a
// page fault per 4 KB on first touch, as much time as sampling into it. Each holds at most kColumnBudget
// elements (one chunk); the backward uses two slots (columns and their gradient).
at::Tensor column_workspace(int64_t numel, const at::TensorOptions& options, int slot = 0) {
  thread_local at::Tensor buffers[2][2];
  at::Tensor& buffer = buffers[options.dtype() == at::kDouble ? 1 : 0][slot];
  if (!buffer.defined() || buffer.numel() < numel) buffer = at::empty({numel}, options);
  return buffer.narrow(0, 0, numel);
}

void check_cpu_dtype(const at::Tensor& input) {
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
              "deform_conv2d on the CPU supports float32 and float64, got `input` of dtype ", input.scalar_type(),
              " (float16 and bfloat16 run on CUDA)");
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
  at::Tensor buffer = column_workspace(s.channels * s.taps() * chunk * P, input.options());
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
  const int64_t rows = s.channels * s.taps();
  at::Tensor grad_buffer = column_workspace(rows * chunk * P, input.options(), 0);
  at::Tensor column_buffer = column_workspace(rows * chunk * P, input.options(), 1);
  for (int64_t b0 = 0; b0 < batch; b0 += chunk) {
    const int64_t n = std::min(chunk, batch - b0);
    at::Tensor grad_columns = grad_buffer.narrow(0, 0, rows * n * P).view({rows, n * P});
    at::Tensor columns = column_buffer.narrow(0, 0, rows * n * P).view({rows, n * P});
    const at::Tensor gout = n == 1 ? grad_output[b0].view({out_channels, P})
                                   : grad_output.narrow(0, b0, n).view({n, out_channels, P}).transpose(0, 1).reshape(
                                         {out_channels, n * P});
    // Column gradient W^T grad_out, per weight group.
    for (int64_t g = 0; g < groups; ++g) {
      at::Tensor dst = grad_columns.narrow(0, g * ck, ck);
      at::mm_out(dst, w[g].t(), gout.narrow(0, g * og_out, og_out));
    }
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_conv2d_backward_cpu", [&] {
      const scalar_t* in = input.data_ptr<scalar_t>() + b0 * s.channels * s.plane();
      const scalar_t* off = offset.data_ptr<scalar_t>() + b0 * offset.stride(0);
      const scalar_t* msk = optional_data<scalar_t>(mask, b0 * (mask ? mask->stride(0) : 0));
      scalar_t* gmask = mask ? grad_mask.data_ptr<scalar_t>() + b0 * grad_mask.stride(0) : nullptr;
      // Also rebuilds the columns, which the weight gradient needs.
      offset_mask_grad<scalar_t>(s, n, in, off, msk, grad_columns.data_ptr<scalar_t>(),
                                 grad_offset.data_ptr<scalar_t>() + b0 * offset.stride(0), gmask,
                                 columns.data_ptr<scalar_t>());
      col2im<scalar_t>(s, n, off, msk, grad_columns.data_ptr<scalar_t>(),
                       grad_input.data_ptr<scalar_t>() + b0 * s.channels * s.plane());
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
