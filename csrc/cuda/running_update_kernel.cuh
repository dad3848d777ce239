// FastDeconv's running update on CUDA in one launch (one block: the buffers hold F + F*F values): the
// finiteness check of both statistics, then the update of both buffers or of neither, and the verdict written to
// the device (nothing waits for it). Written over a launcher as in deform_conv_implicit_driver.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cstdint>

#include "aecr/running_update.h"
#include "cuda/device_memory.cuh"

namespace aecr {
namespace {

constexpr int kRunningUpdateThreads = 256;

template <typename V>
__global__ void __launch_bounds__(kRunningUpdateThreads, 1) running_update_kernel(
    Global<V> running_mean, Global<V> running_deconv, Global<const V> mean, Global<const V> deconv, int64_t n_mean,
    int64_t n_deconv, V keep, V momentum, Global<bool> finite) {
  __shared__ Shared<int> bad;
  if (threadIdx.x == 0) bad = 0;
  __syncthreads();
  int mine = 0;
  for (int64_t i = threadIdx.x; i < n_mean; i += blockDim.x) mine |= !finite_value(static_cast<V>(mean[i]));
  for (int64_t i = threadIdx.x; i < n_deconv; i += blockDim.x) mine |= !finite_value(static_cast<V>(deconv[i]));
  if (mine) atomicOr(&bad, 1);
  __syncthreads();
  const bool ok = bad == 0;
  if (ok) {
    for (int64_t i = threadIdx.x; i < n_mean; i += blockDim.x) {
      running_mean[i] = running_update<V>(running_mean[i], mean[i], keep, momentum);
    }
    for (int64_t i = threadIdx.x; i < n_deconv; i += blockDim.x) {
      running_deconv[i] = running_update<V>(running_deconv[i], deconv[i], keep, momentum);
    }
  }
  if (threadIdx.x == 0) *finite = ok;
}

// The fastdeconv_update_running op's body (arguments checked by check_running_update).
template <class L>
at::Tensor running_update_launch(const L& launch, at::Tensor& running_mean, at::Tensor& running_deconv,
                                 const at::Tensor& mean_, const at::Tensor& deconv_, double momentum) {
  const at::Tensor mean = mean_.contiguous(), deconv = deconv_.contiguous();
  at::Tensor finite = at::empty({}, mean.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "fastdeconv_update_running", [&] {
    launch(running_update_kernel<scalar_t>, dim3(1), dim3(kRunningUpdateThreads), device_ptr<scalar_t>(running_mean),
           device_ptr<scalar_t>(running_deconv), device_ptr<const scalar_t>(mean), device_ptr<const scalar_t>(deconv),
           mean.numel(), deconv.numel(), static_cast<scalar_t>(1.0 - momentum), static_cast<scalar_t>(momentum),
           device_ptr<bool>(finite));
  });
  return finite;
}

}  // namespace
}  // namespace aecr
