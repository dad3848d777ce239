// Autocast kernels: under torch.autocast the op runs in the autocast dtype on CUDA (where fp16/bf16 kernels
// exist; offset and mask stay float32) and in float32 on the CPU. float64 inputs are left alone, as for conv2d.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace aecr {
namespace {

template <c10::DispatchKey key, c10::DeviceType device>
at::Tensor deform_conv2d_autocast(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
                                  const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& bias,
                                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                  int64_t groups, int64_t offset_groups) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  const at::ScalarType dtype = device == c10::DeviceType::CUDA ? at::autocast::get_autocast_dtype(at::kCUDA) : at::kFloat;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("aecr_ops::deform_conv2d", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                         at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, int64_t)>();
  // Features in the autocast dtype; the geometry (offset, mask) in float32, as torchvision keeps it: a bf16 offset
  // of 8 px is off by up to 0.03 px.
  return op.call(at::autocast::cached_cast(dtype, input, device), at::autocast::cached_cast(dtype, weight, device),
                 at::autocast::cached_cast(at::kFloat, offset, device),
                 at::autocast::cached_cast(at::kFloat, mask, device), at::autocast::cached_cast(dtype, bias, device),
                 stride, padding, dilation, groups, offset_groups);
}

// Statistics and matrix square roots stay in float32 (at least) under autocast.
template <c10::DispatchKey key, c10::DeviceType device>
std::tuple<at::Tensor, at::Tensor> patch_statistics_autocast(const at::Tensor& input, at::IntArrayRef kernel_size,
                                                             at::IntArrayRef dilation, at::IntArrayRef padding,
                                                             int64_t sampling_stride, int64_t block, int64_t groups,
                                                             double eps) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("aecr_ops::patch_statistics", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, at::IntArrayRef, at::IntArrayRef,
                                                                 at::IntArrayRef, int64_t, int64_t, int64_t, double)>();
  return op.call(at::autocast::cached_cast(at::kFloat, input, device), kernel_size, dilation, padding,
                 sampling_stride, block, groups, eps);
}

template <c10::DispatchKey key, c10::DeviceType device>
std::tuple<at::Tensor, at::Tensor> isqrt_newton_schulz_autocast(const at::Tensor& a, int64_t n_iter) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("aecr_ops::isqrt_newton_schulz", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t)>();
  return op.call(at::autocast::cached_cast(at::kFloat, a, device), n_iter);
}

}  // namespace

TORCH_LIBRARY_IMPL(aecr_ops, AutocastCUDA, m) {
  m.impl("deform_conv2d", &deform_conv2d_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>);
  m.impl("patch_statistics", &patch_statistics_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>);
  m.impl("isqrt_newton_schulz", &isqrt_newton_schulz_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>);
}

TORCH_LIBRARY_IMPL(aecr_ops, AutocastCPU, m) {
  m.impl("deform_conv2d", &deform_conv2d_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>);
  m.impl("patch_statistics", &patch_statistics_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>);
  m.impl("isqrt_newton_schulz", &isqrt_newton_schulz_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>);
}

}  // namespace aecr
