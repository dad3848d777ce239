// CPU kernels of deform_conv2d: loops (at::parallel_for) around the per-element math of aecr/deform_conv.h; the
// algorithm (chunks, GEMMs through at::mm: MKL / OpenBLAS) is deform_conv_driver.h's.
//
// Work is split into tiles of up to kTile output pixels of one (image, offset group, tap): a tile's bilinear
// points (from bilinear_point) are computed once, laid out as arrays so that the loops over pixels vectorise,
// and reused for a block of channels whose planes stay in cache. The backward rebuilds the columns inside the
// offset-gradient pass. Each output element is written by exactly one thread in a fixed order, so results are
// bitwise identical run to run and do not depend on the number of threads (the GEMMs aside: MKL may split its
// sums differently with another thread count).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "aecr/deform_conv.h"
#include "deform_conv_args.h"
#include "deform_conv_driver.h"
#include "cpu/workspace.h"

namespace aecr {
namespace {

constexpr int64_t kTile = 128;
constexpr int64_t kMinChannelBlock = 4;  // fewer planes in cache: all channels per tile (channel_block)
constexpr int64_t kColumnBytes = int64_t(64) << 20;  // the column buffer of one chunk, whatever the image size

struct Tile {
  int64_t b, g, k, p0, len;
};

int64_t tiles_per_tap(const ColumnChunk& c) { return (c.pixels + kTile - 1) / kTile; }

// Tiles of a chunk: its [n, OG, K, tiles] grid.
int64_t tile_count(const DeformConvShape& s, const ColumnChunk& c) {
  return c.images * s.offset_groups * s.taps() * tiles_per_tap(c);
}

// Tile i of the chunk's grid.
Tile tile_from_index(const DeformConvShape& s, const ColumnChunk& c, int64_t i) {
  const int64_t per_tap = tiles_per_tap(c);
  Tile t;
  t.p0 = c.pixel_begin + (i % per_tap) * kTile;
  t.len = std::min(kTile, c.pixel_begin + c.pixels - t.p0);
  i /= per_tap;
  t.k = i % s.taps();
  i /= s.taps();
  t.g = i % s.offset_groups;
  t.b = i / s.offset_groups;
  return t;
}

// The bilinear points of a tile's sites (from bilinear_point), as a structure of arrays with plane offsets of
// type I (int32 when a plane has fewer than 2^31 pixels), so that the loops over pixels vectorise with
// gathers. Corners outside the plane have offset 0 and weight 0, and their value is taken as 0 whatever the
// plane holds at offset 0 (`inside`), as in bilinear.h.
template <typename T, typename I>
struct TilePlan {
  I index[4][kTile];
  T weight[4][kTile];
  T d_h[4][kTile];
  T d_w[4][kTile];
  bool inside[4][kTile];
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
        inside[j][q] = p.inside[j];
        if (derivatives) {
          d_h[j][q] = p.d_h[j];
          d_w[j][q] = p.d_w[j];
        }
      }
      mask[q] = site_mask<T>(s, site, mask_data);
    }
  }

  // Corner j of point q: read unconditionally (offset 0 is in the plane) and dropped outside it.
  template <typename V>
  T corner(const V* plane, int j, int64_t q) const {
    const T x = static_cast<T>(plane[index[j][q]]);
    return inside[j][q] ? x : T(0);
  }

  // row[q] = column_value(point q, plane): mask * (w0 x0 + w1 x1 + w2 x2 + w3 x3), summed in that order.
  template <typename V>
  void sample(const V* plane, V* row) const {
    for (int64_t q = 0; q < len; ++q) {
      T v = weight[0][q] * corner(plane, 0, q);
      v += weight[1][q] * corner(plane, 1, q);
      v += weight[2][q] * corner(plane, 2, q);
      v += weight[3][q] * corner(plane, 3, q);
      row[q] = static_cast<V>(mask[q] * v);
    }
  }

  // accumulate_site_grad for every point: sums over channels of gcol * (value, d value/dh, d value/dw). The
  // column values themselves fall out on the way and replace the column gradient in `row` (read first).
  template <typename V>
  void accumulate_grad(const V* plane, V* row, T* sum_v, T* sum_h, T* sum_w) const {
    for (int64_t q = 0; q < len; ++q) {
      const T x0 = corner(plane, 0, q), x1 = corner(plane, 1, q);
      const T x2 = corner(plane, 2, q), x3 = corner(plane, 3, q);
      const T g = static_cast<T>(row[q]);
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
      row[q] = static_cast<V>(mask[q] * v);
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
// sampled from them (a tile loop inside a loop over all channels would stream the whole image per tile). A
// tile's bilinear points are computed again for every block: where only a few planes fit (large images), all
// the channels go in one block instead, and each tile reads just the rows around its sites from each plane.
template <typename V>
int64_t channel_block(const DeformConvShape& s) {
  const int64_t fit = (int64_t(256) << 10) / std::max<int64_t>(1, s.plane() * int64_t(sizeof(V)));
  return fit >= kMinChannelBlock ? fit : s.channels_per_offset_group();
}

// Calls body(tile index, tile) for the tiles [begin, end) once per block of channels of each tile's offset group,
// block by block: body(i, tile, c_begin, c_end).
template <typename V, class Body>
void for_tiles_by_channel_block(const DeformConvShape& s, const ColumnChunk& chunk, int64_t begin, int64_t end,
                                const Body& body) {
  const int64_t cpg = s.channels_per_offset_group(), step = channel_block<V>(s);
  for (int64_t c0 = 0; c0 < cpg; c0 += step) {
    for (int64_t i = begin; i < end; ++i) {
      const Tile tile = tile_from_index(s, chunk, i);
      body(i, tile, tile.g * cpg + c0, tile.g * cpg + std::min(cpg, c0 + step));
    }
  }
}

// columns [C*K, width] of a chunk. input/offset/mask point at the chunk's first image.
template <typename V>
void im2col(const DeformConvShape& s, const ColumnChunk& chunk, const V* input, const V* offset, const V* mask,
            V* columns) {
  with_index_type(s, [&](auto tag) {
    using I = decltype(tag);
    at::parallel_for(0, tile_count(s, chunk), 1, [&](int64_t begin, int64_t end) {
      auto plan = std::make_unique<TilePlan<V, I>>();
      for_tiles_by_channel_block<V>(s, chunk, begin, end, [&](int64_t, const Tile& tile, int64_t c_begin, int64_t c_end) {
        plan->fill(s, tile, offset, mask, false);
        const V* image = input + tile.b * s.channels * s.plane();
        for (int64_t c = c_begin; c < c_end; ++c) {
          plan->sample(image + c * s.plane(), columns + column_index(s, chunk, c, tile.k, tile.b, tile.p0));
        }
      });
    });
  });
}

// Offset and mask gradients of a chunk from the column gradient in `columns` (either gradient may be null), which
// it replaces by the columns themselves (for the weight gradient). Each thread owns a range of tiles and sums over
// the channels in a fixed order, block after block.
template <typename V>
void offset_mask_grad(const DeformConvShape& s, const ColumnChunk& chunk, const V* input, const V* offset,
                      const V* mask, V* columns, V* grad_offset, V* grad_mask) {
  with_index_type(s, [&](auto tag) {
    using I = decltype(tag);
    at::parallel_for(0, tile_count(s, chunk), 1, [&](int64_t begin, int64_t end) {
      auto plan = std::make_unique<TilePlan<V, I>>();
      std::vector<V> sums(3 * kTile * (end - begin), V(0));  // (value, h, w) per site of the range
      for_tiles_by_channel_block<V>(s, chunk, begin, end, [&](int64_t i, const Tile& tile, int64_t c_begin, int64_t c_end) {
        plan->fill(s, tile, offset, mask, true);
        V* sum = sums.data() + 3 * kTile * (i - begin);
        const V* image = input + tile.b * s.channels * s.plane();
        for (int64_t c = c_begin; c < c_end; ++c) {
          plan->accumulate_grad(image + c * s.plane(), columns + column_index(s, chunk, c, tile.k, tile.b, tile.p0),
                                sum, sum + kTile, sum + 2 * kTile);
        }
      });
      for (int64_t i = begin; i < end; ++i) {
        const Tile tile = tile_from_index(s, chunk, i);
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

// Input gradient of a chunk (adjoint of im2col), added into grad_input. Threads own disjoint blocks of channel
// planes, so the scatter needs no atomics and each plane is summed in the same order whatever the thread count.
template <typename V>
void col2im(const DeformConvShape& s, const ColumnChunk& chunk, const V* offset, const V* mask,
            const V* grad_columns, V* grad_input) {
  const int64_t n = chunk.images, pixel_end = chunk.pixel_begin + chunk.pixels;
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
          for (int64_t p0 = chunk.pixel_begin; p0 < pixel_end; p0 += kTile) {
            const Tile tile{b, g, k, p0, std::min(kTile, pixel_end - p0)};
            plan->fill(s, tile, offset, mask, false);
            for (int64_t c = c_begin; c < c_end; ++c) {
              plan->scatter(grad_columns + column_index(s, chunk, c, k, b, p0),
                            grad_input + (b * s.channels + c) * s.plane());
            }
          }
        }
      }
    });
  });
}

// The kernel class of deform_conv_driver.h on the CPU.
struct CpuDeformConvKernels {
  int64_t column_budget(const at::TensorOptions& options) const {
    return kColumnBytes / static_cast<int64_t>(options.dtype().itemsize());
  }
  at::Tensor workspace(int64_t numel, const at::TensorOptions& options) const {
    return column_workspaces().acquire(numel, options, kColumnBytes);
  }

  void im2col(const DeformConvShape& s, const ColumnChunk& c, const at::Tensor& input, const at::Tensor& offset,
              const std::optional<at::Tensor>& mask, at::Tensor& columns) const {
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_conv2d_cpu", [&] {
      aecr::im2col<scalar_t>(s, c, input.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(),
                             optional_data<scalar_t>(mask, 0), columns.data_ptr<scalar_t>());
    });
  }

  void input_grad(const DeformConvShape& s, const ColumnChunk& c, const at::Tensor& offset,
                  const std::optional<at::Tensor>& mask, const at::Tensor& grad_columns, at::Tensor grad_input) const {
    AT_DISPATCH_FLOATING_TYPES(offset.scalar_type(), "deform_conv2d_backward_cpu", [&] {
      col2im<scalar_t>(s, c, offset.data_ptr<scalar_t>(), optional_data<scalar_t>(mask, 0),
                       grad_columns.data_ptr<scalar_t>(), grad_input.data_ptr<scalar_t>());
    });
  }

  void offset_mask_grad(const DeformConvShape& s, const ColumnChunk& c, const at::Tensor& input,
                        const at::Tensor& offset, const std::optional<at::Tensor>& mask, at::Tensor& columns,
                        const std::optional<at::Tensor>& grad_offset, const std::optional<at::Tensor>& grad_mask) const {
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_conv2d_backward_cpu", [&] {
      aecr::offset_mask_grad<scalar_t>(s, c, input.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(),
                                       optional_data<scalar_t>(mask, 0), columns.data_ptr<scalar_t>(),
                                       mutable_data<scalar_t>(grad_offset), mutable_data<scalar_t>(grad_mask));
    });
  }
};

