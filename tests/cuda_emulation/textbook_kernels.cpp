// Kernels whose traffic the textbooks give, for validating the emulator's counts (traffic.h): a coalesced fp32
// copy (4 sectors a warp request), a copy reading with a stride of 32 floats (32 sectors a request), a matrix
// transpose through a 32 x 32 shared tile read down its columns (32-way bank conflicts) and the same with the
// tile padded to 33 columns (none), and a kernel that reads its block's chunk twice (L2 reuse).
#define AECR_CUDA_EMULATION 1
#include "cuda_emulation.h"

#include <torch/extension.h>

#include "cuda/device_memory.cuh"

namespace {

using aecr::device_ptr;
using aecr::Global;
using aecr::Shared;

// out[i] = in[i * stride].
__global__ void strided_copy_kernel(int64_t n, int stride, Global<const float> in, Global<float> out) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = in[i * stride];
}

// out = in^T for an n x n matrix, n a multiple of 32, through a 32 x Columns tile (blocks of 32 x 32 threads).
template <int Columns>
__global__ void transpose_kernel(int n, Global<const float> in, Global<float> out) {
  __shared__ Shared<float[32][Columns]> tile;
  const int x = threadIdx.x, y = threadIdx.y;
  const int bx = blockIdx.x * 32, by = blockIdx.y * 32;
  tile[y][x] = in[int64_t(by + y) * n + bx + x];
  __syncthreads();
  out[int64_t(bx + y) * n + by + x] = tile[x][y];
}

// Each block sums its chunk of `chunk` floats `passes` times over (each pass a full read of the chunk).
__global__ void reread_kernel(int64_t chunk, int passes, Global<const float> in, Global<float> out) {
  float sum = 0.f;
  for (int p = 0; p < passes; ++p) {
    for (int64_t i = threadIdx.x; i < chunk; i += blockDim.x) sum += in[int64_t(blockIdx.x) * chunk + i];
  }
  out[int64_t(blockIdx.x) * blockDim.x + threadIdx.x] = sum;
}

}  // namespace

void register_textbook_kernels(pybind11::module_& m) {
  m.def("strided_copy", [](const at::Tensor& in, int stride) {
    const int64_t n = in.numel() / stride;
    at::Tensor out = at::empty({n}, in.options());
    EmulatedLauncher{}(strided_copy_kernel, dim3(unsigned((n + 255) / 256)), dim3(256), n, stride,
                       device_ptr<const float>(in), device_ptr<float>(out));
    return out;
  });
  m.def("transpose", [](const at::Tensor& in, bool padded) {
    const int n = static_cast<int>(in.size(0));
    at::Tensor out = at::empty_like(in);
    const dim3 grid(unsigned(n / 32), unsigned(n / 32)), block(32, 32);
    if (padded) {
      EmulatedLauncher{}(transpose_kernel<33>, grid, block, n, device_ptr<const float>(in), device_ptr<float>(out));
    } else {
      EmulatedLauncher{}(transpose_kernel<32>, grid, block, n, device_ptr<const float>(in), device_ptr<float>(out));
    }
    return out;
  });
  m.def("reread", [](const at::Tensor& in, int64_t blocks, int passes) {
    const int64_t chunk = in.numel() / blocks;
    at::Tensor out = at::empty({blocks * 128}, in.options());
    EmulatedLauncher{}(reread_kernel, dim3(unsigned(blocks)), dim3(128), chunk, passes, device_ptr<const float>(in),
                       device_ptr<float>(out));
    return out;
  });
}
