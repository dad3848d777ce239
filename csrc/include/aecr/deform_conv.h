// Per-element bodies of modulated deformable convolution (DCNv2), shared by the CPU and CUDA drivers.
//
// Layouts (all row-major, contiguous):
//   input   [B, C, H, W]
//   offset  [B, OG * 2 * K, Ho, Wo]   per offset group and tap k: dy then dx
//   mask    [B, OG * K, Ho, Wo]       (absent: every mask value is 1)
//   columns [C * K, n * Pc]           row c * K + k, column b * Pc + (pixel - p0), for a chunk (ColumnChunk) of
//                                     n images and the Pc output pixels [p0, p0 + Pc) of each
// with K = kh * kw taps and P = Ho * Wo output pixels.
#pragma once

#include <cstdint>

#include "aecr/bilinear.h"
#include "aecr/macros.h"

namespace aecr {

struct DeformConvShape {
  int64_t channels, height, width;            // input C, H, W
  int64_t out_height, out_width;              // Ho, Wo
  int64_t kernel_h, kernel_w;                 // kh, kw
  int64_t stride_h, stride_w;
  int64_t pad_h, pad_w;
  int64_t dilation_h, dilation_w;
  int64_t offset_groups;                      // OG, divides C

  AECR_HOST_DEVICE int64_t taps() const { return kernel_h * kernel_w; }
  AECR_HOST_DEVICE int64_t pixels() const { return out_height * out_width; }
  AECR_HOST_DEVICE int64_t plane() const { return height * width; }
  AECR_HOST_DEVICE int64_t channels_per_offset_group() const { return channels / offset_groups; }
};

// One sampling location: image b, offset group g, tap k, output pixel `pixel`.
// Its bilinear point is shared by every channel of the offset group.
struct SamplingSite {
  int64_t b, g, k, pixel;
};

// A chunk of the column work: n images (the tensors narrowed to them), and of each the output pixels
// [pixel_begin, pixel_begin + pixels). Whole images while their columns fit the budget; pixel ranges of one
// image (n = 1) beyond, so that no buffer grows with the image.
struct ColumnChunk {
  int64_t images, pixel_begin, pixels;

