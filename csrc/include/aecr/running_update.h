// FastDeconv's running buffers, moved towards a batch's statistics (shared by the CPU loop and the CUDA kernel):
//   running = running * keep + stat * momentum,   keep = 1 - momentum (computed in double by the caller, as
//                                                   PyTorch does for `running * (1 - momentum)`)
// for the mean and the whitening matrix together, and only when every value of both statistics is finite
// (else both buffers stay as they are: one bad batch must not poison them).
#pragma once

#include <cmath>
#include <cstdint>

#include "aecr/macros.h"

namespace aecr {

template <typename T>
AECR_HOST_DEVICE AECR_INLINE T running_update(T running, T stat, T keep, T momentum) {
  return running * keep + stat * momentum;
}

template <typename T>
AECR_HOST_DEVICE AECR_INLINE bool finite_value(T v) {
#ifdef __CUDA_ARCH__
  return isfinite(v);
#else
  return std::isfinite(v);
#endif
}

}  // namespace aecr
