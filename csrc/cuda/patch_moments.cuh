// FastDeconv's patch statistics in two launches on CUDA (F <= kMomentMaxFeatures), written over a launcher as
// in deform_conv_implicit_driver.h (cuda_launcher.cuh in production, tests/cuda_emulation on the CPU).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>

#include "aecr/patch_stats.h"
#include "cuda/device_memory.cuh"

namespace aecr {
namespace {

// ---- Statistics in two launches (F <= kMomentMaxFeatures) ---------------------------------------------------
// 1. Each block takes a run of one matrix's rows, stages kMomentRows of them at a time in shared memory
//    (straight from the input: no tile in global memory), shifts them by the mean of its first rows, and sums
//    the shifted values and their outer products (fp32 for fp32 input, one entry of F x F per thread slot).
// 2. One block per matrix merges the blocks' (count, shift, sum, products) in float64, in block order
//    (deterministic): mean = sum_b n_b m_b / M, cov = (sum_b C_b + n_b (m_b - mean)(m_b - mean)^T) / M + eps I,
//    with m_b = shift_b + sum_b / n_b and C_b = products_b - sum_b sum_b^T / n_b (Chan et al.'s merge).
constexpr int kMomentThreads = 256;
constexpr int kMomentRows = 32;
constexpr int64_t kMomentMaxFeatures = 64;
constexpr int kMomentSlots = int(kMomentMaxFeatures * kMomentMaxFeatures / kMomentThreads);

AECR_HOST_DEVICE AECR_INLINE int64_t moment_record(int64_t f) { return 1 + 2 * f + f * f; }

template <typename V>
__global__ void __launch_bounds__(kMomentThreads, 1) patch_moments_kernel(PatchShape s, int64_t rows_per_block,
                                                                       Global<const V> input,
                                                                       Global<at::opmath_type<V>> partial) {
  using T = at::opmath_type<V>;
  __shared__ Shared<T[kMomentRows][kMomentMaxFeatures]> x_s;
  __shared__ Shared<T[kMomentMaxFeatures]> shift_s;
  const int tid = threadIdx.x;
  const int64_t F = s.features, g = blockIdx.y, M = s.matrix_rows();
  const int64_t lo = blockIdx.x * rows_per_block;
  const int64_t hi = lo + rows_per_block < M ? lo + rows_per_block : M;
  T q[kMomentSlots];
#pragma unroll
  for (int i = 0; i < kMomentSlots; ++i) q[i] = T(0);
  T sum = T(0);
  for (int64_t m0 = lo; m0 < hi; m0 += kMomentRows) {
    const int rows = static_cast<int>(hi - m0 < kMomentRows ? hi - m0 : kMomentRows);
    __syncthreads();
    for (int e = tid; e < rows * F; e += kMomentThreads) {
      const int rr = e / F, f = e % F;
      const int64_t m = m0 + rr;
      const int64_t src = patch_source(s, m / s.interleave, stat_column(s, g, f, m % s.interleave));
      const T v = src < 0 ? T(0) : static_cast<T>(input[src]);
      x_s[rr][f] = m0 == lo ? v : v - shift_s[f];
    }
    __syncthreads();
    if (m0 == lo) {  // the shift: the mean of the block's first rows
      if (tid < F) {
        T acc = T(0);
        for (int rr = 0; rr < rows; ++rr) acc += static_cast<T>(x_s[rr][tid]);
        shift_s[tid] = acc / T(rows);
      }
      __syncthreads();
      for (int e = tid; e < rows * F; e += kMomentThreads) x_s[e / F][e % F] -= shift_s[e % F];
      __syncthreads();
    }
    if (tid < F) {
      for (int rr = 0; rr < rows; ++rr) sum += static_cast<T>(x_s[rr][tid]);
    }
#pragma unroll
    for (int i = 0; i < kMomentSlots; ++i) {
      const int64_t e = tid + int64_t(i) * kMomentThreads;
      if (e < F * F) {
        const int64_t f = e / F, h = e % F;
        T acc = T(0);
        for (int rr = 0; rr < rows; ++rr) acc += static_cast<T>(x_s[rr][f]) * static_cast<T>(x_s[rr][h]);
        q[i] += acc;
      }
    }
  }
  const auto out = partial + (g * gridDim.x + blockIdx.x) * moment_record(F);
  if (tid == 0) out[0] = T(hi > lo ? hi - lo : 0);
  if (tid < F) {
    out[1 + tid] = hi > lo ? static_cast<T>(shift_s[tid]) : T(0);
    out[1 + F + tid] = sum;
  }
#pragma unroll
  for (int i = 0; i < kMomentSlots; ++i) {
    const int64_t e = tid + int64_t(i) * kMomentThreads;
    if (e < F * F) out[1 + 2 * F + e] = q[i];
  }
}

template <typename V>
__global__ void __launch_bounds__(kMomentThreads, 1) merge_moments_kernel(int64_t features, int64_t blocks,
                                                                       int64_t total_rows, double eps,
                                                                       Global<const at::opmath_type<V>> partial,
                                                                       Global<V> mean, Global<V> cov) {
  __shared__ Shared<double[kMomentMaxFeatures]> mean_s;
  const int tid = threadIdx.x;
  const int64_t F = features, g = blockIdx.x, R = moment_record(F);
  const auto part = partial + g * blocks * R;
  const double total = static_cast<double>(total_rows);
  if (tid < F) {
    double acc = 0;
    for (int64_t b = 0; b < blocks; ++b) {
      const double n = static_cast<double>(part[b * R]);
      acc += n * static_cast<double>(part[b * R + 1 + tid]) + static_cast<double>(part[b * R + 1 + F + tid]);
    }
    mean_s[tid] = acc / total;
    mean[g * F + tid] = static_cast<V>(acc / total);
  }
  __syncthreads();
  for (int64_t e = tid; e < F * F; e += kMomentThreads) {
    const int64_t f = e / F, h = e % F;
    double acc = 0;
    for (int64_t b = 0; b < blocks; ++b) {
      const auto r = part + b * R;
      const double n = static_cast<double>(r[0]);
      if (n == 0) continue;
      const double sf = static_cast<double>(r[1 + F + f]), sh = static_cast<double>(r[1 + F + h]);
      const double df = static_cast<double>(r[1 + f]) + sf / n - static_cast<double>(mean_s[f]);
      const double dh = static_cast<double>(r[1 + h]) + sh / n - static_cast<double>(mean_s[h]);
      acc += static_cast<double>(r[1 + 2 * F + e]) - sf * sh / n + n * df * dh;
    }
    cov[g * F * F + e] = static_cast<V>(acc / total + (f == h ? eps : 0.0));
  }
}

// mean [groups, F] and cov + eps I [groups, F, F] of the patch rows (the patch_statistics contract).
template <class L>
void patch_moments(const L& launch, const PatchShape& s, const at::Tensor& input, double eps, at::Tensor& mean,
                   at::Tensor& cov) {
  const int64_t rows = s.matrix_rows();
  // A few blocks per SM over all matrices, each at least 4 staging rounds long.
  const int64_t wanted = std::max<int64_t>(1, 4 * launch.multiprocessors() / s.groups);
  const int64_t blocks = std::max<int64_t>(
      1, std::min<int64_t>({wanted, (rows + 4 * kMomentRows - 1) / (4 * kMomentRows), 65535}));
  const int64_t per_block = (rows + blocks - 1) / blocks;
  mean = at::empty({s.groups, s.features}, input.options());
  cov = at::empty({s.groups, s.features, s.features}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "patch_moments", [&] {
    using T = at::opmath_type<scalar_t>;
    at::Tensor partial = at::empty({s.groups * blocks * moment_record(s.features)},
                                   input.options().dtype(c10::CppTypeToScalarType<T>::value));
    launch(patch_moments_kernel<scalar_t>, dim3(blocks, s.groups), dim3(kMomentThreads), s, per_block,
           device_ptr<const scalar_t>(input), device_ptr<T>(partial));
    launch(merge_moments_kernel<scalar_t>, dim3(s.groups), dim3(kMomentThreads), s.features, blocks, rows, eps,
           device_ptr<const T>(partial), device_ptr<scalar_t>(mean), device_ptr<scalar_t>(cov));
  });
}

}  // namespace
}  // namespace aecr
