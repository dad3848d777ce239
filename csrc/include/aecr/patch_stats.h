// Index arithmetic of FastDeconv's patch statistics, shared by the CPU loops and the CUDA kernels.
//
// The statistics are those of the rows of a virtual patch matrix X [R, C*K] (K = kh*kw taps), never built
// whole: row r is the patch at the r-th sampling position, column c*K + tap its value in channel c at that tap
// (zero in the padding), as torch.nn.functional.unfold orders them. For a 1x1 kernel the rows are every
// stride^2-th pixel of the flattened N*H*W grid instead (the original layer's channel-wise case).
//
// Columns are then grouped into `groups` matrices of F features, with `interleave` sub-rows per patch:
//   column (g, f, j) = (g*F + f) * interleave + j.
// groups == 1: the C/block blocks share one F x F covariance, feature f of block j being column f*G + j
// (interleave = G = C/block). groups > 1: group g owns the contiguous columns g*F ... (interleave = 1).
// Each matrix has M = R * interleave rows.
//
// Tiles: the statistics are accumulated over tiles holding the patches of whole images; a tile is stored as
// [groups, rows * interleave, F], sub-row (r - r0) * interleave + j.
#pragma once

#include <cstdint>

#include "aecr/macros.h"

namespace aecr {

// Largest kernel (in taps) the statistics accept; the CPU loops keep a per-patch table of this size.
constexpr int64_t kMaxPatchTaps = 1024;

struct PatchShape {
  int64_t batch, channels, height, width;
  int64_t kernel_h, kernel_w;
  int64_t dilation_h, dilation_w;
  int64_t pad_h, pad_w;
  int64_t stride;                  // sampling stride
  int64_t patches_h, patches_w;    // sampling grid of one image (unfold mode)
  bool pixel_mode;                 // 1x1 kernel: every stride^2-th pixel of the flattened N*H*W grid
  int64_t groups, features, interleave;

