// Bilinear sampling of one zero-padded H x W plane, and its derivatives.
//
// No torch types here: the CPU loops and the CUDA kernels call exactly these functions.
#pragma once

#include <math.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <type_traits>

#include "aecr/macros.h"

namespace aecr {

AECR_HOST_DEVICE AECR_INLINE float floor_of(float x) { return floorf(x); }
AECR_HOST_DEVICE AECR_INLINE double floor_of(double x) { return floor(x); }

// The element type of a pointer: of T* and of the emulator's checked pointers (tests/cuda_emulation), which the
// functions below take as well (their pointer parameters are templates).
template <typename P>
using pointee_t = std::remove_cv_t<typename std::pointer_traits<P>::element_type>;

// The four corners of a bilinear sample at (h, w), in the order
// (h0, w0), (h0, w0 + 1), (h0 + 1, w0), (h0 + 1, w0 + 1) with h0 = floor(h), w0 = floor(w).
//
// A corner outside the plane is not `inside`: it has index 0 and all its weights 0, and it is never read, so a
// NaN or Inf in the plane reaches only the samples that read it (torchvision's semantics; a corner inside the
// plane is read even when its weight is 0, as torchvision does). A sample at h <= -1, h >= H, w <= -1 or
// w >= W (and any non-finite coordinate) has all corners outside: its value and both derivatives are 0.
template <typename T>
struct BilinearPoint {
  int64_t index[4];  // flat offsets into the plane, row-major
  T weight[4];       // interpolation weights
  T d_h[4];          // d weight / d h
  T d_w[4];          // d weight / d w
  bool inside[4];    // whether the corner lies in the plane
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
    p.inside[i] = false;
  }
  // Written so that NaN fails the test: no conversion of a non-finite or huge value to an integer below.
  if (!(h > T(-1) && h < T(height) && w > T(-1) && w < T(width))) {
    return p;
  }
  AECR_COUNT_FLOPS(T, 10);  // 2 floors, 4 subtractions, 4 corner weights
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
        p.inside[i] = true;
      }
    }
  }
  return p;
}

// The plane's value at corner i, 0 outside the plane (not read).
template <typename T, typename Plane>
AECR_HOST_DEVICE AECR_INLINE T corner_value(const BilinearPoint<T>& p, int i, Plane plane) {
  return p.inside[i] ? static_cast<T>(plane[p.index[i]]) : T(0);
}

// Value of the plane at the point. The plane's elements are the storage type, T the accumulation type.
template <typename T, typename Plane>
AECR_HOST_DEVICE AECR_INLINE T bilinear_value(const BilinearPoint<T>& p, Plane plane) {
  AECR_COUNT_FLOPS(T, 8);  // 4 FMAs
  T v = T(0);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v += p.weight[i] * corner_value(p, i, plane);
  }
  return v;
}

// Value and partial derivatives d value / d h, d value / d w of the plane at the point.
template <typename T, typename Plane>
AECR_HOST_DEVICE AECR_INLINE void bilinear_value_and_grad(
    const BilinearPoint<T>& p, Plane plane, T& value, T& grad_h, T& grad_w) {
  AECR_COUNT_FLOPS(T, 24);  // 12 FMAs
  value = T(0);
  grad_h = T(0);
  grad_w = T(0);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const T x = corner_value(p, i, plane);
    value += p.weight[i] * x;
    grad_h += p.d_h[i] * x;
    grad_w += p.d_w[i] * x;
  }
}

// Adds g * weight to each corner of the plane with a non-zero weight (the adjoint of bilinear_value; like
// torchvision, corners of weight 0 receive nothing). `Add` says how: a plain += where one thread owns the plane
// (CPU), an atomic add where many do (CUDA).
template <typename Add, typename T, typename Plane>
AECR_HOST_DEVICE AECR_INLINE void bilinear_scatter(const BilinearPoint<T>& p, Plane plane, T g) {
  AECR_COUNT_FLOPS(T, 4);  // 4 products (the adds are the atomics')
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (p.weight[i] != T(0)) {
      Add::add(plane + p.index[i], static_cast<pointee_t<Plane>>(g * p.weight[i]));
    }
  }
}

struct PlainAdd {
  template <typename P, typename A>
  AECR_HOST_DEVICE AECR_INLINE static void add(P dst, A v) { *dst += v; }
};

}  // namespace aecr
