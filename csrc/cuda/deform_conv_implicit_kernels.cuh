// Kernels of the implicit-GEMM deform_conv2d on CUDA: the column matrix is never stored. Each block builds the
// tile of columns it multiplies in shared memory, straight from the input, and multiplies on tensor cores
// (WMMA: fp16 / bf16 operands, or TF32 for fp32; fp32 accumulators).
//
// Layout choices:
//   - the input is read channels-last [B, H, W, C], so the four corners of a sample are four channel vectors:
//     the 32 lanes of a warp read 32 consecutive channels of one corner (coalesced);
//   - the reduction index of every GEMM is ordered (tap, channel), so a K step of 32 is one tap and 32
//     channels of one offset group, all sharing one bilinear point per pixel;
//   - sampling coordinates are computed once per (image, offset group, tap, pixel) into a plan
//     (`SamplePlan`: 4 corner indices, 4 weights with the mask folded in), by the forward and again by the
//     backward for the weight gradient; the input-gradient kernel computes the full bilinear point (with
//     derivatives) once per (pixel, tap) of its tile.
// Tiles are 64 x 64 with K steps of 32, four warps of 32 x 32 each.
//
// Gradients: weight = split-K partial products in a workspace, summed in fixed order (deterministic); offset
// and mask = per-warp sums over a tile's channels, summed over tiles in fixed order (deterministic); input =
// atomics into an fp32 channels-last buffer, or under torch.use_deterministic_algorithms(True) the column
// gradient of a chunk of images written out and gathered by the sort-based kernels of the simple path.
//
// Device code only (no CUDA runtime calls): deform_conv_implicit_driver.h launches these kernels through a
// launcher, the CUDA one in production and the CPU emulator of tests/cuda_emulation in the CPU tests. Below
// sm_80 (no bf16 / TF32 WMMA) the kernels are compiled to a trap, and the host never launches them
// (implicit_path_applies checks what was compiled).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#ifndef AECR_CUDA_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif

#include "aecr/deform_conv.h"
#include "cuda/device_memory.cuh"
#include "cuda/launch.cuh"

// WMMA with bf16 and TF32 needs sm_80; older targets compile kernels that trap, which the host never launches.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define AECR_TENSOR_CORES 1
#endif

namespace aecr {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kTile = 64;                 // output tile: 64 x 64
constexpr int kStep = 32;                 // K step
constexpr int kWarps = 4;                 // 2 x 2 warps of 32 x 32
constexpr int kBlockThreads = 32 * kWarps;
constexpr int kPad = 8;                   // shared-memory row padding (keeps WMMA's 32-byte alignment)
constexpr int kAccPad = 4;

// Storage type V -> tensor-core operand type.
template <typename V>
struct Mma;

template <>
struct Mma<float> {
  using Smem = float;
#ifdef AECR_TENSOR_CORES
  using Frag = wmma::precision::tf32;
#else
  using Frag = float;
#endif
  static constexpr int K = 8;
  __device__ static float to(float x) {
#ifdef AECR_TENSOR_CORES
    return wmma::__float_to_tf32(x);
#else
    return x;
#endif
  }
};

template <>
struct Mma<c10::Half> {
  using Smem = __half;
  using Frag = __half;
  static constexpr int K = 16;
  __device__ static __half to(float x) { return __float2half(x); }
};

template <>
struct Mma<c10::BFloat16> {
  using Smem = __nv_bfloat16;
  using Frag = __nv_bfloat16;
  static constexpr int K = 16;
  __device__ static __nv_bfloat16 to(float x) { return __float2bfloat16(x); }
};

// The 32 x 32 output tile of one warp: 2 x 2 WMMA fragments of 16 x 16 with fp32 accumulators.
template <typename V>
struct WarpTile {
  using M = Mma<V>;
  wmma::fragment<wmma::accumulator, 16, 16, M::K, float> acc[2][2];

  __device__ WarpTile() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  }

  // acc += A B over one K step of kStep: a_at(i, kk) points at rows 16i.. of A at K offset kk, b_at(j, kk) at
  // columns 16j.. of B, both in shared memory with leading dimensions lda, ldb and the given layouts.
  template <typename LayoutA, typename LayoutB, typename APointer, typename BPointer>
  __device__ void multiply(APointer a_at, unsigned lda, BPointer b_at, unsigned ldb) {
#pragma unroll
    for (int kk = 0; kk < kStep; kk += M::K) {
      wmma::fragment<wmma::matrix_a, 16, 16, M::K, typename M::Frag, LayoutA> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, M::K, typename M::Frag, LayoutB> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], a_at(i, kk), lda);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], b_at(j, kk), ldb);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
  }

  // Stores fragment (i, j) at at(i, j), leading dimension ld.
  template <typename Pointer>
  __device__ void store(Pointer at, unsigned ld, wmma::layout_t layout) const {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::store_matrix_sync(at(i, j), acc[i][j], ld, layout);
  }
};

