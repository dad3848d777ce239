// Deterministic input gradient of deform_conv2d on CUDA, shared by the simple and the implicit-GEMM paths:
// the scatter of the column gradient into the input planes becomes a stable sort of the scatter targets and a
// gather in fixed order, which gives bitwise reproducible results (no atomics). Written over a launcher (see
// cuda_launcher.cuh).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <optional>
#include <tuple>

#include "aecr/deform_conv.h"
#include "cuda/device_memory.cuh"
#include "cuda/launch.cuh"

namespace aecr {
namespace {

// Step 1: each (site, corner) becomes an entry with the key of the plane cell it adds to, (image, offset group,
// cell), and the weight mask * bilinear weight. Corners of weight 0 (outside the plane among them) get a key
// past every cell, so they sort last and belong to no cell.
template <typename V>
__global__ void __launch_bounds__(kThreads, kSamplingBlocks<V>) scatter_entries_kernel(DeformConvShape s, ColumnChunk chunk,
                                                                   Global<const at::opmath_type<V>> offset,
                                                                   Global<const at::opmath_type<V>> mask,
                                                                   Global<int64_t> keys,
                                                                   Global<at::opmath_type<V>> weights) {
  using T = at::opmath_type<V>;
  const int64_t no_cell = chunk.images * s.offset_groups * s.plane();
  AECR_GRID_STRIDE_LOOP(i, 0, chunk.sites(s)) {
    const SamplingSite t = site_from_index(s, chunk, i);
    const BilinearPoint<T> p = site_point<T>(s, t, offset);
    const T m = site_mask<T>(s, t, mask);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const bool used = p.weight[j] != T(0);
      keys[4 * i + j] = used ? (t.b * s.offset_groups + t.g) * s.plane() + p.index[j] : no_cell;
      weights[4 * i + j] = used ? m * p.weight[j] : T(0);
    }
  }
}

// Step 2 (after a stable sort of the keys): the first entry of each key's run in sorted order leads it; one
// thread per (sorted entry, channel of the offset group) whose entry leads sums the run's terms for its channel in
// sorted order and adds the sum to that input cell of `grad_input`, of the accumulation type (an image cut in
// pixel chunks gets one sum per chunk, in chunk order). The work is the chunk's entries times the group's
// channels, whatever the image size (review R2: one thread per cell of the chunk's whole images made pixel chunks
// cost chunks x image size).
template <typename V>
__global__ void __launch_bounds__(kThreads, kSamplingBlocks<V>) gather_entries_kernel(DeformConvShape s, ColumnChunk chunk,
                                                                  Global<const int64_t> sorted_keys,
                                                                  Global<const int64_t> order,
                                                                  Global<const at::opmath_type<V>> weights,
                                                                  Global<const V> grad_columns,
                                                                  Global<at::opmath_type<V>> grad_input) {
  using T = at::opmath_type<V>;
  const int64_t cpg = s.channels_per_offset_group();
  const int64_t entries = 4 * chunk.sites(s), no_cell = chunk.images * s.offset_groups * s.plane();
  AECR_GRID_STRIDE_LOOP(i, 0, entries * cpg) {
    const int64_t e = i / cpg;
    const int64_t key = sorted_keys[e];
    if (key >= no_cell || (e > 0 && sorted_keys[e - 1] == key)) continue;
    const int64_t cell = key % s.plane(), g = (key / s.plane()) % s.offset_groups;
    const int64_t b = key / (s.plane() * s.offset_groups);
    const int64_t c = g * cpg + i % cpg;
    T acc = T(0);
    for (int64_t r = e; r < entries && sorted_keys[r] == key; ++r) {
      const int64_t entry = order[r];
      const SamplingSite t = site_from_index(s, chunk, entry / 4);
      acc += static_cast<T>(weights[entry]) * static_cast<T>(grad_columns[column_index(s, chunk, c, t.k, t.b, t.pixel)]);
    }
    const int64_t at = (b * s.channels + c) * s.plane() + cell;
    grad_input[at] = static_cast<T>(grad_input[at]) + acc;
  }
}

// Adds into grad_input (the chunk's n images, [n, C, H, W], of the accumulation type: fp32 for fp16 / bf16) the
// scatter of the chunk's column gradient [C*K, width]; offset and mask are the chunk's images'. `launch` as in
// cuda_launcher.cuh. Its memory and work grow with the chunk, not with the image.
template <typename V, class L>
void deterministic_input_grad(const L& launch, const DeformConvShape& s, const ColumnChunk& chunk,
                              const at::Tensor& offset, const std::optional<at::Tensor>& mask,
                              const at::Tensor& grad_columns, at::Tensor grad_input) {
  using T = at::opmath_type<V>;
  TORCH_INTERNAL_ASSERT(grad_input.scalar_type() == c10::CppTypeToScalarType<T>::value);
  const int64_t sites = chunk.sites(s);
  at::Tensor keys = at::empty({4 * sites}, grad_input.options().dtype(at::kLong));
  at::Tensor weights = at::empty({4 * sites}, grad_input.options());
  launch(scatter_entries_kernel<V>, dim3(grid_for(sites)), dim3(kThreads), s, chunk, device_ptr<const T>(offset),
         optional_ptr<const T>(mask), device_ptr<int64_t>(keys), device_ptr<T>(weights));
  const auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  launch(gather_entries_kernel<V>, dim3(grid_for(4 * sites * s.channels_per_offset_group())), dim3(kThreads), s,
         chunk, device_ptr<const int64_t>(std::get<0>(sorted)), device_ptr<const int64_t>(std::get<1>(sorted)),
         device_ptr<const T>(weights), device_ptr<const V>(grad_columns), device_ptr<T>(grad_input));
}

}  // namespace
}  // namespace aecr
