// Coupled Newton-Schulz iteration for the inverse square root, and its reverse mode; per-element math shared
// by the CPU loops and the CUDA kernels.
//
//   Y0 = A / ||A||_F, Z0 = I;  for k < n:  T_k = (3I - Z_k Y_k) / 2,  Y_{k+1} = Y_k T_k,  Z_{k+1} = T_k Z_k;
//   result D = Z_n / sqrt(||A||_F).
//
// Two evaluations of this same function:
//  - matrix form (F small): the iteration itself, on F x F row-major matrices. Work is split into element
//    ranges [begin, F*F) with a step, so one CPU thread (begin 0, step 1) or a CUDA block (threadIdx, blockDim)
//    runs the same code; callers synchronise between steps.
//  - spectral form (F large, symmetric A): every iterate is a polynomial in Y0, so in Y0's eigenbasis the
//    iteration runs on each eigenvalue alone (scalar_iteration), and the reverse mode needs the divided
//    differences of that polynomial (divided_difference), propagated through the same recurrence.
#pragma once

#include <math.h>

#include <cstdint>

#include "aecr/macros.h"

namespace aecr {

// Up to this many features the iteration runs in matrix form; above, in spectral form (see above).
constexpr int64_t kNsFusedMaxFeatures = 48;

// Matrices are F x F row-major arrays of T behind pointers of any kind: T*, const T*, or the CUDA emulator's
// checked pointers (tests/cuda_emulation); `Work` is the type of the writable ones.

// (op(A) op(B))[i, j] with op = transpose where asked.
template <typename T, typename A, typename B>
AECR_HOST_DEVICE AECR_INLINE T product_element(A a, bool ta, B b, bool tb, int64_t f, int64_t i, int64_t j) {
  T acc = T(0);
  for (int64_t k = 0; k < f; ++k) {
    const T x = ta ? static_cast<T>(a[k * f + i]) : static_cast<T>(a[i * f + k]);
    const T y = tb ? static_cast<T>(b[j * f + k]) : static_cast<T>(b[k * f + j]);
    acc += x * y;
  }
  return acc;
}

// out = A B, for elements begin, begin + step, ...
template <typename T, typename A, typename B, typename Work>
AECR_HOST_DEVICE AECR_INLINE void product_part(A a, B b, Work out, int64_t f, int64_t begin, int64_t step) {
  for (int64_t e = begin; e < f * f; e += step) out[e] = product_element<T>(a, false, b, false, f, e / f, e % f);
}

// Elementwise out = x / divisor.
template <typename T, typename X, typename Work>
AECR_HOST_DEVICE AECR_INLINE void divide_part(X x, Work out, T divisor, int64_t f, int64_t begin, int64_t step) {
  for (int64_t e = begin; e < f * f; e += step) out[e] = static_cast<T>(x[e]) / divisor;
}

// The three steps of one forward iteration (callers synchronise between them):
//   1: T = 1.5 I - 0.5 Z Y          2: Y' = Y T,  Z' = T Z   (into separate buffers)
template <typename T, typename Work>
AECR_HOST_DEVICE AECR_INLINE void ns_step_t(Work y, Work z, Work t, int64_t f, int64_t begin, int64_t step) {
  for (int64_t e = begin; e < f * f; e += step) {
    const int64_t i = e / f, j = e % f;
    t[e] = T(0.5) * ((i == j ? T(3) : T(0)) - product_element<T>(z, false, y, false, f, i, j));
  }
}

template <typename T, typename Work>
AECR_HOST_DEVICE AECR_INLINE void ns_step_yz(Work y, Work z, Work t, Work y_next, Work z_next, int64_t f,
                                             int64_t begin, int64_t step) {
  product_part<T>(y, t, y_next, f, begin, step);
  product_part<T>(t, z, z_next, f, begin, step);
}

// Reverse of one iteration, given Y_k, Z_k, T_k and the gradients gY, gZ of Y_{k+1}, Z_{k+1}:
//   gT = Y^T gY + gZ Z^T;   gY_k = gY T^T - 0.5 Z^T gT;   gZ_k = T^T gZ - 0.5 gT Y^T.
// Step 1 writes gT; step 2 writes gY_k, gZ_k into separate buffers.
template <typename T, typename Work>
AECR_HOST_DEVICE AECR_INLINE void ns_reverse_gt(Work y, Work z, Work g_y, Work g_z, Work g_t, int64_t f,
                                                int64_t begin, int64_t step) {
  for (int64_t e = begin; e < f * f; e += step) {
    const int64_t i = e / f, j = e % f;
    g_t[e] = product_element<T>(y, true, g_y, false, f, i, j) + product_element<T>(g_z, false, z, true, f, i, j);
  }
}

template <typename T, typename Work>
AECR_HOST_DEVICE AECR_INLINE void ns_reverse_yz(Work y, Work z, Work t, Work g_y, Work g_z, Work g_t, Work g_y_prev,
                                                Work g_z_prev, int64_t f, int64_t begin, int64_t step) {
  for (int64_t e = begin; e < f * f; e += step) {
    const int64_t i = e / f, j = e % f;
    g_y_prev[e] =
        product_element<T>(g_y, false, t, true, f, i, j) - T(0.5) * product_element<T>(z, true, g_t, false, f, i, j);
    g_z_prev[e] =
        product_element<T>(t, true, g_z, false, f, i, j) - T(0.5) * product_element<T>(g_t, false, y, true, f, i, j);
  }
}

// ---- Matrix form, whole programs --------------------------------------------------------------------------
// One matrix at a time, by one CPU thread or one CUDA block. `sync` is a barrier between steps (no-op on the
// CPU, __syncthreads on CUDA). `work` holds kNsWorkMatrices F x F matrices.

constexpr int64_t kNsWorkMatrices = 10;

template <typename T, typename In, typename Work, class Sync>
AECR_HOST_DEVICE AECR_INLINE void ns_start(In a, T norm, Work y, Work z, int64_t f, int64_t begin, int64_t step,
                                           Sync sync) {
  divide_part<T>(a, y, norm, f, begin, step);
  for (int64_t e = begin; e < f * f; e += step) z[e] = (e / f == e % f) ? T(1) : T(0);
  sync();
}

// Runs `iters` iterations from (y, z), leaving the result in (y, z); t, y2, z2 are scratch.
template <typename T, typename Work, class Sync>
AECR_HOST_DEVICE AECR_INLINE void ns_iterate(Work& y, Work& z, Work t, Work& y2, Work& z2, int64_t iters, int64_t f,
                                             int64_t begin, int64_t step, Sync sync) {
  for (int64_t k = 0; k < iters; ++k) {
    ns_step_t<T>(y, z, t, f, begin, step);
    sync();
    ns_step_yz<T>(y, z, t, y2, z2, f, begin, step);
    sync();
    Work swap = y; y = y2; y2 = swap;
    swap = z; z = z2; z2 = swap;
  }
}

// out = Z_n / sqrt(norm) for A = a (norm = ||A||_F).
template <typename T, typename In, typename Work, class Sync>
AECR_HOST_DEVICE AECR_INLINE void ns_forward_program(In a, T norm, Work out, Work work, int64_t f, int64_t n_iter,
                                                     int64_t begin, int64_t step, Sync sync) {
  const int64_t ff = f * f;
  Work y = work, z = work + ff, t = work + 2 * ff, y2 = work + 3 * ff, z2 = work + 4 * ff;
  ns_start<T>(a, norm, y, z, f, begin, step, sync);
  ns_iterate<T>(y, z, t, y2, z2, n_iter, f, begin, step, sync);
  divide_part<T>(z, out, sqrt(norm), f, begin, step);
}

// grad_y0 = d<grad, Z_n / sqrt(norm)> / d Y0 (the normalisation's own gradient is added by the caller).
// The iterates are not kept: before reversing iteration k, Y_k and Z_k are recomputed from Y0, so memory stays
// at a fixed ten matrices whatever n_iter is (n_iter^2 / 2 forward steps, cheap for the small F this serves).
template <typename T, typename In, typename Work, class Sync>
AECR_HOST_DEVICE AECR_INLINE void ns_backward_program(In a, T norm, In grad, Work grad_y0, Work work, int64_t f,
                                                      int64_t n_iter, int64_t begin, int64_t step, Sync sync) {
  const int64_t ff = f * f;
  Work y = work, z = work + ff, t = work + 2 * ff, y2 = work + 3 * ff, z2 = work + 4 * ff;
  Work gy = work + 5 * ff, gz = work + 6 * ff, gt = work + 7 * ff, gy2 = work + 8 * ff, gz2 = work + 9 * ff;
  divide_part<T>(grad, gz, sqrt(norm), f, begin, step);
  for (int64_t e = begin; e < ff; e += step) gy[e] = T(0);
  sync();
  for (int64_t k = n_iter - 1; k >= 0; --k) {
    ns_start<T>(a, norm, y, z, f, begin, step, sync);
    ns_iterate<T>(y, z, t, y2, z2, k, f, begin, step, sync);
    ns_step_t<T>(y, z, t, f, begin, step);
    sync();
    ns_reverse_gt<T>(y, z, gy, gz, gt, f, begin, step);
    sync();
    ns_reverse_yz<T>(y, z, t, gy, gz, gt, gy2, gz2, f, begin, step);
    sync();
    Work swap = gy; gy = gy2; gy2 = swap;
    swap = gz; gz = gz2; gz2 = swap;
  }
  for (int64_t e = begin; e < ff; e += step) grad_y0[e] = gy[e];
}

// ---- Spectral form ----------------------------------------------------------------------------------------

// z_n(lambda) of the scalar recurrence y0 = lambda, z0 = 1, t = (3 - z y)/2, y <- y t, z <- t z.
template <typename T>
AECR_HOST_DEVICE AECR_INLINE T scalar_iteration(T lambda, int64_t n_iter) {
  T y = lambda, z = T(1);
  for (int64_t k = 0; k < n_iter; ++k) {
    const T t = T(1.5) - T(0.5) * z * y;
    y = y * t;
    z = t * z;
  }
  return z;
}

// One step of the divided differences [y], [z] of the recurrence between points a and b, given the iterates
// y, z and t = (3 - z y)/2 at both points before the step ([uv] = u(a) [v] + [u] v(b), the product rule of
// divided differences).
template <typename T>
AECR_HOST_DEVICE AECR_INLINE void divided_difference_step(T ya, T za, T ta, T yb, T zb, T tb, T& dy, T& dz) {
  const T dt = T(-0.5) * (za * dy + dz * yb);
  const T dy_next = ya * dt + dy * tb;
  dz = ta * dz + dt * zb;
  dy = dy_next;
}

// The divided difference (z_n(a) - z_n(b)) / (a - b), and z_n'(a) when a == b, without cancellation: the
// recurrence runs on both points together with the divided differences of y and z ([y0] = 1, [z0] = 0).
template <typename T>
AECR_HOST_DEVICE AECR_INLINE T divided_difference(T a, T b, int64_t n_iter) {
  T ya = a, yb = b, za = T(1), zb = T(1);
  T dy = T(1), dz = T(0);
  for (int64_t k = 0; k < n_iter; ++k) {
    const T ta = T(1.5) - T(0.5) * za * ya;
    const T tb = T(1.5) - T(0.5) * zb * yb;
    divided_difference_step(ya, za, ta, yb, zb, tb, dy, dz);
    ya = ya * ta;
    yb = yb * tb;
    za = ta * za;
    zb = tb * zb;
  }
  return dz;
}

}  // namespace aecr