// One sampling site's four corners: flat offsets into the plane (-1 outside it: not read) and mask * bilinear
// weight (0 outside).
struct SamplePlan {
  int index[4];
  float weight[4];
};

// The plan of a tile position past the last pixel: no corner, so nothing is read (a zero weight would still
// multiply whatever pixel 0 holds, NaN included, into the tile).
AECR_HOST_DEVICE AECR_INLINE SamplePlan no_sample() { return SamplePlan{{-1, -1, -1, -1}, {0.f, 0.f, 0.f, 0.f}}; }

// A run of at most kTile channels inside one conv group and one offset group: the unit along C of the
// gradient kernels' tiles.
struct ChannelChunk {
  int64_t group, offset_group, begin, end;
};

struct Geometry {
  int64_t columns;          // N = images * P
  int64_t groups;
  int64_t in_per_group;     // C / groups
  int64_t out_per_group;    // C_out / groups
};

AECR_HOST_DEVICE AECR_INLINE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Calls fn(chunk index, chunk) for the channel chunks in order: channel runs of at most kTile channels, each
// inside one conv group and one offset group; fn returns false to stop. Computed, not stored, so that no
// launch depends on a table copied from the host (which a CUDA graph would capture by its address).
template <class Fn>
AECR_HOST_DEVICE AECR_INLINE void for_each_channel_chunk(const DeformConvShape& s, const Geometry& q, Fn fn) {
  const int64_t cpg = s.channels_per_offset_group();
  int64_t index = 0;
  for (int64_t g = 0; g < q.groups; ++g) {
    const int64_t lo = g * q.in_per_group, hi = lo + q.in_per_group;
    for (int64_t og = lo / cpg; og * cpg < hi; ++og) {
      const int64_t seg_lo = lo > og * cpg ? lo : og * cpg, seg_hi = hi < (og + 1) * cpg ? hi : (og + 1) * cpg;
      for (int64_t c = seg_lo; c < seg_hi; c += kTile, ++index) {
        if (!fn(index, ChannelChunk{g, og, c, seg_hi < c + kTile ? seg_hi : c + kTile})) return;
      }
    }
  }
}

AECR_HOST_DEVICE AECR_INLINE int64_t channel_chunk_count(const DeformConvShape& s, const Geometry& q) {
  int64_t count = 0;
  for_each_channel_chunk(s, q, [&](int64_t, const ChannelChunk&) { return ++count > 0; });
  return count;
}

AECR_HOST_DEVICE AECR_INLINE ChannelChunk channel_chunk(const DeformConvShape& s, const Geometry& q, int64_t index) {
  ChannelChunk found{0, 0, 0, 0};
  for_each_channel_chunk(s, q, [&](int64_t i, const ChannelChunk& c) {
    found = c;
    return i < index;
  });
  return found;
}

// The geometry (offset, mask) is float32 whatever the features' dtype.
__global__ void __launch_bounds__(kThreads, kSamplingBlocks<float>) implicit_sample_plan_kernel(DeformConvShape s, int64_t images,
                                                                        Global<const float> offset,
                                                                        Global<const float> mask,
                                                                        Global<SamplePlan> plan) {
  AECR_GRID_STRIDE_LOOP(i, 0, images * s.offset_groups * s.taps() * s.pixels()) {
    const SamplingSite t = site_from_index(s, i);
    const BilinearPoint<float> p = site_point<float>(s, t, offset);
    const float m = site_mask<float>(s, t, mask);
    SamplePlan q;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      q.index[j] = p.inside[j] ? static_cast<int>(p.index[j]) : -1;
      q.weight[j] = m * p.weight[j];
    }
    plan[i] = q;
  }
}

// Masked bilinear sample of channel c: `image` is the pixel's image (channels-last), C its channel count.
template <typename In>
__device__ AECR_INLINE float gather_sample(const SamplePlan& p, In image, int64_t c, int64_t C) {
  float v = 0.f;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if (p.index[j] >= 0) v += p.weight[j] * static_cast<float>(image[int64_t(p.index[j]) * C + c]);
  }
  return v;
}

