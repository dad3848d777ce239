// Launch helpers shared by the CUDA drivers: block size, a bounded grid, and grid-stride loops with 64-bit
// indices (so any tensor size works with any grid).
//
// Every kernel declares __launch_bounds__(its block size, blocks per SM): the bound makes a larger launch fail
// instead of running out of registers. Compute-bound kernels ask for 1 block (ptxas then uses the registers it
// needs); the latency-bound sampling kernels of deform_conv2d (gathers of scattered corners) ask for
// kSamplingBlocks<V>, so that more warps are resident to hide their memory latency: 3 blocks of 256 threads (at
// most 85 registers a thread; 2 blocks was the most the registers allowed before) for 4-byte and smaller types,
// 2 for double; the atomic input-gradient scatter asks for kScatterBlocks (3 made it spill on sm_90).
// benchmarks/cuda_resources.py checks that no kernel spills; tests/test_cuda_resources.py, that the sampling
// kernels keep their register limits.
#pragma once

#include <algorithm>
#include <cstdint>

namespace aecr {

constexpr int kThreads = 256;

template <typename V>
constexpr int kSamplingBlocks = sizeof(V) == 8 ? 2 : 3;
constexpr int kScatterBlocks = 2;

inline int64_t grid_for(int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, 1 << 20));
}

}  // namespace aecr

#define AECR_GRID_STRIDE_LOOP(i, begin, end)                                               \
  for (int64_t i = (begin) + blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (end); \
       i += int64_t(blockDim.x) * gridDim.x)
