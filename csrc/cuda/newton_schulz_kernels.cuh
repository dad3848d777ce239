// The fused (matrix-form) Newton-Schulz kernels: one block per matrix, the whole iteration (or its reverse) in
// one launch, around the programs of aecr/newton_schulz.h. Written over a launcher (cuda_launcher.cuh in
// production, tests/cuda_emulation on the CPU).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cstdint>
#if defined(AECR_CUDA_EMULATION)
#include <source_location>
#endif

#include "aecr/newton_schulz.h"
#include "cuda/device_memory.cuh"

namespace aecr {
namespace {

// Threads of a block: enough for one element each of a 22 x 22 matrix; larger ones (up to 48 x 48) take a few
// elements per thread. The bound keeps the compiler to at most 128 registers a thread.
constexpr int kNsMaxThreads = 512;

struct BlockSync {
#if defined(AECR_CUDA_EMULATION)
  // The emulator tells barriers apart by source location: each call site of the wrapper is its own barrier.
  void operator()(const std::source_location site = std::source_location::current()) const { __syncthreads(site); }
#else
  AECR_HOST_DEVICE void operator()() const {
#if defined(__CUDA_ARCH__)
    __syncthreads();
#endif
  }
#endif
};

template <typename V>
__global__ void __launch_bounds__(kNsMaxThreads, 1) ns_forward_kernel(Global<const V> a, Global<const V> norm,
                                                                   Global<V> out, Global<V> work, int64_t f,
                                                                   int64_t n_iter) {
  const int64_t b = blockIdx.x, ff = f * f;
  ns_forward_program<V>(a + b * ff, static_cast<V>(norm[b]), out + b * ff, work + b * kNsWorkMatrices * ff, f, n_iter,
                        threadIdx.x, blockDim.x, BlockSync{});
}

template <typename V>
__global__ void __launch_bounds__(kNsMaxThreads, 1) ns_backward_kernel(Global<const V> a, Global<const V> norm,
                                                                    Global<const V> grad, Global<V> grad_y0,
                                                                    Global<V> work, int64_t f, int64_t n_iter) {
  const int64_t b = blockIdx.x, ff = f * f;
  ns_backward_program<V>(a + b * ff, static_cast<V>(norm[b]), grad + b * ff, grad_y0 + b * ff,
                         work + b * kNsWorkMatrices * ff, f, n_iter, threadIdx.x, blockDim.x, BlockSync{});
}

int threads_for_matrix(int64_t f) {
  return static_cast<int>(std::min<int64_t>(kNsMaxThreads, std::max<int64_t>(32, (f * f + 31) / 32 * 32)));
}

// Z_n / sqrt(||A||) for a batch of matrices a [B, F, F] with Frobenius norms `norm` [B].
template <class L>
at::Tensor ns_fused_forward_launch(const L& launch, const at::Tensor& a, const at::Tensor& norm, int64_t n_iter) {
  const int64_t batch = a.size(0), f = a.size(1);
  at::Tensor out = at::empty_like(a);
  at::Tensor work = at::empty({batch * kNsWorkMatrices * f * f}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "ns_fused_forward", [&] {
    launch(ns_forward_kernel<scalar_t>, dim3(batch), dim3(threads_for_matrix(f)), device_ptr<const scalar_t>(a),
           device_ptr<const scalar_t>(norm), device_ptr<scalar_t>(out), device_ptr<scalar_t>(work), f, n_iter);
  });
  return out;
}

// Gradient w.r.t. Y0 = A/||A|| of <grad, result>.
template <class L>
at::Tensor ns_fused_backward_launch(const L& launch, const at::Tensor& a, const at::Tensor& norm,
                                    const at::Tensor& grad, int64_t n_iter) {
  const int64_t batch = a.size(0), f = a.size(1);
  at::Tensor out = at::empty_like(a);
  at::Tensor work = at::empty({batch * kNsWorkMatrices * f * f}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "ns_fused_backward", [&] {
    launch(ns_backward_kernel<scalar_t>, dim3(batch), dim3(threads_for_matrix(f)), device_ptr<const scalar_t>(a),
           device_ptr<const scalar_t>(norm), device_ptr<const scalar_t>(grad), device_ptr<scalar_t>(out),
           device_ptr<scalar_t>(work), f, n_iter);
  });
  return out;
}

}  // namespace
}  // namespace aecr