__device__ AECR_INLINE int64_t plan_index(const DeformConvShape& s, int64_t n, int64_t og, int64_t k) {
  const int64_t P = s.pixels();
  return ((n / P * s.offset_groups + og) * s.taps() + k) * P + n % P;
}

// ---- Forward: out[g, co, n] = sum_(k, c) W[g, co, k, c] * col[k, c, n] -------------------------------------
// Grid (pixel tiles, output-channel tiles, groups). A = weight tile (row-major), B = column tile built from
// the input (stored column-major: b_s[pixel][channel]).
template <typename V>
__global__ void __launch_bounds__(kBlockThreads, 1) implicit_forward_kernel(DeformConvShape s, Geometry q,
                                                                         Global<const V> input,
                                                                         Global<const SamplePlan> plan,
                                                                         Global<const V> weight, Global<const V> bias,
                                                                         Global<V> output) {
#ifdef AECR_TENSOR_CORES
  using M = Mma<V>;
  using S = typename M::Smem;
  __shared__ __align__(32) Shared<S[kTile][kStep + kPad]> a_s;
  __shared__ __align__(32) Shared<S[kTile][kStep + kPad]> b_s;
  __shared__ __align__(32) Shared<float[kTile][kTile + kAccPad]> c_s;
  __shared__ Shared<SamplePlan[kTile]> plan_s;
  __shared__ Shared<int64_t[kTile]> image_s;

  const int tid = threadIdx.x, warp = tid / 32;
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
  const int64_t n0 = blockIdx.x * int64_t(kTile), m0 = blockIdx.y * int64_t(kTile), g = blockIdx.z;
  const int64_t C = s.channels, K = s.taps(), cpg = s.channels_per_offset_group();
  const int64_t c_lo = g * q.in_per_group, c_hi = c_lo + q.in_per_group;

  WarpTile<V> tile;

  if (tid < kTile) {
    const int64_t n = n0 + tid;
    image_s[tid] = n < q.columns ? n / s.pixels() * s.plane() * C : 0;
  }
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t og = c_lo / cpg; og * cpg < c_hi; ++og) {
      const int64_t seg_lo = c_lo > og * cpg ? c_lo : og * cpg;
      const int64_t seg_hi = c_hi < (og + 1) * cpg ? c_hi : (og + 1) * cpg;
      __syncthreads();  // the previous segment's tiles are consumed
      if (tid < kTile) {
        const int64_t n = n0 + tid;
        SamplePlan e = no_sample();
        if (n < q.columns) e = plan[plan_index(s, n, og, k)];
        plan_s[tid] = e;
      }
      for (int64_t c0 = seg_lo; c0 < seg_hi; c0 += kStep) {
        __syncthreads();  // plan_s is written; the previous step's MMAs are done with a_s, b_s
        for (int e = tid; e < kTile * kStep; e += kBlockThreads) {
          const int r = e / kStep, kk = e % kStep;
          const int64_t co = m0 + r, c = c0 + kk;
          float v = 0.f;
          if (co < q.out_per_group && c < seg_hi) {
            v = static_cast<float>(weight[((g * q.out_per_group + co) * K + k) * q.in_per_group + (c - c_lo)]);
          }
          a_s[r][kk] = M::to(v);
        }
        for (int e = tid; e < kTile * kStep; e += kBlockThreads) {
          const int nn = e / kStep, kk = e % kStep;
          const int64_t c = c0 + kk;
          b_s[nn][kk] = M::to(c < seg_hi ? gather_sample(plan_s[nn], input + image_s[nn], c, C) : 0.f);
        }
        __syncthreads();
        tile.template multiply<wmma::row_major, wmma::col_major>(
            [&](int i, int kk) { return &a_s[wm + 16 * i][kk]; }, kStep + kPad,
            [&](int j, int kk) { return &b_s[wn + 16 * j][kk]; }, kStep + kPad);
      }
    }
  }
  tile.store([&](int i, int j) { return &c_s[wm + 16 * i][wn + 16 * j]; }, kTile + kAccPad, wmma::mem_row_major);
  __syncthreads();
  const int64_t P = s.pixels(), out_channels = q.groups * q.out_per_group;
  for (int e = tid; e < kTile * kTile; e += kBlockThreads) {
    const int r = e / kTile, nn = e % kTile;
    const int64_t co = m0 + r, n = n0 + nn;
    if (co < q.out_per_group && n < q.columns) {
      const int64_t oc = g * q.out_per_group + co;
      float v = c_s[r][nn];
      if (bias != nullptr) v += static_cast<float>(bias[oc]);
      output[(n / P * out_channels + oc) * P + n % P] = static_cast<V>(v);
    }
  }
