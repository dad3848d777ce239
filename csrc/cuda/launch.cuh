// Launch helpers shared by the CUDA drivers: block size, a bounded grid, and grid-stride loops with 64-bit
// indices (so any tensor size works with any grid).
//
// Every kernel declares __launch_bounds__(its block size, 1): the bound makes a larger launch fail instead of
// running out of registers, and the 1 (one resident block suffices) lets ptxas use the registers it needs; with
// the block size alone it trades registers for occupancy and spills (benchmarks/cuda_resources.py checks that
// no kernel spills).
#pragma once

#include <algorithm>
#include <cstdint>

namespace aecr {

constexpr int kThreads = 256;

inline int64_t grid_for(int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, 1 << 20));
}

}  // namespace aecr

#define AECR_GRID_STRIDE_LOOP(i, begin, end)                                               \
  for (int64_t i = (begin) + blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (end); \
       i += int64_t(blockDim.x) * gridDim.x)
