// The fused (matrix-form) Newton-Schulz kernels: one block per matrix, the whole iteration (or its reverse) in
// one launch, around the programs of aecr/newton_schulz.h. Written over a launcher as in
// deform_conv_implicit_driver.h (cuda_launcher.cuh in production, tests/cuda_emulation on the CPU).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cstdint>

#include "aecr/newton_schulz.h"

namespace aecr {
namespace {

struct BlockSync {
  AECR_HOST_DEVICE void operator()() const {
#if defined(__CUDA_ARCH__) || defined(AECR_CUDA_EMULATION)
    __syncthreads();
#endif
  }
};

template <typename V>
__global__ void ns_forward_kernel(const V* a, const V* norm, V* out, V* work, int64_t f, int64_t n_iter) {
  const int64_t b = blockIdx.x, ff = f * f;
  ns_forward_program<V>(a + b * ff, norm[b], out + b * ff, work + b * kNsWorkMatrices * ff, f, n_iter, threadIdx.x,
                        blockDim.x, BlockSync{});
}

template <typename V>
__global__ void ns_backward_kernel(const V* a, const V* norm, const V* grad, V* grad_y0, V* work, int64_t f,
                                   int64_t n_iter) {
  const int64_t b = blockIdx.x, ff = f * f;
  ns_backward_program<V>(a + b * ff, norm[b], grad + b * ff, grad_y0 + b * ff, work + b * kNsWorkMatrices * ff, f,
                         n_iter, threadIdx.x, blockDim.x, BlockSync{});
}

int threads_for_matrix(int64_t f) {
  return static_cast<int>(std::min<int64_t>(1024, std::max<int64_t>(32, (f * f + 31) / 32 * 32)));
}

// Z_n / sqrt(||A||) for a batch of matrices a [B, F, F] with Frobenius norms `norm` [B].
template <class L>
at::Tensor ns_fused_forward_launch(const L& launch, const at::Tensor& a, const at::Tensor& norm, int64_t n_iter) {
  const int64_t batch = a.size(0), f = a.size(1);
  at::Tensor out = at::empty_like(a);
  at::Tensor work = at::empty({batch * kNsWorkMatrices * f * f}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "ns_fused_forward", [&] {
    launch(ns_forward_kernel<scalar_t>, dim3(batch), dim3(threads_for_matrix(f)), a.data_ptr<scalar_t>(),
           norm.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), work.data_ptr<scalar_t>(), f, n_iter);
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
    launch(ns_backward_kernel<scalar_t>, dim3(batch), dim3(threads_for_matrix(f)), a.data_ptr<scalar_t>(),
           norm.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
           work.data_ptr<scalar_t>(), f, n_iter);
  });
  return out;
}

}  // namespace
}  // namespace aecr
