// Bilinear sampling of one zero-padded H x W plane, and its derivatives.
//
// No torch types here: the CPU loops and the CUDA kernels call exactly these functions.
#pragma once

#include <math.h>

#include <cmath>
#include <cstdint>

#include "aecr/macros.h"

namespace aecr {

AECR_HOST_DEVICE AECR_INLINE float floor_of(float x) { return floorf(x); }
AECR_HOST_DEVICE AECR_INLINE double floor_of(double x) { return floor(x); }

// The four corners of a bilinear sample at (h, w), in the order
// (h0, w0), (h0, w0 + 1), (h0 + 1, w0), (h0 + 1, w0 + 1) with h0 = floor(h), w0 = floor(w).
//
// A corner outside the plane has index 0 and all its weights 0, so callers read and write
// every corner unconditionally without touching memory outside the plane. A sample at
// h <= -1, h >= H, w <= -1 or w >= W (and any non-finite coordinate) has all corners zero:
// its value and both derivatives are 0.
template <typename T>
struct BilinearPoint {
  int64_t index[4];  // flat offsets into the plane, row-major
  T weight[4];       // interpolation weights
  T d_h[4];          // d weight / d h
  T d_w[4];          // d weight / d w
};

template <typename T>
AECR_HOST_DEVICE AECR_INLINE BilinearPoint<T> bilinear_point(T h, T w, int64_t height, int64_t width) {
  BilinearPoint<T> p;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    p.index[i] = 0;
    p.weight[i] = T(0);
    p.d_h[i] = T(0);
    p.d_w[i] = T(0);
  }
  // Written so that NaN fails the test: no conversion of a non-finite or huge value to an integer below.
  if (!(h > T(-1) && h < T(height) && w > T(-1) && w < T(width))) {
    return p;
  }
  const T hf = floor_of(h);
  const T wf = floor_of(w);
  const int64_t h0 = static_cast<int64_t>(hf);
  const int64_t w0 = static_cast<int64_t>(wf);
  const T lh = h - hf;
  const T lw = w - wf;
  const T hh = T(1) - lh;
  const T hw = T(1) - lw;

  const bool row_ok[2] = {h0 >= 0, h0 + 1 < height};
  const bool col_ok[2] = {w0 >= 0, w0 + 1 < width};
  const T row_w[2] = {hh, lh};
  const T col_w[2] = {hw, lw};
  const T row_d[2] = {T(-1), T(1)};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      if (row_ok[r] && col_ok[c]) {
        const int i = 2 * r + c;
        p.index[i] = (h0 + r) * width + (w0 + c);
        p.weight[i] = row_w[r] * col_w[c];
        p.d_h[i] = row_d[r] * col_w[c];
        p.d_w[i] = row_w[r] * row_d[c];
      }
    }
  }
  return p;
}

// Value of the plane at the point. V is the storage type, T the accumulation type.
template <typename T, typename V>
AECR_HOST_DEVICE AECR_INLINE T bilinear_value(const BilinearPoint<T>& p, const V* plane) {
  T v = T(0);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v += p.weight[i] * static_cast<T>(plane[p.index[i]]);
  }
  return v;
}

// Value and partial derivatives d value / d h, d value / d w of the plane at the point.
template <typename T, typename V>
AECR_HOST_DEVICE AECR_INLINE void bilinear_value_and_grad(
    const BilinearPoint<T>& p, const V* plane, T& value, T& grad_h, T& grad_w) {
  value = T(0);
  grad_h = T(0);
  grad_w = T(0);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const T x = static_cast<T>(plane[p.index[i]]);
    value += p.weight[i] * x;
    grad_h += p.d_h[i] * x;
    grad_w += p.d_w[i] * x;
  }
}

// Adds g * weight to each corner of the plane (the adjoint of bilinear_value). `Add` says how:
// a plain += where one thread owns the plane (CPU), an atomic add where many do (CUDA).
template <typename Add, typename T, typename A>
AECR_HOST_DEVICE AECR_INLINE void bilinear_scatter(const BilinearPoint<T>& p, A* plane, T g) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (p.weight[i] != T(0)) {
      Add::add(plane + p.index[i], static_cast<A>(g * p.weight[i]));
    }
  }
}

struct PlainAdd {
  template <typename A>
  AECR_HOST_DEVICE AECR_INLINE static void add(A* dst, A v) { *dst += v; }
};

}  // namespace aecr