void check_cpu_dtype(const at::Tensor& input) {
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
              "deform_conv2d on the CPU supports float32 and float64, got `input` of dtype ", input.scalar_type(),
              " (float16 and bfloat16 run on CUDA)");
}

at::Tensor deform_conv2d_cpu(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
                             const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& bias,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                             int64_t offset_groups) {
  const DeformConvShape s =
      check_deform_conv(input, weight, offset, mask, bias, stride, padding, dilation, groups, offset_groups);
  check_cpu_dtype(input);
  return deform_conv2d_forward(CpuDeformConvKernels{}, s, input, weight, offset, mask, bias, groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
    const std::optional<at::Tensor>& mask, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, int64_t offset_groups, const c10::List<bool>& output_mask) {
  const DeformConvShape s = check_deform_conv(input, weight, offset, mask, std::nullopt, stride, padding, dilation,
                                              groups, offset_groups);
  check_cpu_dtype(input);
  check_grad_output(grad_output, input, s, weight.size(0));
  return deform_conv2d_backward(CpuDeformConvKernels{}, s, grad_output, input, weight, offset, mask, groups,
                                check_output_mask(output_mask, mask));
}

std::string deform_conv2d_path_cpu(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
                                   const std::optional<at::Tensor>& mask, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                   int64_t offset_groups) {
  check_deform_conv(input, weight, offset, mask, std::nullopt, stride, padding, dilation, groups, offset_groups);
  return "cpu";
}

}  // namespace

TORCH_LIBRARY_IMPL(aecr_ops, CPU, m) {
  m.impl("deform_conv2d", &deform_conv2d_cpu);
  m.impl("deform_conv2d_backward", &deform_conv2d_backward_cpu);
  m.impl("deform_conv2d_path", &deform_conv2d_path_cpu);
}

}  // namespace aecr
