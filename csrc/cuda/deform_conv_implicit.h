// Implicit-GEMM path of deform_conv2d on CUDA (tensor cores; see deform_conv_implicit_kernels.cuh). The simple
// path (deform_conv_driver.h over cuda/deform_conv_kernels.cuh) stays the reference and serves every case this
// one does not take.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "aecr/deform_conv.h"
#include "deform_conv_args.h"

namespace aecr {

// Which CUDA path runs, from the environment variable AECR_DCN_CUDA_PATH: "simple" (the default until the
// implicit path has been verified on a GPU) or "implicit". Read at every call, so tests and benchmarks can
// switch it with os.environ. Any other value is an error that names the variable.
bool implicit_path_requested();

// Whether the implicit path can take these tensors: fp16 / bf16, or fp32 when PyTorch allows TF32 in matmuls
// (torch.backends.cuda.matmul.allow_tf32, the flag the simple path's cuBLAS GEMMs follow); kernels compiled for
// compute capability >= 8.0 (not JIT-compiled from older PTX, where they would only trap) on a GPU that has it;
// planes addressable with 32-bit indices; grids within CUDA's limits; a workspace within
// kImplicitWorkspaceBudget (1 GiB: the path does not chunk). Inputs must be non-empty.
bool implicit_path_applies(const at::Tensor& input, const at::Tensor& weight, const DeformConvShape& s,
                           int64_t groups);

// Same contracts as the deform_conv2d / deform_conv2d_backward ops, for arguments checked by check_deform_conv.
at::Tensor deform_conv2d_implicit(const DeformConvShape& s, const at::Tensor& input, const at::Tensor& weight,
                                  const at::Tensor& offset, const std::optional<at::Tensor>& mask,
                                  const std::optional<at::Tensor>& bias, int64_t groups);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_implicit(
    const DeformConvShape& s, const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& offset, const std::optional<at::Tensor>& mask, int64_t groups, const DeformConvGrads& needed);

}  // namespace aecr