  AECR_HOST_DEVICE int64_t width() const { return images * pixels; }  // columns of the column matrix
  AECR_HOST_DEVICE int64_t sites(const DeformConvShape& s) const { return images * s.offset_groups * s.taps() * pixels; }
};

// The chunk of n whole images.
AECR_HOST_DEVICE AECR_INLINE ColumnChunk whole_images(const DeformConvShape& s, int64_t n) {
  return ColumnChunk{n, 0, s.pixels()};
}

// Decomposes a flat site index over [n, OG, K, P] (P fastest, so neighbouring threads touch
// neighbouring pixels).
AECR_HOST_DEVICE AECR_INLINE SamplingSite site_from_index(const DeformConvShape& s, int64_t index) {
  SamplingSite site;
  site.pixel = index % s.pixels();
  index /= s.pixels();
  site.k = index % s.taps();
  index /= s.taps();
  site.g = index % s.offset_groups;
  site.b = index / s.offset_groups;
  return site;
}

// The same over a chunk's sites [n, OG, K, Pc].
AECR_HOST_DEVICE AECR_INLINE SamplingSite site_from_index(const DeformConvShape& s, const ColumnChunk& chunk,
                                                          int64_t index) {
  SamplingSite site;
  site.pixel = chunk.pixel_begin + index % chunk.pixels;
  index /= chunk.pixels;
  site.k = index % s.taps();
  index /= s.taps();
  site.g = index % s.offset_groups;
  site.b = index / s.offset_groups;
  return site;
}

// Offset of the dy value of a site within the offset tensor; dx follows one plane later.
AECR_HOST_DEVICE AECR_INLINE int64_t offset_index(const DeformConvShape& s, const SamplingSite& t) {
  return ((t.b * s.offset_groups + t.g) * 2 * s.taps() + 2 * t.k) * s.pixels() + t.pixel;
}

AECR_HOST_DEVICE AECR_INLINE int64_t mask_index(const DeformConvShape& s, const SamplingSite& t) {
  return ((t.b * s.offset_groups + t.g) * s.taps() + t.k) * s.pixels() + t.pixel;
}

// Sampling position of a site in the input plane: its regular grid position (grid_h, grid_w), the tap's place
// in the kernel window around the output pixel's, plus the learned offset.
// (Pointer parameters are templates so that the CUDA emulator's checked pointers pass too.)
template <typename T, typename Offset>
AECR_HOST_DEVICE AECR_INLINE void offset_position(
    const DeformConvShape& s, const SamplingSite& t, int64_t grid_h, int64_t grid_w, Offset offset, T& h, T& w) {
  const int64_t o = offset_index(s, t);
  h = static_cast<T>(grid_h) + static_cast<T>(offset[o]);
  w = static_cast<T>(grid_w) + static_cast<T>(offset[o + s.pixels()]);
}

template <typename T, typename Offset>
AECR_HOST_DEVICE AECR_INLINE void sampling_position(
    const DeformConvShape& s, const SamplingSite& t, Offset offset, T& h, T& w) {
  const int64_t y = t.pixel / s.out_width;
  const int64_t x = t.pixel % s.out_width;
  const int64_t i = t.k / s.kernel_w;
  const int64_t j = t.k % s.kernel_w;
  offset_position<T>(s, t, y * s.stride_h - s.pad_h + i * s.dilation_h, x * s.stride_w - s.pad_w + j * s.dilation_w,
                     offset, h, w);
}

template <typename T, typename Mask>
AECR_HOST_DEVICE AECR_INLINE T site_mask(const DeformConvShape& s, const SamplingSite& t, Mask mask) {
  return mask == nullptr ? T(1) : static_cast<T>(mask[mask_index(s, t)]);
}

template <typename T, typename Offset>
AECR_HOST_DEVICE AECR_INLINE BilinearPoint<T> site_point(const DeformConvShape& s, const SamplingSite& t, Offset offset) {
  T h, w;
  sampling_position<T>(s, t, offset, h, w);
  return bilinear_point<T>(h, w, s.height, s.width);
}

// Column row of channel c (absolute channel index) and tap k; column of (chunk image b, pixel) for a pixel of
// the chunk.
AECR_HOST_DEVICE AECR_INLINE int64_t column_index(
    const DeformConvShape& s, const ColumnChunk& chunk, int64_t c, int64_t k, int64_t b, int64_t pixel) {
  return (c * s.taps() + k) * chunk.width() + b * chunk.pixels + (pixel - chunk.pixel_begin);
}

// ---- Pieces shared by the CPU loops and the CUDA kernels --------------------------------------------

// One entry of the column matrix: the masked bilinear sample of a channel plane at a site.
template <typename T, typename Plane>
AECR_HOST_DEVICE AECR_INLINE T column_value(const BilinearPoint<T>& p, T mask, Plane plane) {
  return mask * bilinear_value<T>(p, plane);
}

// Running sums over the channels of an offset group for the offset and mask gradients of one site:
//   value = sum_c gcol_c * sample_c,  h = sum_c gcol_c * d sample_c / dh,  w likewise.
template <typename T>
struct SiteGradSums {
  T value, h, w;
};

// Returns the bilinear sample itself (the column value is mask times it).
template <typename T, typename Plane>
AECR_HOST_DEVICE AECR_INLINE T accumulate_site_grad(
    const BilinearPoint<T>& p, Plane plane, T grad_column, SiteGradSums<T>& sums) {
  T v, gh, gw;
  bilinear_value_and_grad<T>(p, plane, v, gh, gw);
  sums.value += grad_column * v;
  sums.h += grad_column * gh;
  sums.w += grad_column * gw;
  return v;
}

// grad_dy = mask * sums.h, grad_dx = mask * sums.w, grad_mask = sums.value; either output may be null.
template <typename T, typename Out>
AECR_HOST_DEVICE AECR_INLINE void store_site_grad(
    const DeformConvShape& s, const SamplingSite& t, T mask, const SiteGradSums<T>& sums, Out grad_offset,
    Out grad_mask) {
  using V = pointee_t<Out>;
  if (grad_offset != nullptr) {  // null: not asked for (the mask gradient alone)
    const int64_t o = offset_index(s, t);
    grad_offset[o] = static_cast<V>(mask * sums.h);
    grad_offset[o + s.pixels()] = static_cast<V>(mask * sums.w);
  }
  if (grad_mask != nullptr) grad_mask[mask_index(s, t)] = static_cast<V>(sums.value);
}

// ---- Whole-site bodies (one CUDA thread per site; the CPU runs the same pieces over tiles of sites) ----

// columns[c, k, b, pixel] = mask * bilinear(image[c]) for every channel c of the site's offset group.
// `image` points at image b of the chunk; offset and mask (the geometry, of their own dtype G) at the chunk's
// first image.
template <typename T, typename In, typename G, typename Out>
AECR_HOST_DEVICE AECR_INLINE void im2col_site(
    const DeformConvShape& s, const ColumnChunk& chunk, const SamplingSite& t, In image, G offset, G mask, Out columns) {
  const BilinearPoint<T> p = site_point<T>(s, t, offset);
  const T m = site_mask<T>(s, t, mask);
  const int64_t cpg = s.channels_per_offset_group();
  for (int64_t c = t.g * cpg; c < (t.g + 1) * cpg; ++c) {
    columns[column_index(s, chunk, c, t.k, t.b, t.pixel)] =
        static_cast<pointee_t<Out>>(column_value<T>(p, m, image + c * s.plane()));
  }
}

// Offset (dy, dx) and mask gradients of one site from the column gradient in `columns`, which it replaces, entry
// by entry, by the columns themselves (what the weight gradient needs).
template <typename T, typename In, typename G, typename Out, typename GradG>
AECR_HOST_DEVICE AECR_INLINE void offset_mask_grad_site(
    const DeformConvShape& s, const ColumnChunk& chunk, const SamplingSite& t, In image, G offset, G mask, Out columns,
    GradG grad_offset, GradG grad_mask) {
  using V = pointee_t<Out>;
  const BilinearPoint<T> p = site_point<T>(s, t, offset);
  const T m = site_mask<T>(s, t, mask);
  SiteGradSums<T> sums{T(0), T(0), T(0)};
  const int64_t cpg = s.channels_per_offset_group();
  for (int64_t c = t.g * cpg; c < (t.g + 1) * cpg; ++c) {
    const int64_t at = column_index(s, chunk, c, t.k, t.b, t.pixel);
    const T v = accumulate_site_grad<T>(p, image + c * s.plane(), static_cast<T>(columns[at]), sums);
    columns[at] = static_cast<V>(m * v);
  }
  store_site_grad<T>(s, t, m, sums, grad_offset, grad_mask);
}

// Adjoint of im2col for one site: adds mask * gcol * weight into the four corners of each channel's
// input-gradient plane. `grad_image` (of the accumulation type) points at image b.
template <typename Add, typename T, typename G, typename In, typename Acc>
AECR_HOST_DEVICE AECR_INLINE void col2im_site(
    const DeformConvShape& s, const ColumnChunk& chunk, const SamplingSite& t, G offset, G mask, In grad_columns,
    Acc grad_image) {
  const BilinearPoint<T> p = site_point<T>(s, t, offset);
  const T m = site_mask<T>(s, t, mask);
  const int64_t cpg = s.channels_per_offset_group();
  for (int64_t c = t.g * cpg; c < (t.g + 1) * cpg; ++c) {
    const T g = static_cast<T>(grad_columns[column_index(s, chunk, c, t.k, t.b, t.pixel)]);
    bilinear_scatter<Add, T>(p, grad_image + c * s.plane(), m * g);
  }
}

}  // namespace aecr
