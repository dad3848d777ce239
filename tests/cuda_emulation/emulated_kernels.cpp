// Every CUDA kernel of the project, with its real driver, built for the CPU emulator (cuda_emulation.h) as a
// Python module for the emulated tests: deform_conv2d's simple path (deform_conv_driver.h over
// cuda/deform_conv_kernels.cuh, atomic and deterministic input gradients) and implicit-GEMM path, FastDeconv's
// ops (fastdeconv_driver.h over cuda/fastdeconv_kernels.cuh: two-launch and tiled statistics and their
// backward, fused and spectral Newton-Schulz) and the running update. The tensors are CPU tensors.
#define AECR_CUDA_EMULATION 1
#include "cuda_emulation.h"

#include <torch/extension.h>

#include <map>
#include <string>
#include <tuple>

#include "cuda/deform_conv_implicit_driver.h"
#include "cuda/deform_conv_kernels.cuh"
#include "cuda/fastdeconv_kernels.cuh"
#include "cuda/running_update_kernel.cuh"
#include "deform_conv_driver.h"
#include "fastdeconv_driver.h"

namespace {

using aecr_emulation::poisoned;  // every driver runs with its allocations poisoned and tracked (workspaces.h)
using SimplePath = aecr::GpuDeformConvKernels<EmulatedLauncher>;
using FastDeconv = aecr::FastDeconvDriver<aecr::GpuFastDeconvKernels<EmulatedLauncher>>;

// deform_conv2d as the CUDA op computes it: `path` "simple" or "implicit", with a column budget of
// `column_budget` elements a chunk (chunks of images, or of the pixels of one image below one image's columns;
// the implicit path has columns only in its deterministic backward). The backward computes the gradients
// `output_mask` asks for (input, weight, offset, mask, bias).
at::Tensor dcn_forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
                       const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& bias,
                       std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation,
                       int64_t groups, int64_t offset_groups, const std::string& path, int64_t column_budget) {
  const aecr::DeformConvShape s =
      aecr::check_deform_conv(input, weight, offset, mask, bias, stride, padding, dilation, groups, offset_groups);
  if (path == "implicit") return aecr::implicit_forward(EmulatedLauncher{}, s, input, weight, offset, mask, bias, groups);
  TORCH_CHECK(path == "simple", "path must be \"simple\" or \"implicit\"");
  return aecr::deform_conv2d_forward(SimplePath{EmulatedLauncher{}, false, column_budget}, s, input, weight, offset,
                                     mask, bias, groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dcn_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
    const std::optional<at::Tensor>& mask, std::vector<int64_t> stride, std::vector<int64_t> padding,
    std::vector<int64_t> dilation, int64_t groups, int64_t offset_groups, const std::string& path, bool deterministic,
    int64_t column_budget, const std::vector<bool>& output_mask) {
  const aecr::DeformConvShape s = aecr::check_deform_conv(input, weight, offset, mask, std::nullopt, stride, padding,
                                                          dilation, groups, offset_groups);
  aecr::check_grad_output(grad_output, input, s, weight.size(0));
  c10::List<bool> asked;
  for (const bool b : output_mask) asked.push_back(b);
  const aecr::DeformConvGrads needed = aecr::check_output_mask(asked, mask);
  if (path == "implicit") {
    return aecr::implicit_backward(EmulatedLauncher{}, s, grad_output, input, weight, offset, mask, groups,
                                   deterministic, needed, column_budget);
  }
  TORCH_CHECK(path == "simple", "path must be \"simple\" or \"implicit\"");
  return aecr::deform_conv2d_backward(SimplePath{EmulatedLauncher{}, deterministic, column_budget}, s, grad_output,
                                      input, weight, offset, mask, groups, needed);
}

// The implicit path's workspace bound (implicit_workspace_bytes) for these arguments, on the emulated SM count.
int64_t implicit_workspace(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
                           const std::optional<at::Tensor>& mask, std::vector<int64_t> stride,
                           std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups,
                           int64_t offset_groups) {
  const aecr::DeformConvShape s = aecr::check_deform_conv(input, weight, offset, mask, std::nullopt, stride, padding,
                                                          dilation, groups, offset_groups);
  return aecr::implicit_workspace_bytes(s, aecr::geometry_of(s, input, weight, groups), input.size(0),
                                        static_cast<int64_t>(input.element_size()), weight.numel(),
                                        aecr_emulation::multiprocessors());
}

std::tuple<at::Tensor, at::Tensor> patch_statistics(const at::Tensor& input, std::vector<int64_t> kernel_size,
                                                    std::vector<int64_t> dilation, std::vector<int64_t> padding,
                                                    int64_t sampling_stride, int64_t block, int64_t groups, double eps,
                                                    int64_t tile_budget) {
  return FastDeconv::statistics(input, kernel_size, dilation, padding, sampling_stride, block, groups, eps,
                                tile_budget);
}

at::Tensor patch_statistics_backward(const at::Tensor& grad_mean, const at::Tensor& grad_cov, const at::Tensor& input,
                                     const at::Tensor& mean, std::vector<int64_t> kernel_size,
                                     std::vector<int64_t> dilation, std::vector<int64_t> padding,
                                     int64_t sampling_stride, int64_t block, int64_t groups, int64_t tile_budget) {
  return FastDeconv::statistics_backward(grad_mean, grad_cov, input, mean, kernel_size, dilation, padding,
                                         sampling_stride, block, groups, tile_budget);
}

std::tuple<at::Tensor, at::Tensor> isqrt(const at::Tensor& a, int64_t n_iter) { return FastDeconv::isqrt(a, n_iter); }

at::Tensor isqrt_backward(const at::Tensor& grad, const at::Tensor& a, const at::Tensor& result,
                          const at::Tensor& saved, int64_t n_iter) {
  return FastDeconv::isqrt_backward(grad, a, result, saved, n_iter);
}

at::Tensor update_running(at::Tensor running_mean, at::Tensor running_deconv, const at::Tensor& mean,
                          const at::Tensor& deconv, double momentum) {
  aecr::check_running_update(running_mean, running_deconv, mean, deconv);
  return aecr::running_update_launch(EmulatedLauncher{}, running_mean, running_deconv, mean, deconv, momentum);
}

// name -> (registers, max_threads, shared bytes), as read from benchmarks/cuda_resources.json.
void set_resources(const std::map<std::string, std::tuple<int64_t, int64_t, int64_t>>& table, bool strict) {
  std::map<std::string, aecr_emulation::KernelResources> resources;
  for (const auto& [name, r] : table) {
    resources[name] = aecr_emulation::KernelResources{static_cast<int>(std::get<0>(r)),
                                                      static_cast<int>(std::get<1>(r)), std::get<2>(r)};
  }
  aecr_emulation::set_resources(std::move(resources), strict);
}

}  // namespace

