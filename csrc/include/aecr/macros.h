// Portability macros for math that is compiled by both g++ and nvcc.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define AECR_HOST_DEVICE __host__ __device__
#define AECR_INLINE __forceinline__
#else
#define AECR_HOST_DEVICE
#define AECR_INLINE inline
#endif
