// Deliberately broken kernels (and their correct twins), written as the project's kernels are (device_memory.cuh's
// Global / Shared, __syncthreads, shuffles), so that the tests can show each emulator check catching its bug:
// races in shared and global memory, accesses out of bounds, reads of unwritten shared memory, barriers in
// divergent code, and launches over the hardware's limits.
#define AECR_CUDA_EMULATION 1
#include "cuda_emulation.h"

#include <torch/extension.h>

#include <string>

#include "cuda/device_memory.cuh"
#include "cuda/newton_schulz_kernels.cuh"

namespace {

using aecr::device_ptr;
using aecr::Global;
using aecr::Shared;

constexpr int kWarp = 32;

// Thread 0 writes, thread `reader` reads: ordered only by the barrier (`sync` 1: __syncthreads, 2: __syncwarp,
// 3: a shuffle, which orders no memory, 4: a __syncwarp of lanes 0-15 only, 0: nothing).
__global__ void write_then_read_kernel(int reader, int sync, Global<float> out) {
  __shared__ Shared<float[64]> s;
  const int tid = threadIdx.x;
  if (tid == 0) s[0] = 1.f;
  if (sync == 1) __syncthreads();
  if (sync == 2) __syncwarp();
  if (sync == 3) (void)__shfl_xor_sync(0xffffffffu, tid, 1);
  if (sync == 4 && tid < 16) __syncwarp(0x0000ffffu);
  if (tid == reader) out[0] = s[0];
}

// Lanes 0 and 1 read s[0], then the lanes of `mask` (which holds lanes 0 and 2) __syncwarp, then lane 2
// overwrites s[0]: a race unless the mask holds lane 1 too.
__global__ void read_then_write_kernel(unsigned mask, Global<float> out) {
  __shared__ Shared<float[32]> s;
  const int tid = threadIdx.x;
  if (tid == 0) s[0] = 1.f;
  __syncthreads();
  float v = 0.f;
  if (tid < 2) v = s[0];
  if (mask >> tid & 1u) __syncwarp(mask);
  if (tid == 2) s[0] = 2.f;
  if (tid < 2) out[tid] = v;
}

// Two threads write one shared address in the same interval.
__global__ void write_write_kernel(bool broken, Global<float> out) {
  __shared__ Shared<float[64]> s;
  const int tid = threadIdx.x;
  s[broken ? 0 : tid] = static_cast<float>(tid);
  __syncthreads();
  out[tid] = s[tid];
}

// A loop whose next round overwrites what the neighbour still reads (the classic missing barrier at the top of a
// tiled loop).
__global__ void missing_loop_barrier_kernel(bool broken, Global<float> out) {
  __shared__ Shared<float[64]> s;
  const int tid = threadIdx.x, n = blockDim.x;
  float acc = 0.f;
  for (int round = 0; round < 2; ++round) {
    if (!broken) __syncthreads();
    s[tid] = static_cast<float>(tid + round);
    __syncthreads();
    acc += s[(tid + 1) % n];
  }
  out[tid] = acc;
}

// Every thread of every block adds into out[0]: plainly (a race within and between blocks) or atomically.
__global__ void accumulate_kernel(bool atomic, Global<float> out) {
  if (atomic) {
    atomicAdd(out, 1.f);
  } else {
    out[0] = out[0] + 1.f;
  }
}

// Each block writes its own element, or (broken) all blocks the same one.
__global__ void per_block_write_kernel(bool broken, Global<float> out) {
  if (threadIdx.x == 0) out[broken ? 0 : blockIdx.x] = static_cast<float>(blockIdx.x);
}

// Copies n elements; `shift` moves the reads (1: one past the end, -1: one before the start).
__global__ void copy_kernel(int64_t n, int shift, Global<const float> in, Global<float> out) {
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) out[i] = in[i + shift];
}

// Writes out[i] = i for i < n.
__global__ void fill_kernel(int64_t n, Global<float> out) {
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) out[i] = static_cast<float>(i);
}