#else
  __trap();
#endif
}

// ---- Input side of the backward: gcol[k, c, n] = sum_co W[g, co, k, c] * grad_out[g, co, n] -----------------
// Grid (pixel tiles of [n_begin, n_end), chunk * K + tap). A = W^T tile (column-major a_s[co][c]), B = grad_out
// tile (row-major b_s[co][pixel]). The epilogue, with gcol in shared memory, does per pixel and channel:
//   grad_input  += mask * w_j * gcol at the four corners (atomics), or writes gcol to `columns` (deterministic);
//   partial sums over the chunk's channels of gcol * (sample, d sample/dh, d sample/dw) -> `partial`.
template <typename V>
__global__ void __launch_bounds__(kBlockThreads, 1) implicit_input_grad_kernel(
    DeformConvShape s, Geometry q, int64_t n_begin, int64_t n_end, Global<const V> input, Global<const float> offset,
    Global<const float> mask, Global<const V> weight, Global<const V> grad_output, Global<float> grad_input,
    Global<V> columns, int64_t column_first_image, ColumnChunk column_chunk, Global<float> partial) {
#ifdef AECR_TENSOR_CORES
  using M = Mma<V>;
  using S = typename M::Smem;
  __shared__ __align__(32) Shared<S[kStep][kTile + kPad]> a_s;
  __shared__ __align__(32) Shared<S[kStep][kTile + kPad]> b_s;
  __shared__ __align__(32) Shared<float[kTile][kTile + kAccPad]> c_s;  // column-major: c_s[pixel][channel]
  __shared__ Shared<int[kTile][4]> pt_index;  // -1: outside the plane
  __shared__ Shared<float[kTile][4]> pt_weight;
  __shared__ Shared<float[kTile][4]> pt_dh;
  __shared__ Shared<float[kTile][4]> pt_dw;
  __shared__ Shared<float[kTile]> pt_mask;
  __shared__ Shared<int64_t[kTile]> image_s;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
  const int64_t K = s.taps(), P = s.pixels(), C = s.channels;
  const int64_t chunk = blockIdx.y / K, k = blockIdx.y % K;
  const ChannelChunk ch = channel_chunk(s, q, chunk);
  const int64_t g = ch.group, c_lo = g * q.in_per_group;
  const int64_t n0 = n_begin + blockIdx.x * int64_t(kTile);
  const int64_t out_channels = q.groups * q.out_per_group;

  if (tid < kTile) {  // the bilinear point of each pixel of the tile at this tap, with derivatives
    const int64_t n = n0 + tid;
    BilinearPoint<float> p = bilinear_point<float>(-2.f, -2.f, 1, 1);  // outside the plane: every corner zero
    float m = 0.f;
    if (n < n_end) {
      const SamplingSite t{n / P, ch.offset_group, k, n % P};
      p = site_point<float>(s, t, offset);
      m = site_mask<float>(s, t, mask);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      pt_index[tid][j] = p.inside[j] ? static_cast<int>(p.index[j]) : -1;
      pt_weight[tid][j] = p.weight[j];
      pt_dh[tid][j] = p.d_h[j];
      pt_dw[tid][j] = p.d_w[j];
    }
    pt_mask[tid] = m;
    image_s[tid] = n < n_end ? n / P * s.plane() * C : 0;
  }

  WarpTile<V> tile;

  for (int64_t o0 = 0; o0 < q.out_per_group; o0 += kStep) {
    __syncthreads();
    for (int e = tid; e < kStep * kTile; e += kBlockThreads) {
      const int kk = e / kTile, m = e % kTile;
      const int64_t co = o0 + kk, c = ch.begin + m;
      float v = 0.f;
      if (co < q.out_per_group && c < ch.end) {
        v = static_cast<float>(weight[((g * q.out_per_group + co) * K + k) * q.in_per_group + (c - c_lo)]);
      }
      a_s[kk][m] = M::to(v);
    }
    for (int e = tid; e < kStep * kTile; e += kBlockThreads) {
      const int kk = e / kTile, nn = e % kTile;
      const int64_t co = o0 + kk, n = n0 + nn;
      float v = 0.f;
      if (co < q.out_per_group && n < n_end) {
        v = static_cast<float>(grad_output[(n / P * out_channels + g * q.out_per_group + co) * P + n % P]);
      }
      b_s[kk][nn] = M::to(v);
    }
    __syncthreads();
    tile.template multiply<wmma::col_major, wmma::row_major>(
        [&](int i, int kk) { return &a_s[kk][wm + 16 * i]; }, kTile + kPad,
        [&](int j, int kk) { return &b_s[kk][wn + 16 * j]; }, kTile + kPad);
  }
  tile.store([&](int i, int j) { return &c_s[wn + 16 * j][wm + 16 * i]; }, kTile + kAccPad, wmma::mem_col_major);
  __syncthreads();

  // One warp per pixel, lanes over channels: the four corners are read (and added to) as channel vectors.
  for (int nn = warp; nn < kTile; nn += kWarps) {
    const int64_t n = n0 + nn;
    if (n >= n_end) break;  // pixels only grow with nn
    float sv = 0.f, sh = 0.f, sw = 0.f;  // (summed only for `partial`; null: offset and mask gradients not asked)
    const float m = pt_mask[nn];
    for (int mm = lane; mm < kTile; mm += 32) {
      const int64_t c = ch.begin + mm;
      if (c >= ch.end) break;
      const float gcol = c_s[nn][mm];
      const int64_t base = image_s[nn] + c;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int corner = pt_index[nn][j];
        if (corner < 0) continue;  // outside the plane: contributes nothing, not read
        const int64_t at = base + int64_t(corner) * C;
        const float x = static_cast<float>(input[at]), w = pt_weight[nn][j];
        sv += gcol * w * x;
        sh += gcol * pt_dh[nn][j] * x;
        sw += gcol * pt_dw[nn][j] * x;
        if (grad_input != nullptr && w != 0.f) atomicAdd(grad_input + at, m * w * gcol);
      }
    }
    if (partial == nullptr) continue;  // the same for the whole block
#pragma unroll
    for (int d = 16; d > 0; d /= 2) {
      sv += __shfl_xor_sync(0xffffffffu, sv, d);
      sh += __shfl_xor_sync(0xffffffffu, sh, d);
      sw += __shfl_xor_sync(0xffffffffu, sw, d);
    }
    if (lane == 0) {
      const Global<float> out = partial + (chunk * K + k) * 3 * q.columns + n;
      out[0] = sv;
      out[q.columns] = sh;
      out[2 * q.columns] = sw;
    }
  }
  if (columns != nullptr) {  // deterministic input gradient: the column gradient, pixels along the lanes
    for (int e = tid; e < kTile * kTile; e += kBlockThreads) {
      const int mm = e / kTile, nn = e % kTile;
      const int64_t c = ch.begin + mm, n = n0 + nn;
      if (c < ch.end && n < n_end) {
        columns[column_index(s, column_chunk, c, k, n / P - column_first_image, n % P)] = static_cast<V>(c_s[nn][mm]);
      }
    }
  }
