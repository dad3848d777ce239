// CUDA drivers and kernels built for the CPU emulator, as a Python module for tests/test_cuda_emulation.py:
// the implicit-GEMM deform_conv2d (csrc/cuda/deform_conv_implicit_*), FastDeconv's two-launch patch
// statistics (csrc/cuda/patch_moments.cuh), fused Newton-Schulz (csrc/cuda/newton_schulz_kernels.cuh) and
// running update (csrc/cuda/running_update_kernel.cuh). The tensors are CPU tensors; the kernels run with emulated threads,
// shared memory and tensor cores.
#define AECR_CUDA_EMULATION 1
#include "cuda_emulation.h"

#include <torch/extension.h>

#include "cuda/deform_conv_implicit_driver.h"
#include "cuda/newton_schulz_kernels.cuh"
#include "cuda/patch_moments.cuh"
#include "cuda/running_update_kernel.cuh"
#include "fastdeconv_driver.h"

namespace {

std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : t;
}

at::Tensor forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
                   const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& bias,
                   std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation,
                   int64_t groups, int64_t offset_groups) {
  const aecr::DeformConvShape s = aecr::check_deform_conv(input, weight, offset, mask, bias, stride, padding,
                                                          dilation, groups, offset_groups);
  return aecr::implicit_forward(EmulatedLauncher{}, s, input.contiguous(), weight.contiguous(), offset.contiguous(),
                                contiguous(mask), contiguous(bias), groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
    const std::optional<at::Tensor>& mask, std::vector<int64_t> stride, std::vector<int64_t> padding,
    std::vector<int64_t> dilation, int64_t groups, int64_t offset_groups, bool deterministic, int64_t sms) {
  const aecr::DeformConvShape s = aecr::check_deform_conv(input, weight, offset, mask, std::nullopt, stride,
                                                          padding, dilation, groups, offset_groups);
  return aecr::implicit_backward(EmulatedLauncher{sms}, s, grad_output.contiguous(), input.contiguous(),
                                 weight.contiguous(), offset.contiguous(), contiguous(mask), groups, deterministic);
}

// (mean, cov) as the patch_statistics op, by the two-launch kernels (F <= 64).
std::tuple<at::Tensor, at::Tensor> moments(const at::Tensor& input, std::vector<int64_t> kernel_size,
                                           std::vector<int64_t> dilation, std::vector<int64_t> padding,
                                           int64_t sampling_stride, int64_t block, int64_t groups, double eps,
                                           int64_t sms) {
  const aecr::PatchShape s =
      aecr::make_patch_shape(input, kernel_size, dilation, padding, sampling_stride, block, groups);
  TORCH_CHECK(s.features <= aecr::kMomentMaxFeatures, "moments: at most ", aecr::kMomentMaxFeatures, " features");
  at::Tensor mean, cov;
  aecr::patch_moments(EmulatedLauncher{sms}, s, input.contiguous(), eps, mean, cov);
  return {mean, cov};
}

// The FastDeconv driver's Newton-Schulz with the fused CUDA kernels (F <= 48; the spectral form is not emulated).
struct EmulatedNewtonSchulz {
  static at::Tensor ns_fused_forward(const at::Tensor& a, const at::Tensor& norm, int64_t n_iter) {
    return aecr::ns_fused_forward_launch(EmulatedLauncher{}, a, norm, n_iter);
  }
  static at::Tensor ns_fused_backward(const at::Tensor& a, const at::Tensor& norm, const at::Tensor& grad,
                                      int64_t n_iter) {
    return aecr::ns_fused_backward_launch(EmulatedLauncher{}, a, norm, grad, n_iter);
  }
  static at::Tensor ns_spectral_values(const at::Tensor&, int64_t) { TORCH_CHECK(false, "not emulated"); }
  static at::Tensor ns_divided_differences(const at::Tensor&, int64_t) { TORCH_CHECK(false, "not emulated"); }
};

using NewtonSchulz = aecr::FastDeconvDriver<EmulatedNewtonSchulz>;

at::Tensor isqrt(const at::Tensor& a, int64_t n_iter) {
  TORCH_CHECK(a.dim() == 3 && a.size(1) <= aecr::kNsFusedMaxFeatures, "isqrt: [B, F, F] with F <= 48");
  return std::get<0>(NewtonSchulz::isqrt(a, n_iter));
}

at::Tensor isqrt_backward(const at::Tensor& grad, const at::Tensor& a, const at::Tensor& result, int64_t n_iter) {
  return NewtonSchulz::isqrt_backward(grad, a, result, at::empty({0}, a.options()), n_iter);
}

// fastdeconv_update_running with the CUDA kernel.
at::Tensor update_running(at::Tensor running_mean, at::Tensor running_deconv, const at::Tensor& mean,
                          const at::Tensor& deconv, double momentum) {
  aecr::check_running_update(running_mean, running_deconv, mean, deconv);
  return aecr::running_update_launch(EmulatedLauncher{}, running_mean, running_deconv, mean, deconv, momentum);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward);
  m.def("backward", &backward);
  m.def("moments", &moments);
  m.def("isqrt", &isqrt);
  m.def("isqrt_backward", &isqrt_backward);
  m.def("update_running", &update_running);
}