// Thread 0 of block 0 and thread 0 of block 1 touch one 16-byte buffer through pointers of different widths:
// `mode` 0: block 0 writes double 0 (bytes 0-7), block 1 reads float 2 (bytes 8-11); 1: block 1 reads float 1
// (bytes 4-7, inside the double: a race); 2: the blocks write the two 16-bit halves of bytes 0-3 (no race); 3: block
// 0 writes float 0 (bytes 0-3), block 1 its upper half (bytes 2-3: a race).
__global__ void mixed_width_kernel(int mode, Global<double> wide, Global<float> narrow, Global<uint16_t> half) {
  if (threadIdx.x != 0) return;
  const bool first = blockIdx.x == 0;
  if (mode <= 1) {
    if (first) {
      wide[0] = 1.0;
    } else {
      const float v = narrow[mode == 0 ? 2 : 1];
      narrow[3] = v;
    }
  } else if (mode == 2) {
    half[first ? 0 : 1] = 1;
  } else if (first) {
    narrow[0] = 1.f;
  } else {
    half[1] = 1;
  }
}

// Indexes a __shared__ array one past its size.
__global__ void shared_index_kernel(bool broken, Global<float> out) {
  __shared__ Shared<float[32]> s;
  const int tid = threadIdx.x;
  s[tid] = 1.f;
  __syncthreads();
  out[tid] = s[broken ? tid + 1 : tid];
}

// Block 0 fills the whole tile; the other blocks only the first `written` elements. Every thread reads its
// element.
__global__ void partial_fill_kernel(int written, Global<float> out) {
  __shared__ Shared<float[64]> s;
  const int tid = threadIdx.x;
  if (blockIdx.x == 0 || tid < written) s[tid] = 2.f;
  __syncthreads();
  out[blockIdx.x * 64 + tid] = s[tid];
}

// A barrier reached by half the block (`mode` 1), or two different barriers (2), or two different barriers
// behind one wrapper (3: the Newton-Schulz kernels' BlockSync), or one (0) or one behind the wrapper (4).
__global__ void barrier_kernel(int mode, Global<float> out) {
  const int tid = threadIdx.x;
  const aecr::BlockSync sync;
  if (mode == 0) {
    __syncthreads();
  } else if (mode == 1) {
    if (tid < 16) __syncthreads();
  } else if (mode == 2) {
    if (tid < 16) {
      __syncthreads();
    } else {
      __syncthreads();
    }
  } else if (mode == 3) {
    if (tid < 16) {
      sync();
    } else {
      sync();
    }
  } else {
    sync();
  }
  out[tid] = 1.f;
}

// A full-warp shuffle after half the warp returned.
__global__ void shuffle_after_return_kernel(bool broken, Global<float> out) {
  const int tid = threadIdx.x;
  if (broken && tid % kWarp >= 16) return;
  out[tid] = __shfl_xor_sync(0xffffffffu, static_cast<float>(tid), 1);
}

// Warp operations of lanes 0-15 (mask 0x0000ffff). `mode` 0: a shuffle from lane 5; 1: from lane 20, outside the
// mask; 2: the two halves of the warp at different __syncwarp calls; 3: all lanes at one.
__global__ void warp_ops_kernel(int mode, Global<float> out) {
  const int tid = threadIdx.x;
  float v = static_cast<float>(tid);
  if (mode <= 1 && tid < 16) v = __shfl_sync(0x0000ffffu, v, mode == 0 ? 5 : 20);
  if (mode == 2) {
    if (tid < 16) {
      __syncwarp();
    } else {
      __syncwarp();
    }
  }
  if (mode == 3) __syncwarp();
  out[tid] = v;
}

// Block 0 reads data[0]; block 1 writes data[0] (`broken`) or data[1]: blocks are not ordered.
__global__ void cross_block_kernel(bool broken, Global<float> data, Global<float> out) {
  if (threadIdx.x != 0) return;
  if (blockIdx.x == 0) out[0] = data[0];
  if (blockIdx.x == 1) data[broken ? 0 : 1] = 2.f;
}

