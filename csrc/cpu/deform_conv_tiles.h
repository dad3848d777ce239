// What the CPU's channels-last tile loops (deform_conv_rows.h) share: a problem's raw pointers and a sampling
// site's four corners as rows of channels.
#pragma once

#include <cstdint>

#include "aecr/deform_conv.h"
#include "deform_conv_driver.h"

namespace aecr {
namespace cpu {

// A tile loop's view of one call. features: [B, H, W, C]; offset, mask (null: none) as deform_conv.h lays them
// out; zeros: C zeros, the row an outside corner reads.
template <typename T>
struct RowsProblem {
  const DeformConvShape& s;
  const RowLayout& layout;
  const T* features;
  const T* offset;
  const T* mask;
  const T* zeros;
};

// A site's bilinear point (bilinear.h) with each corner as the start of its row of channels in `features` (the
// zero row outside the plane), and the site's mask.
template <typename T>
struct Corners {
  const T* row[4];
  int64_t index[4];  // the corners' pixels in the image's plane (0 outside)
  T weight[4], d_h[4], d_w[4];
  T mask;
};

// The grid position of the window of output pixel `pixel` (its tap 0).
struct WindowOrigin {
  int64_t h, w;
};

inline WindowOrigin window_origin(const DeformConvShape& s, int64_t pixel) {
  return WindowOrigin{pixel / s.out_width * s.stride_h - s.pad_h, pixel % s.out_width * s.stride_w - s.pad_w};
}

// The corners of a site whose output pixel's window starts at `origin`.
template <typename T>
inline Corners<T> corners_of(const RowsProblem<T>& pr, const SamplingSite& site, const WindowOrigin& origin,
                             bool derivatives) {
  const DeformConvShape& s = pr.s;
  T h, w;
  offset_position<T>(s, site, origin.h + pr.layout.tap_h[site.k], origin.w + pr.layout.tap_w[site.k], pr.offset, h,
                     w);
  const BilinearPoint<T> p = bilinear_point<T>(h, w, s.height, s.width);
  Corners<T> c;
  const T* image = pr.features + site.b * s.plane() * s.channels;
  for (int j = 0; j < 4; ++j) {
    c.row[j] = p.inside[j] ? image + p.index[j] * s.channels : pr.zeros;
    c.index[j] = p.index[j];
    c.weight[j] = p.weight[j];
    if (derivatives) {
      c.d_h[j] = p.d_h[j];
      c.d_w[j] = p.d_w[j];
    }
  }
  c.mask = site_mask<T>(s, site, pr.mask);
  return c;
}

}  // namespace cpu
}  // namespace aecr
