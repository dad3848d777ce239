// The emulator as a measuring instrument (issue 19): per launch, what a GPU would move and compute.
//
// While counting is on, every access a kernel makes is recorded per thread; when a warp meets (a barrier, a warp
// operation, its end) the i-th access of each of its lanes is taken as one instruction, as the lanes of a real
// warp issue it together, and counted as Nsight Compute counts it:
//  - global memory: requests (one per instruction of a warp) and the 32-byte sectors each touches;
//  - shared memory: requests and wavefronts (a request takes as many wavefronts as the most distinct 4-byte words
//    any of the 32 banks holds among its lanes; 8- and 16-byte accesses are split into 2 and 4 phases of 16 and
//    8 lanes, as the hardware does);
//  - atomics; tensor-core FLOPs (mma_sync, 2 M N K per warp) and the FP32/FP64 FLOPs of the shared bilinear math
//    (AECR_COUNT_FLOPS in csrc/include/aecr/bilinear.h; other arithmetic is not counted).
// Per launch it also keeps the sector trace of the blocks counted, from which it derives the distinct sectors
// (compulsory DRAM traffic) and the DRAM traffic through an LRU L2 of each given size, fed in waves (the warps
// of a block interleaved between its barriers, the blocks of a wave interleaved, sector by sector; read misses and write-backs of dirty sectors count, every dirty
// sector is written back by the end). No L1 reuse is assumed: every sector requested is L2 traffic.
//
// Sampling: a launch of more than `sample_blocks` blocks counts only that many consecutive blocks, starting at
// the first block of the wave in the middle of the grid, and its figures are scaled by blocks / blocks counted.
// Blocks not counted do not run, so their outputs stay as the allocator left them (zeros while counting: see
// workspaces.h); a later kernel that reads them reads zeros.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace aecr_emulation {

enum class Access;

struct TrafficOptions {
  int64_t sample_blocks = 0;  // 0: count every block
  int64_t multiprocessors = 132;
  int64_t threads_per_sm = 2048, registers_per_sm = 65536, shared_per_sm = 228 << 10, blocks_per_sm = 32;
  std::vector<int64_t> l2_bytes;  // a DRAM figure for each
};

struct LaunchTraffic {
  std::string kernel;
  int64_t blocks = 0, blocks_counted = 0, threads = 0, wave_blocks = 0;
  // Over the blocks counted (multiply by blocks / blocks_counted for the launch).
  int64_t load_requests = 0, load_sectors = 0, store_requests = 0, store_sectors = 0;
  int64_t atomic_requests = 0, atomic_sectors = 0, atomics = 0;
  int64_t shared_requests = 0, shared_wavefronts = 0;
  int64_t distinct_sectors = 0;
  std::vector<int64_t> dram_sectors;  // by L2 size
  double mma_flops = 0, fp32_flops = 0, fp64_flops = 0;
};

void start_counting(const TrafficOptions& options);
void stop_counting();
bool counting();
const std::vector<LaunchTraffic>& counted_launches();

// Hooks of memory.h and intrinsics.h.
void count_access(const void* at, size_t bytes, Access kind, bool shared);
void count_mma(double flops);
void count_flops(size_t element_bytes, double flops);  // FP32 (4) or FP64 (8) arithmetic
// While alive, accesses are not counted (a WMMA call counts each lane's share itself).
struct UncountedAccesses {
  UncountedAccesses();
  ~UncountedAccesses();
};

// Hooks of the scheduler (emulator.cpp): the blocks [first, first + count) of the launch are run.
void count_launch(const std::string& kernel, int64_t blocks, int64_t threads, int registers, int64_t shared_bytes,
                  int64_t& first, int64_t& count);
void count_block_start(size_t threads);
void count_warp_met(size_t warp);
void count_block_met();  // a __syncthreads released, or the block's end
void count_block_end();
void count_launch_end();

}  // namespace aecr_emulation

// The floating-point arithmetic of the shared math in type T, counted under the emulator (nothing elsewhere).
#define AECR_COUNT_FLOPS(T, n) ::aecr_emulation::count_flops(sizeof(T), n)