// One warp multiplies a 16 x 8 tile of ones by an 8 x 16 one (TF32 WMMA) and stores the 16 x 16 result (every
// element 8) to shared memory; lane `reader` reads element 5 back, which lane 5 stored. `mode` 0: __syncwarp
// before the read; 1: none (a race with lane 5 unless the reader is lane 5); 2: only lanes 0-15 reach mma_sync;
// 3: the A tile 4 bytes off its 256-bit alignment; 4: an ldm of 6 floats (not a multiple of 16 bytes).
__global__ void wmma_kernel(int mode, int reader, Global<float> out) {
  namespace wmma = nvcuda::wmma;
  __shared__ __align__(32) Shared<float[16 * 8 + 8]> a_s;
  __shared__ __align__(32) Shared<float[8 * 16]> b_s;
  __shared__ __align__(32) Shared<float[16 * 16]> c_s;
  const int tid = threadIdx.x;
  for (int i = tid; i < 16 * 8 + 8; i += kWarp) a_s[i] = 1.f;
  for (int i = tid; i < 8 * 16; i += kWarp) b_s[i] = 1.f;
  __syncthreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> a;
  wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> b;
  wmma::fragment<wmma::accumulator, 16, 16, 8, float> c;
  wmma::fill_fragment(c, 0.f);
  wmma::load_matrix_sync(a, &a_s[mode == 3 ? 1 : 0], mode == 4 ? 6 : 8);
  wmma::load_matrix_sync(b, &b_s[0], 16);
  if (mode != 2 || tid < 16) wmma::mma_sync(c, a, b, c);
  wmma::store_matrix_sync(&c_s[0], c, 16, wmma::mem_row_major);
  if (mode == 0) __syncwarp();
  if (tid == reader) out[0] = c_s[5];
}

// Static shared memory of `Bytes` bytes.
template <int Bytes>
__global__ void static_shared_kernel(Global<float> out) {
  __shared__ Shared<unsigned char[Bytes]> s;
  s[threadIdx.x] = 1;
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}

// Uses `floats` floats of dynamic shared memory.
__global__ void dynamic_shared_kernel(int64_t floats, Global<float> out) {
  AECR_DYNAMIC_SHARED(float, buffer);
  for (int64_t i = threadIdx.x; i < floats; i += blockDim.x) buffer[i] = static_cast<float>(i);
  __syncthreads();
  if (threadIdx.x == 0) out[0] = buffer[floats - 1];
}

// The kernel the register and launch-bound checks are tried on (its resources are set by the test).
__global__ void resource_kernel(Global<float> out) { out[threadIdx.x + blockIdx.x * blockDim.x] = 1.f; }

at::Tensor zeros(int64_t n) { return at::zeros({n}, at::kFloat); }

}  // namespace

