// A CPU emulator of the CUDA features the implicit-GEMM DCN kernels use, so that their index arithmetic,
// tiling, synchronisation and WMMA layouts are exercised by the CPU tests (no GPU needed):
//   - the threads of a block run as std::threads, blocks one after another; __shared__ is a static local
//     (shared by the threads of the running block), __syncthreads a std::barrier;
//   - warp shuffles exchange through per-warp slots between two warp barriers;
//   - WMMA fragments hold their whole matrix (every lane computes all of it; lane 0 stores), and loads and
//     stores check the hardware's rules: 256-bit aligned pointers, ldm a multiple of 16 bytes;
//   - __half / __nv_bfloat16 are c10::Half / c10::BFloat16 (round to nearest even), TF32 rounds like cvt.rna.
// A broken rule is recorded and raised (std::runtime_error) when the launch returns.
//
// It models results, not timing or memory ordering beyond barriers. Include it before the kernels, with
// AECR_CUDA_EMULATION defined.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace aecr_emulation {

struct Block {
  explicit Block(unsigned threads) : all(threads), slots(threads) {
    for (unsigned w = 0; w < (threads + 31) / 32; ++w) {
      warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, threads - 32 * w)));
    }
  }
  std::barrier<> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<double> slots;
};

inline thread_local Block* block = nullptr;
inline std::mutex error_mutex;
inline std::string first_error;

inline void fail(const std::string& what) {
  std::lock_guard<std::mutex> lock(error_mutex);
  if (first_error.empty()) first_error = what;
}

// Runs kernel(args...) over the grid: one std::thread per CUDA thread of a block, the blocks one after another
// (a barrier between blocks, since their shared memory is the same static storage).
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 threads_per_block, Args&&... args) {
  gridDim = grid;
  blockDim = threads_per_block;
  const unsigned threads = threads_per_block.x * threads_per_block.y * threads_per_block.z;
  first_error.clear();
  Block state(threads);
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      threadIdx = dim3(t % threads_per_block.x, (t / threads_per_block.x) % threads_per_block.y,
                       t / (threads_per_block.x * threads_per_block.y));
      block = &state;
      for (unsigned z = 0; z < grid.z; ++z) {
        for (unsigned y = 0; y < grid.y; ++y) {
          for (unsigned x = 0; x < grid.x; ++x) {
            blockIdx = dim3(x, y, z);
            kernel(args...);
            state.all.arrive_and_wait();
          }
        }
      }
    });
  }
  for (auto& thread : pool) thread.join();
  if (!first_error.empty()) throw std::runtime_error("CUDA emulation: " + first_error);
}

}  // namespace aecr_emulation

inline void __syncthreads() { aecr_emulation::block->all.arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned, T value, int lane_mask) {
  static_assert(std::is_arithmetic<T>::value, "shuffle of a number");
  auto& b = *aecr_emulation::block;
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  b.slots[threadIdx.x] = static_cast<double>(value);
  b.warps[warp]->arrive_and_wait();
  const T other = static_cast<T>(b.slots[warp * 32 + (lane ^ static_cast<unsigned>(lane_mask))]);
  b.warps[warp]->arrive_and_wait();
  return other;
}

inline float atomicAdd(float* address, float value) { return std::atomic_ref<float>(*address).fetch_add(value); }
inline double atomicAdd(double* address, double value) { return std::atomic_ref<double>(*address).fetch_add(value); }
inline int atomicOr(int* address, int value) { return std::atomic_ref<int>(*address).fetch_or(value); }

using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
inline __half __float2half(float x) { return __half(x); }
inline __nv_bfloat16 __float2bfloat16(float x) { return __nv_bfloat16(x); }

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

// cvt.rna.tf32.f32: keep 10 mantissa bits, round to nearest, ties away from zero.
inline float __float_to_tf32(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;
  std::memcpy(&x, &u, 4);
  return x;
}

template <typename Use, int M, int N, int K>
struct fragment_shape;
template <int M, int N, int K>
struct fragment_shape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct fragment_shape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct fragment_shape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

// What a fragment of element type T is loaded from: float for TF32, T otherwise.
template <typename T>
struct memory_type {
  using type = T;
};
template <>
struct memory_type<precision::tf32> {
  using type = float;
};

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = fragment_shape<Use, M, N, K>::rows, cols = fragment_shape<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  float x[rows * cols];  // the whole matrix, row-major
};

template <typename P>
void check_access(const P* pointer, unsigned ldm, const char* what) {
  if (reinterpret_cast<uintptr_t>(pointer) % 32 != 0) aecr_emulation::fail(std::string(what) + ": pointer not 256-bit aligned");
  if ((ldm * sizeof(P)) % 16 != 0) aecr_emulation::fail(std::string(what) + ": ldm not a multiple of 16 bytes");
}

template <typename Use, int M, int N, int K, typename T, typename Layout, typename P>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const P* pointer, unsigned ldm) {
  static_assert(std::is_same<P, typename memory_type<T>::type>::value, "WMMA load from the fragment's type");
  check_access(pointer, ldm, "load_matrix_sync");
  using F = fragment<Use, M, N, K, T, Layout>;
  for (int i = 0; i < F::rows; ++i) {
    for (int j = 0; j < F::cols; ++j) {
      const P v = std::is_same<Layout, row_major>::value ? pointer[i * ldm + j] : pointer[i + j * ldm];
      f.x[i * F::cols + j] = static_cast<float>(v);
    }
  }
}

template <int M, int N, int K>
void store_matrix_sync(float* pointer, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  check_access(pointer, ldm, "store_matrix_sync");
  if (threadIdx.x % 32 != 0) return;  // the warp stores once
  for (int i = 0; i < M; ++i) {
    for (int j = 0; j < N; ++j) {
      (layout == mem_row_major ? pointer[i * ldm + j] : pointer[i + j * ldm]) = f.x[i * N + j];
    }
  }
}

template <int M, int N, int K>
void fill_fragment(fragment<accumulator, M, N, K, float>& f, float v) {
  for (float& e : f.x) e = v;
}

template <int M, int N, int K, typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int i = 0; i < M; ++i) {
    for (int j = 0; j < N; ++j) {
      float acc = c.x[i * N + j];
      for (int k = 0; k < K; ++k) acc += a.x[i * K + k] * b.x[k * N + j];
      out[i * N + j] = acc;
    }
  }
  std::memcpy(d.x, out, sizeof(out));
}

}  // namespace wmma
}  // namespace nvcuda

// The launcher of the drivers (see csrc/cuda/deform_conv_implicit_driver.h) on the emulator.
struct EmulatedLauncher {
  int64_t sms = 3;

  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), dim3 grid, dim3 block, Args&&... args) const {
    aecr_emulation::launch(kernel, grid, block, std::forward<Args>(args)...);
  }

  int64_t multiprocessors() const { return sms; }
};
