// CUDA device intrinsics under the emulator: barriers, warp shuffles, fp16/bf16 types and WMMA.
//
// WMMA fragments hold their whole matrix (every lane computes all of it; lane 0 stores), and loads and stores
// check the hardware's rules: 256-bit aligned pointers, ldm a multiple of 16 bytes. TF32 operands round like
// cvt.rna; __half / __nv_bfloat16 are c10::Half / c10::BFloat16 (round to nearest even).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <source_location>
#include <string>
#include <type_traits>

#include "memory.h"
#include "traffic.h"

inline void __syncthreads(const std::source_location site = std::source_location::current()) {
  aecr_emulation::block_barrier(site);
}

inline void __syncwarp(unsigned mask = 0xffffffffu, const std::source_location site = std::source_location::current()) {
  aecr_emulation::warp_barrier(mask, site);
}

namespace aecr_emulation {

template <typename T>
T shuffle(unsigned mask, T value, unsigned source, const std::source_location& site) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "a shuffle of a register value");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = warp_exchange(mask, bits, source, site);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

}  // namespace aecr_emulation

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32,
                  const std::source_location site = std::source_location::current()) {
  const unsigned lane = threadIdx.x % 32;
  const unsigned base = lane / width * width;
  return aecr_emulation::shuffle(mask, value, base + ((lane - base) ^ static_cast<unsigned>(lane_mask)) % width, site);
}

template <typename T>
T __shfl_sync(unsigned mask, T value, int source, int width = 32,
              const std::source_location site = std::source_location::current()) {
  const unsigned lane = threadIdx.x % 32;
  return aecr_emulation::shuffle(mask, value, lane / width * width + static_cast<unsigned>(source) % width, site);
}

template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32,
                   const std::source_location site = std::source_location::current()) {
  const unsigned lane = threadIdx.x % 32;
  const unsigned base = lane / width * width;
  const unsigned source = lane - base + delta < static_cast<unsigned>(width) ? lane + delta : lane;
  return aecr_emulation::shuffle(mask, value, source, site);
}

[[noreturn]] inline void __trap() { aecr_emulation::fail(aecr_emulation::where() + ": __trap()"); }

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
void check_access(const aecr_emulation::Ptr<P>& pointer, unsigned ldm, const char* what) {
  if (reinterpret_cast<uintptr_t>(pointer.raw()) % 32 != 0) {
    aecr_emulation::fail(aecr_emulation::where() + ": " + what + ": pointer not 256-bit aligned");
  }
  if ((ldm * sizeof(P)) % 16 != 0) {
    aecr_emulation::fail(aecr_emulation::where() + ": " + what + ": ldm not a multiple of 16 bytes");
  }
}

// WMMA operations are collective: all 32 lanes of the warp, converged, at the same call (a lane that diverged or
// returned is an error naming the call). They wait for each other but order no memory.
inline void collective(const std::source_location& site) { aecr_emulation::warp_barrier(0xffffffffu, site, false); }

template <typename Use, int M, int N, int K, typename T, typename Layout, typename P>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const aecr_emulation::Ptr<P>& pointer, unsigned ldm,
                      const std::source_location site = std::source_location::current()) {
  static_assert(std::is_same<std::remove_const_t<P>, typename memory_type<T>::type>::value,
                "WMMA load from the fragment's type");
  collective(site);
  check_access(pointer, ldm, "load_matrix_sync");
  using F = fragment<Use, M, N, K, T, Layout>;
  auto at = [&](int e) {
    const int i = e / F::cols, j = e % F::cols;
    return std::is_same<Layout, row_major>::value ? int64_t(i) * ldm + j : i + int64_t(j) * ldm;
  };
  {
    const aecr_emulation::UncountedAccesses whole_matrix;  // every lane holds it here; each loads a share below
    for (int e = 0; e < F::num_elements; ++e) f.x[e] = static_cast<float>(pointer[at(e)]);
  }
  const unsigned lane = aecr_emulation::context.tid % 32;
  for (int e = static_cast<int>(lane); e < F::num_elements; e += 32) {
    aecr_emulation::count_access(pointer.raw() + at(e), sizeof(P), aecr_emulation::Access::Read,
                                 pointer.extent().shared != nullptr);
  }
}

template <int M, int N, int K>
void store_matrix_sync(const aecr_emulation::Ptr<float>& pointer, const fragment<accumulator, M, N, K, float>& f,
                       unsigned ldm, layout_t layout,
                       const std::source_location site = std::source_location::current()) {
  collective(site);
  check_access(pointer, ldm, "store_matrix_sync");
  // Each lane stores its share of the tile (the hardware's split is unspecified: element e goes to lane e % 32),
  // so the race check sees 32 writers: a lane that reads the tile back needs __syncwarp first.
  const unsigned lane = aecr_emulation::context.tid % 32;
  for (int e = static_cast<int>(lane); e < M * N; e += 32) {
    const int i = e / N, j = e % N;
    pointer[layout == mem_row_major ? int64_t(i) * ldm + j : i + int64_t(j) * ldm] = f.x[e];
  }
}

template <int M, int N, int K>
void fill_fragment(fragment<accumulator, M, N, K, float>& f, float v) {
  for (float& e : f.x) e = v;
}

template <int M, int N, int K, typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c,
              const std::source_location site = std::source_location::current()) {
  collective(site);
  if (aecr_emulation::context.tid % 32 == 0) aecr_emulation::count_mma(2.0 * M * N * K);
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
