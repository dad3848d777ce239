// The one definition site of every aecr_ops operator. Kernels register per device in cpu/ and cuda/;
// fake kernels and autograd are registered from Python (aecr_ops/_registrations.py).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import aecr_ops._C` loads this library, which runs the registrations below. The module itself is empty:
// every entry point goes through the dispatcher (torch.ops.aecr_ops.*).
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(aecr_ops, m) {
  // Modulated deformable convolution (DCNv2). offset: [B, 2*offset_groups*kh*kw, Ho, Wo] (dy, dx per tap);
  // mask: [B, offset_groups*kh*kw, Ho, Wo] or None (DCNv1).
  m.def(
      "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor? mask, Tensor? bias, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, int offset_groups) -> Tensor");
  // Gradients of deform_conv2d with respect to (input, weight, offset, mask, bias), those that `output_mask`
  // asks for (as in aten::convolution_backward): a gradient not asked for, and the mask gradient without a mask,
  // is an empty tensor [0], and its work is skipped.
  m.def(
      "deform_conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor offset, Tensor? mask, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, int offset_groups, "
      "bool[] output_mask=[True, True, True, True, True]) -> "
      "(Tensor grad_input, Tensor grad_weight, Tensor grad_offset, Tensor grad_mask, Tensor grad_bias)");
  // Which implementation deform_conv2d runs for these arguments now: "cpu", or on CUDA "simple" or "implicit"
  // (AECR_DCN_CUDA_PATH, dtype, TF32 setting and GPU decide). For benchmarks and tests.
  m.def(
      "deform_conv2d_path(Tensor input, Tensor weight, Tensor offset, Tensor? mask, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, int offset_groups) -> str");
  // The CPU column workspaces kept between calls (at most one buffer per dtype, each within the budget of
  // cpu/deform_conv_cpu.cpp): their bytes, and freeing them (returns the bytes freed).
  m.def("workspace_bytes() -> int");
  m.def("release_workspaces() -> int");

  // FastDeconv: mean [groups, F] and covariance + eps*I [groups, F, F] of the input's k x k patches taken every
  // `sampling_stride` pixels (F = kh*kw*block; see csrc/include/aecr/patch_stats.h for the column grouping).
  m.def(
      "patch_statistics(Tensor input, int[2] kernel_size, int[2] dilation, int[2] padding, int sampling_stride, "
      "int block, int groups, float eps) -> (Tensor mean, Tensor cov)");
  m.def(
      "patch_statistics_backward(Tensor grad_mean, Tensor grad_cov, Tensor input, Tensor mean, int[2] kernel_size, "
      "int[2] dilation, int[2] padding, int sampling_stride, int block, int groups) -> Tensor");
  // Coupled Newton-Schulz inverse square root of a batch of matrices a [B, F, F], n_iter iterations. `saved`
  // is what the backward needs besides a and result ([B, F+1, F] for F > 48: the eigenbasis; else empty).
  m.def("isqrt_newton_schulz(Tensor a, int n_iter) -> (Tensor result, Tensor saved)");
  m.def("isqrt_newton_schulz_backward(Tensor grad, Tensor a, Tensor result, Tensor saved, int n_iter) -> Tensor");
  // FastDeconv's running update, in place: running = (1 - momentum) running + momentum stat for both buffers,
  // unless a value of `mean` or `deconv` is not finite (then neither changes). Returns whether they were all
  // finite, as a 0-dim bool tensor on their device (no synchronisation).
  m.def(
      "fastdeconv_update_running(Tensor(a!) running_mean, Tensor(b!) running_deconv, Tensor mean, Tensor deconv, "
      "float momentum) -> Tensor");
}