#else
  __trap();
#endif
}

// Offset and mask gradients of every site: the chunks' partial sums in chunk order (deterministic).
__global__ void __launch_bounds__(kThreads, kSamplingBlocks<float>) implicit_offset_mask_grad_kernel(DeformConvShape s, Geometry q,
                                                                             Global<const float> partial,
                                                                             Global<const float> mask,
                                                                             Global<float> grad_offset,
                                                                             Global<float> grad_mask) {
  const int64_t K = s.taps(), P = s.pixels(), columns = q.columns;
  AECR_GRID_STRIDE_LOOP(i, 0, columns / P * s.offset_groups * K * P) {
    const SamplingSite t = site_from_index(s, i);
    const int64_t n = t.b * P + t.pixel;
    SiteGradSums<float> sums{0.f, 0.f, 0.f};
    for_each_channel_chunk(s, q, [&](int64_t c, const ChannelChunk& chunk) {
      if (chunk.offset_group == t.g) {
        const auto part = partial + (c * K + t.k) * 3 * columns + n;
        sums.value += static_cast<float>(part[0]);
        sums.h += static_cast<float>(part[columns]);
        sums.w += static_cast<float>(part[2 * columns]);
      }
      return true;
    });
    store_site_grad<float>(s, t, site_mask<float>(s, t, mask), sums, grad_offset, grad_mask);
  }
}