  AECR_HOST_DEVICE int64_t taps() const { return kernel_h * kernel_w; }
  AECR_HOST_DEVICE int64_t plane() const { return height * width; }
  AECR_HOST_DEVICE int64_t columns() const { return channels * taps(); }
  // Patch rows in total, and the first row of image n.
  AECR_HOST_DEVICE int64_t rows() const { return first_row(batch); }
  AECR_HOST_DEVICE int64_t first_row(int64_t n) const {
    if (pixel_mode) {
      const int64_t step = stride * stride;
      return (n * plane() + step - 1) / step;  // rows whose pixel index r*step lies before image n
    }
    return n * patches_h * patches_w;
  }
  AECR_HOST_DEVICE int64_t matrix_rows() const { return rows() * interleave; }
};

// Column of (matrix g, feature f, sub-block j), and back.
AECR_HOST_DEVICE AECR_INLINE int64_t stat_column(const PatchShape& s, int64_t g, int64_t f, int64_t j) {
  return (g * s.features + f) * s.interleave + j;
}

AECR_HOST_DEVICE AECR_INLINE void column_slot(const PatchShape& s, int64_t col, int64_t& g, int64_t& f, int64_t& j) {
  j = col % s.interleave;
  const int64_t gf = col / s.interleave;
  f = gf % s.features;
  g = gf / s.features;
}

// Image and top-left input position of patch row r (for a 1x1 kernel: the sampled pixel itself).
AECR_HOST_DEVICE AECR_INLINE void patch_origin(const PatchShape& s, int64_t r, int64_t& n, int64_t& y0, int64_t& x0) {
  if (s.pixel_mode) {
    const int64_t flat = r * s.stride * s.stride;
    n = flat / s.plane();
    y0 = (flat % s.plane()) / s.width;
    x0 = flat % s.width;
    return;
  }
  const int64_t per_image = s.patches_h * s.patches_w;
  const int64_t l = r % per_image;
  n = r / per_image;
  y0 = (l / s.patches_w) * s.stride - s.pad_h;
  x0 = (l % s.patches_w) * s.stride - s.pad_w;
}

// Offset of a tap from the patch origin.
AECR_HOST_DEVICE AECR_INLINE int64_t tap_dy(const PatchShape& s, int64_t tap) { return (tap / s.kernel_w) * s.dilation_h; }
AECR_HOST_DEVICE AECR_INLINE int64_t tap_dx(const PatchShape& s, int64_t tap) { return (tap % s.kernel_w) * s.dilation_w; }

// Flat index into input [N, C, H, W] of patch row r, column col; -1 in the zero padding.
AECR_HOST_DEVICE AECR_INLINE int64_t patch_source(const PatchShape& s, int64_t r, int64_t col) {
  int64_t n, y0, x0;
  patch_origin(s, r, n, y0, x0);
  const int64_t c = col / s.taps(), tap = col % s.taps();
  const int64_t y = y0 + tap_dy(s, tap), x = x0 + tap_dx(s, tap);
  if (y < 0 || y >= s.height || x < 0 || x >= s.width) return -1;
  return ((n * s.channels + c) * s.height + y) * s.width + x;
}

// Where column col of a patch row goes in a tile of `tile_rows` rows, relative to that row's first sub-row:
// tile[g][(r - r0) * interleave + j][f] = tile + (r - r0) * interleave * F + column_tile_offset(col).
AECR_HOST_DEVICE AECR_INLINE int64_t column_tile_offset(const PatchShape& s, int64_t tile_rows, int64_t col) {
  int64_t g, f, j;
  column_slot(s, col, g, f, j);
  return (g * tile_rows * s.interleave + j) * s.features + f;
}

// Tile entry e of [groups, tile_rows * interleave, F]: its patch row (absolute) and column.
AECR_HOST_DEVICE AECR_INLINE void tile_entry(const PatchShape& s, int64_t r0, int64_t tile_rows, int64_t e,
                                             int64_t& r, int64_t& col) {
  const int64_t f = e % s.features;
  const int64_t sub = (e / s.features) % (tile_rows * s.interleave);
  const int64_t g = e / (s.features * tile_rows * s.interleave);
  r = r0 + sub / s.interleave;
  col = stat_column(s, g, f, sub % s.interleave);
}

// Value of tile entry e minus `shift` of its (matrix, feature) (the mean, or 0).
// (Pointer parameters are templates so that the CUDA emulator's checked pointers pass too.)
template <typename T, typename In>
AECR_HOST_DEVICE AECR_INLINE T tile_value(const PatchShape& s, int64_t r0, int64_t tile_rows, int64_t e, In input,
                                          In shift) {
  int64_t r, col;
  tile_entry(s, r0, tile_rows, e, r, col);
  const int64_t src = patch_source(s, r, col);
  const T v = src < 0 ? T(0) : static_cast<T>(input[src]);
  const int64_t gf = (e / (s.features * tile_rows * s.interleave)) * s.features + e % s.features;
  return shift == nullptr ? v : v - static_cast<T>(shift[gf]);
}

// Entry of (patch row r, column col) in a tile's layout, or -1 when r is not one of the tile's rows.
AECR_HOST_DEVICE AECR_INLINE int64_t tile_offset(const PatchShape& s, int64_t r0, int64_t tile_rows, int64_t r,
                                                 int64_t col) {
  if (r < r0 || r >= r0 + tile_rows) return -1;
  return (r - r0) * s.interleave * s.features + column_tile_offset(s, tile_rows, col);
}

// Gradient of input element `index` ([N, C, H, W] flat) from the gradient of a tile's patch entries
// (grad_tile laid out like the tile): the sum over every (patch, tap) of the tile that reads this element.
template <typename T, typename In>
AECR_HOST_DEVICE AECR_INLINE T gather_input_grad(const PatchShape& s, int64_t index, int64_t r0, int64_t tile_rows,
                                                 In grad_tile) {
  const int64_t x = index % s.width;
  const int64_t y = (index / s.width) % s.height;
  const int64_t c = (index / s.plane()) % s.channels;
  const int64_t n = index / (s.plane() * s.channels);
  T acc = T(0);
  if (s.pixel_mode) {
    const int64_t flat = n * s.plane() + y * s.width + x;
    if (flat % (s.stride * s.stride) == 0) {
      const int64_t o = tile_offset(s, r0, tile_rows, flat / (s.stride * s.stride), c);
      if (o >= 0) acc += static_cast<T>(grad_tile[o]);
    }
    return acc;
  }
  for (int64_t i = 0; i < s.kernel_h; ++i) {
    const int64_t py_s = y + s.pad_h - i * s.dilation_h;
    if (py_s < 0 || py_s % s.stride != 0 || py_s / s.stride >= s.patches_h) continue;
    for (int64_t k = 0; k < s.kernel_w; ++k) {
      const int64_t px_s = x + s.pad_w - k * s.dilation_w;
      if (px_s < 0 || px_s % s.stride != 0 || px_s / s.stride >= s.patches_w) continue;
      const int64_t r = n * s.patches_h * s.patches_w + (py_s / s.stride) * s.patches_w + px_s / s.stride;
      const int64_t o = tile_offset(s, r0, tile_rows, r, c * s.taps() + i * s.kernel_w + k);
      if (o >= 0) acc += static_cast<T>(grad_tile[o]);
    }
  }
  return acc;
}

}  // namespace aecr