void register_broken_kernels(pybind11::module_& m) {
  m.def("write_then_read", [](int threads, int reader, int sync) {
    at::Tensor out = zeros(1);
    EmulatedLauncher{}(write_then_read_kernel, dim3(1), dim3(threads), reader, sync, device_ptr<float>(out));
    return out;
  });
  m.def("read_then_write", [](unsigned mask) {
    at::Tensor out = zeros(2);
    EmulatedLauncher{}(read_then_write_kernel, dim3(1), dim3(32), mask, device_ptr<float>(out));
    return out;
  });
  m.def("write_write", [](bool broken) {
    at::Tensor out = zeros(64);
    EmulatedLauncher{}(write_write_kernel, dim3(1), dim3(64), broken, device_ptr<float>(out));
    return out;
  });
  m.def("missing_loop_barrier", [](bool broken) {
    at::Tensor out = zeros(64);
    EmulatedLauncher{}(missing_loop_barrier_kernel, dim3(1), dim3(64), broken, device_ptr<float>(out));
    return out;
  });
  m.def("accumulate", [](int blocks, int threads, bool atomic) {
    at::Tensor out = zeros(1);
    EmulatedLauncher{}(accumulate_kernel, dim3(blocks), dim3(threads), atomic, device_ptr<float>(out));
    return out;
  });
  m.def("per_block_write", [](bool broken) {
    at::Tensor out = zeros(4);
    EmulatedLauncher{}(per_block_write_kernel, dim3(4), dim3(32), broken, device_ptr<float>(out));
    return out;
  });
  m.def("copy", [](const at::Tensor& in, int shift) {
    at::Tensor out = at::empty_like(in);
    EmulatedLauncher{}(copy_kernel, dim3(1), dim3(32), in.numel(), shift, device_ptr<const float>(in),
                       device_ptr<float>(out));
    return out;
  });
  m.def("mixed_width", [](int mode) {
    at::Tensor bytes = at::zeros({16}, at::kByte);
    EmulatedLauncher{}(mixed_width_kernel, dim3(2), dim3(32), mode, aecr::device_ptr_as<double>(bytes),
                       aecr::device_ptr_as<float>(bytes), aecr::device_ptr_as<uint16_t>(bytes));
    return bytes;
  });
  // A workspace allocated as a driver allocates it, then copied out by a kernel. `mode` 0: nothing wrote it (a read
  // before any write); 1: a kernel of an earlier launch filled it; 2: the host zeroed it (at::zeros); 3: an earlier
  // launch filled only its first 16 floats.
  m.def("read_workspace", [](int mode) {
    const aecr_emulation::PoisonedWorkspaces scope;
    at::Tensor workspace = mode == 2 ? at::zeros({32}, at::kFloat) : at::empty({32}, at::kFloat);
    if (mode == 1 || mode == 3) {
      EmulatedLauncher{}(fill_kernel, dim3(1), dim3(32), int64_t(mode == 1 ? 32 : 16), device_ptr<float>(workspace));
    }
    at::Tensor out = at::empty({32}, at::kFloat);
    EmulatedLauncher{}(copy_kernel, dim3(1), dim3(32), int64_t(32), 0, device_ptr<const float>(workspace),
                       device_ptr<float>(out));
    return out;
  });
  m.def("poisoned_empty", [](int64_t n) {
    const aecr_emulation::PoisonedWorkspaces scope;
    return at::empty({n}, at::kFloat);
  });
  m.def("shared_index", [](bool broken) {
    at::Tensor out = zeros(32);
    EmulatedLauncher{}(shared_index_kernel, dim3(1), dim3(32), broken, device_ptr<float>(out));
    return out;
  });
  m.def("partial_fill", [](int blocks, int written, at::Tensor out) {
    EmulatedLauncher{}(partial_fill_kernel, dim3(blocks), dim3(64), written, device_ptr<float>(out));
  });
  m.def("barrier", [](int mode) {
    at::Tensor out = zeros(32);
    EmulatedLauncher{}(barrier_kernel, dim3(1), dim3(32), mode, device_ptr<float>(out));
    return out;
  });
  m.def("shuffle_after_return", [](bool broken) {
    at::Tensor out = zeros(32);
    EmulatedLauncher{}(shuffle_after_return_kernel, dim3(1), dim3(32), broken, device_ptr<float>(out));
    return out;
  });
  m.def("warp_ops", [](int mode) {
    at::Tensor out = zeros(32);
    EmulatedLauncher{}(warp_ops_kernel, dim3(1), dim3(32), mode, device_ptr<float>(out));
    return out;
  });
  m.def("cross_block", [](bool broken) {
    at::Tensor data = at::ones({2}, at::kFloat), out = zeros(1);
    EmulatedLauncher{}(cross_block_kernel, dim3(2), dim3(32), broken, device_ptr<float>(data), device_ptr<float>(out));
    return out;
  });
  m.def("wmma", [](int mode, int reader) {
    at::Tensor out = zeros(1);
    EmulatedLauncher{}(wmma_kernel, dim3(1), dim3(32), mode, reader, device_ptr<float>(out));
    return out;
  });
  m.def("static_shared", [](bool broken) {
    at::Tensor out = zeros(32);
    if (broken) {
      EmulatedLauncher{}(static_shared_kernel<(48 << 10) + 4>, dim3(1), dim3(32), device_ptr<float>(out));
    } else {
      EmulatedLauncher{}(static_shared_kernel<(48 << 10)>, dim3(1), dim3(32), device_ptr<float>(out));
    }
    return out;
  });
  m.def("dynamic_shared", [](int64_t bytes, int64_t allowed) {
    at::Tensor out = zeros(1);
    const EmulatedLauncher launch;
    if (allowed > 0) launch.allow_shared_memory(dynamic_shared_kernel, static_cast<size_t>(allowed));
    launch.with_shared_memory(static_cast<size_t>(bytes))(dynamic_shared_kernel, dim3(1), dim3(64),
                                                           bytes / int64_t(sizeof(float)), device_ptr<float>(out));
    return out;
  });
  m.def("launch_shape", [](std::vector<int64_t> grid, std::vector<int64_t> block) {
    const int64_t n = grid[0] * grid[1] * grid[2] * block[0] * block[1] * block[2];
    at::Tensor out = zeros(std::min<int64_t>(n, int64_t(1) << 24));
    EmulatedLauncher{}(resource_kernel, dim3(grid[0], grid[1], grid[2]), dim3(block[0], block[1], block[2]),
                       device_ptr<float>(out));
    return out;
  });
}