// ---- Weight gradient: dW[g, co, k, c] = sum_n grad_out[g, co, n] * col[k, c, n] --------------------------
// Grid (chunk * K + tap, output-channel tiles, pixel splits). A = grad_out tile (row-major a_s[co][pixel]),
// B = column tile (row-major b_s[pixel][channel]). Each split writes its own slice of `partial`.
template <typename V>
__global__ void __launch_bounds__(kBlockThreads, 1) implicit_weight_grad_kernel(DeformConvShape s, Geometry q,
                                                                             int64_t per_split, Global<const V> input,
                                                                             Global<const SamplePlan> plan,
                                                                             Global<const V> grad_output,
                                                                             Global<float> partial) {
#ifdef AECR_TENSOR_CORES
  using M = Mma<V>;
  using S = typename M::Smem;
  __shared__ __align__(32) Shared<S[kTile][kStep + kPad]> a_s;
  __shared__ __align__(32) Shared<S[kStep][kTile + kPad]> b_s;
  __shared__ __align__(32) Shared<float[kTile][kTile + kAccPad]> c_s;
  __shared__ Shared<SamplePlan[kStep]> plan_s;
  __shared__ Shared<int64_t[kStep]> image_s;

  const int tid = threadIdx.x, warp = tid / 32;
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
  const int64_t K = s.taps(), P = s.pixels(), C = s.channels;
  const int64_t chunk = blockIdx.x / K, k = blockIdx.x % K;
  const ChannelChunk ch = channel_chunk(s, q, chunk);
  const int64_t g = ch.group, c_lo = g * q.in_per_group;
  const int64_t m0 = blockIdx.y * int64_t(kTile);
  const int64_t n_lo = blockIdx.z * per_split, n_hi = n_lo + per_split < q.columns ? n_lo + per_split : q.columns;
  const int64_t out_channels = q.groups * q.out_per_group;

  WarpTile<V> tile;

  for (int64_t nb = n_lo; nb < n_hi; nb += kStep) {
    __syncthreads();
    if (tid < kStep) {
      const int64_t n = nb + tid;
      SamplePlan e = no_sample();
      if (n < n_hi) e = plan[plan_index(s, n, ch.offset_group, k)];
      plan_s[tid] = e;
      image_s[tid] = n < n_hi ? n / P * s.plane() * C : 0;
    }
    for (int e = tid; e < kTile * kStep; e += kBlockThreads) {
      const int r = e / kStep, kk = e % kStep;
      const int64_t co = m0 + r, n = nb + kk;
      float v = 0.f;
      if (co < q.out_per_group && n < n_hi) {
        v = static_cast<float>(grad_output[(n / P * out_channels + g * q.out_per_group + co) * P + n % P]);
      }
      a_s[r][kk] = M::to(v);
    }
    __syncthreads();  // plan_s is written
    for (int e = tid; e < kStep * kTile; e += kBlockThreads) {
      const int kk = e / kTile, nn = e % kTile;
      const int64_t c = ch.begin + nn;
      b_s[kk][nn] = M::to(c < ch.end ? gather_sample(plan_s[kk], input + image_s[kk], c, C) : 0.f);
    }
    __syncthreads();
    tile.template multiply<wmma::row_major, wmma::row_major>(
        [&](int i, int kk) { return &a_s[wm + 16 * i][kk]; }, kStep + kPad,
        [&](int j, int kk) { return &b_s[kk][wn + 16 * j]; }, kTile + kPad);
  }
  tile.store([&](int i, int j) { return &c_s[wm + 16 * i][wn + 16 * j]; }, kTile + kAccPad, wmma::mem_row_major);
  __syncthreads();
  const Global<float> out = partial + blockIdx.z * out_channels * K * q.in_per_group;
  for (int e = tid; e < kTile * kTile; e += kBlockThreads) {
    const int r = e / kTile, nn = e % kTile;
    const int64_t co = m0 + r, c = ch.begin + nn;
    if (co < q.out_per_group && c < ch.end) {
      out[((g * q.out_per_group + co) * K + k) * q.in_per_group + (c - c_lo)] = c_s[r][nn];
    }
  }
#else
  __trap();
#endif
}

// Sum of the splits' partial weight gradients, in split order.
__global__ void __launch_bounds__(kThreads, 1) implicit_sum_splits_kernel(Global<const float> partial, int64_t splits,
                                                                       int64_t size, Global<float> out) {
  AECR_GRID_STRIDE_LOOP(i, 0, size) {
    float v = 0.f;
    for (int64_t z = 0; z < splits; ++z) v += partial[z * size + i];
    out[i] = v;
  }
}

}  // namespace
}  // namespace aecr
