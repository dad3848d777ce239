// How kernels name device memory, so that the same kernels run under the CPU emulator with checked memory:
//
//   Global<T>          a kernel parameter pointing into a tensor: T* here
//   Shared<T[N]...>    a __shared__ array: T[N]... here (`__shared__ Shared<float[64][68]> tile;`)
//   device_ptr<T>(tensor, offset)   the kernel argument for a contiguous tensor, from element `offset` on
//   optional_ptr<T>(optional tensor, offset), defined_ptr<T>(tensor), device_ptr_as<T>(byte tensor)
//
// Under tests/cuda_emulation (AECR_CUDA_EMULATION) the same names are a pointer that knows its tensor's extent
// and arrays whose accesses are recorded (bounds, races, uninitialised reads); see cuda_emulation.h.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#ifdef AECR_CUDA_EMULATION
namespace aecr {
using aecr_emulation::defined_ptr;
using aecr_emulation::device_ptr;
using aecr_emulation::device_ptr_as;
using aecr_emulation::Global;
using aecr_emulation::optional_ptr;
using aecr_emulation::Shared;
}  // namespace aecr
#else
namespace aecr {

template <typename T>
using Global = T*;
template <typename A>
using Shared = A;

template <typename T>
T* device_ptr(const at::Tensor& t, int64_t offset = 0) {
  return t.data_ptr<std::remove_const_t<T>>() + offset;
}

template <typename T>
T* device_ptr_as(const at::Tensor& bytes) {
  return static_cast<T*>(bytes.data_ptr());
}

template <typename T>
T* optional_ptr(const std::optional<at::Tensor>& t, int64_t offset = 0) {
  return t.has_value() ? device_ptr<T>(*t, offset) : nullptr;
}

template <typename T>
T* defined_ptr(const at::Tensor& t) {
  return t.defined() ? device_ptr<T>(t) : nullptr;
}

}  // namespace aecr

// Dynamic shared memory as an array of T (launched with the byte count as the third launch parameter).
#define AECR_DYNAMIC_SHARED(T, name)                        \
  extern __shared__ __align__(16) unsigned char aecr_dynamic_shared_[]; \
  T* const name = reinterpret_cast<T*>(aecr_dynamic_shared_)
#endif
