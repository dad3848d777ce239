// Portability macros for math that is compiled by both g++ and nvcc.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define AECR_HOST_DEVICE __host__ __device__
#define AECR_INLINE __forceinline__
#else
#define AECR_HOST_DEVICE
#define AECR_INLINE inline
#endif

// Counts `n` floating-point operations in type T where the CUDA emulator measures kernels
// (tests/cuda_emulation/traffic.h); nothing in a real build.
#ifndef AECR_COUNT_FLOPS
#define AECR_COUNT_FLOPS(T, n) ((void)0)
#endif