void register_broken_kernels(pybind11::module_& m);    // broken_kernels.cpp
void register_textbook_kernels(pybind11::module_& m);  // textbook_kernels.cpp

namespace {

pybind11::list counted_launches() {
  pybind11::list out;
  for (const aecr_emulation::LaunchTraffic& t : aecr_emulation::counted_launches()) {
    pybind11::dict d;
    d["kernel"] = t.kernel;
    d["blocks"] = t.blocks;
    d["blocks_counted"] = t.blocks_counted;
    d["threads"] = t.threads;
    d["wave_blocks"] = t.wave_blocks;
    d["load_requests"] = t.load_requests;
    d["load_sectors"] = t.load_sectors;
    d["store_requests"] = t.store_requests;
    d["store_sectors"] = t.store_sectors;
    d["atomic_requests"] = t.atomic_requests;
    d["atomic_sectors"] = t.atomic_sectors;
    d["atomics"] = t.atomics;
    d["shared_requests"] = t.shared_requests;
    d["shared_wavefronts"] = t.shared_wavefronts;
    d["distinct_sectors"] = t.distinct_sectors;
    d["dram_sectors"] = t.dram_sectors;
    d["mma_flops"] = t.mma_flops;
    d["fp32_flops"] = t.fp32_flops;
    d["fp64_flops"] = t.fp64_flops;
    out.append(d);
  }
  return out;
}

// cuBLAS's GEMM of fp16 / bf16 operands with an fp32 output (aten::mm.dtype_out, CUDA only in ATen), for the
// drivers' CPU tensors: fp32 products summed in fp32 and never rounded to the operands' dtype. Plain loops, so
// that it allocates nothing the real GEMM does not (the emulated allocation tests count every allocation); the
// emulated problems are small, and the time model skips the GEMMs (benchmarks/cuda_model.py GemmLog).
at::Tensor& mm_float_out(const at::Tensor& a, const at::Tensor& b, at::ScalarType out_dtype, at::Tensor& out) {
  TORCH_CHECK(out_dtype == at::kFloat && out.scalar_type() == at::kFloat, "mm.dtype_out stand-in: fp32 output only");
  TORCH_CHECK(a.scalar_type() == b.scalar_type() && a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0) &&
                  out.size(0) == a.size(0) && out.size(1) == b.size(1),
              "mm.dtype_out stand-in: mismatched operands");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "mm_float_out", [&] {
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    float* po = out.data_ptr<float>();
    for (int64_t i = 0; i < a.size(0); ++i) {
      for (int64_t j = 0; j < b.size(1); ++j) {
        float sum = 0.f;
        for (int64_t k = 0; k < a.size(1); ++k) {
          sum += static_cast<float>(pa[i * a.stride(0) + k * a.stride(1)]) *
                 static_cast<float>(pb[k * b.stride(0) + j * b.stride(1)]);
        }
        po[i * out.stride(0) + j * out.stride(1)] = sum;
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(aten, CPU, m) { m.impl("mm.dtype_out", &mm_float_out); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dcn_forward", poisoned(&dcn_forward));
  m.def("dcn_backward", poisoned(&dcn_backward));
  m.def("implicit_workspace", &implicit_workspace);
  m.def("implicit_workspace_budget", [] { return aecr::kImplicitWorkspaceBudget; });
  m.def("patch_statistics", poisoned(&patch_statistics));
  m.def("patch_statistics_backward", poisoned(&patch_statistics_backward));
  m.def("isqrt", poisoned(&isqrt));
  m.def("isqrt_backward", poisoned(&isqrt_backward));
  m.def("update_running", poisoned(&update_running));
  m.def("set_resources", &set_resources, "kernel name -> (registers, max threads, shared bytes); strict: unknown "
                                         "kernels may not launch");
  m.def("set_multiprocessors", &aecr_emulation::set_multiprocessors);
  m.def("set_schedule_seed", &aecr_emulation::set_schedule_seed, "0: blocks and threads in index order; else an "
                                                                 "order drawn from the seed");
  m.def("launched", [] { return aecr_emulation::launched(); }, "kernel name -> launches so far");
  m.def("launched_blocks", [] { return aecr_emulation::launched_blocks(); }, "kernel name -> blocks launched so far");
  m.def("start_counting", [](int64_t sample_blocks, int64_t multiprocessors, std::vector<int64_t> l2_bytes) {
    aecr_emulation::TrafficOptions o;
    o.sample_blocks = sample_blocks;
    o.multiprocessors = multiprocessors;
    o.l2_bytes = std::move(l2_bytes);
    aecr_emulation::start_counting(o);
  }, "count every launch's traffic (traffic.h), at most sample_blocks blocks a launch (0: all), with a DRAM "
     "figure for each L2 size; the checks are off meanwhile");
  m.def("stop_counting", &aecr_emulation::stop_counting);
  m.def("counted_launches", &counted_launches, "the launches counted since start_counting, as dicts");
  register_broken_kernels(m);
  register_textbook_kernels(m);
}
