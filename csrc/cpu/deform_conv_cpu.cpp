// CPU kernels of deform_conv2d: deform_conv_driver.h's pixel tiles of channels-last rows. A tile's column rows
// are sampled by deform_conv_rows.h's loops (one copy per instruction set, chosen when the library loads) and
// multiplied by the packed weight while they are in cache: float32 by oneDNN's inner product on CPUs with AVX-512
// (MKL's sgemm, which at::mm calls, runs its AVX2 code on AMD's: 2.1x oneDNN's time on a Zen 5 EPYC), otherwise
// by at::mm (MKL / OpenBLAS).
//
// Each output element is written by exactly one thread in a fixed order, and the tiles and chunks depend on the
// shape only, so results are bitwise identical run to run and do not depend on the number of threads (the GEMMs
// aside: the GEMM library may split its sums differently with another thread count).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "aecr/deform_conv.h"
#include "deform_conv_args.h"
#include "deform_conv_driver.h"
#include "cpu/deform_conv_tiles.h"
#include "cpu/workspace.h"

// One copy of the tile loops per instruction set: 16-byte vectors everywhere, and on x86 AVX2 (32) and AVX-512
// (64) copies compiled for those units alone.
#define AECR_ROWS_NAMESPACE base
#define AECR_ROWS_TARGET
#define AECR_ROWS_BYTES 16
#include "cpu/deform_conv_rows.h"
#undef AECR_ROWS_NAMESPACE
#undef AECR_ROWS_TARGET
#undef AECR_ROWS_BYTES
#if defined(__GNUC__) && defined(__x86_64__)
#define AECR_X86_COPIES 1
#define AECR_ROWS_NAMESPACE avx2
#define AECR_ROWS_TARGET __attribute__((target("avx2,fma")))
#define AECR_ROWS_BYTES 32
#include "cpu/deform_conv_rows.h"
#undef AECR_ROWS_NAMESPACE
#undef AECR_ROWS_TARGET
#undef AECR_ROWS_BYTES
#define AECR_ROWS_NAMESPACE avx512
#define AECR_ROWS_TARGET __attribute__((target("avx512f,avx2,fma")))
#define AECR_ROWS_BYTES 64
#include "cpu/deform_conv_rows.h"
#undef AECR_ROWS_NAMESPACE
#undef AECR_ROWS_TARGET
#undef AECR_ROWS_BYTES
#endif

namespace aecr {
namespace {

constexpr int64_t kTileBytes = int64_t(1) << 20;  // a tile's column rows (plan_tiles): about a core's L2
constexpr int64_t kColumnBytes = int64_t(64) << 20;  // a backward chunk's buffers, whatever the image size

enum class Isa { base, avx2, avx512 };

// The widest copy this CPU runs; AECR_CPU_ISA=base|avx2|avx512 asks for a narrower one (tests run each).
Isa detect_isa() {
  Isa best = Isa::base;
#ifdef AECR_X86_COPIES
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::avx2;
  if (best == Isa::avx2 && __builtin_cpu_supports("avx512f")) best = Isa::avx512;
#endif
  const char* asked = std::getenv("AECR_CPU_ISA");
  if (asked == nullptr || *asked == 0) return best;
  const std::string name(asked);
  const Isa wanted = name == "avx512" ? Isa::avx512 : name == "avx2" ? Isa::avx2 : Isa::base;
  TORCH_CHECK(name == "base" || name == "avx2" || name == "avx512",
              "AECR_CPU_ISA must be base, avx2 or avx512, got '", name, "'");
  return std::min(best, wanted);
}

Isa isa() {
  static const Isa chosen = detect_isa();
  return chosen;
}

// Calls the copy of a tile loop for this CPU: AECR_ON_ISA(sample_tile<T>, args...).
#ifdef AECR_X86_COPIES
#define AECR_ON_ISA(fn, ...)                                              \
  do {                                                                    \
    switch (isa()) {                                                      \
      case Isa::avx512: cpu::avx512::fn(__VA_ARGS__); break;              \
      case Isa::avx2: cpu::avx2::fn(__VA_ARGS__); break;                  \
      default: cpu::base::fn(__VA_ARGS__);                                \
    }                                                                     \
  } while (0)
#else
#define AECR_ON_ISA(fn, ...) cpu::base::fn(__VA_ARGS__)
#endif

// oneDNN's inner product as torch registers it (mkldnn::_linear_pointwise, in torch builds with oneDNN), where
// deform_conv2d's float32 GEMMs go on a CPU with AVX-512; nullopt where they stay with at::mm. Read once: the
// choice depends on the machine (and AECR_CPU_ISA) only, so results stay the same from run to run.
const std::optional<c10::OperatorHandle>& onednn_linear() {
  static const std::optional<c10::OperatorHandle> op = []() -> std::optional<c10::OperatorHandle> {
    if (isa() != Isa::avx512) return std::nullopt;
    return c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  }();
  return op;
}

template <typename T>
struct ProblemOf {
  std::vector<T> zeros;
  cpu::RowsProblem<T> problem;

  ProblemOf(const DeformConvShape& s, const RowLayout& layout, const RowsInput& in)
      : zeros(static_cast<size_t>(s.channels), T(0)),
        problem{s, layout, in.features.data_ptr<T>(), in.offset.data_ptr<T>(), optional_data<T>(in.mask, 0),
                zeros.data()} {}
};

// The kernel class of deform_conv_driver.h's pixel tiles on the CPU.
struct CpuDeformConvKernels {
  int64_t tile_budget(const at::TensorOptions& options) const {
    return kTileBytes / static_cast<int64_t>(options.dtype().itemsize());
  }
  int64_t column_budget(const at::TensorOptions& options) const {
    return kColumnBytes / static_cast<int64_t>(options.dtype().itemsize());
  }
  at::Tensor workspace(int64_t numel, const at::TensorOptions& options) const {
    return column_workspaces().acquire(numel, options, kColumnBytes);
  }

  // Tiles are split among the threads in ranges (at::parallel_for), each thread with its own part of one
  // workspace. The body calls ATen ops (the GEMMs): the workers take the caller's thread-local state (below
  // autograd, grad mode, ...), which OpenMP's threads do not inherit.
  template <class Body>
  void for_each_tile(const TilePlan&, int64_t first, int64_t end, int64_t scratch_numel,
                     const at::TensorOptions& options, const Body& body) const {
    if (first >= end) return;
    const int64_t threads = std::min<int64_t>(at::get_num_threads(), end - first);
    const at::Tensor scratch = workspace(std::max<int64_t>(1, threads * scratch_numel), options);
    const at::ThreadLocalState caller;
    at::parallel_for(first, end, 1, [&](int64_t begin, int64_t stop) {
      const at::ThreadLocalStateGuard state(caller);
      const int64_t slot = std::min<int64_t>(at::get_thread_num(), threads - 1);
      const at::Tensor mine = scratch.narrow(0, slot * scratch_numel, scratch_numel);
      for (int64_t i = begin; i < stop; ++i) body(i, mine);
    });
  }

  // t [B, C, H, W] in `format`, as t.contiguous(format), by register transposes of L x L blocks in parallel
  // (ATen's strided copy from one format to the other ran at a few percent of a plain copy's speed).
  at::Tensor relaid(const at::Tensor& t, at::MemoryFormat format) const {
    if (t.is_contiguous(format)) return t;
    const bool to_rows = format == at::MemoryFormat::ChannelsLast;
    const bool from_other = to_rows ? t.is_contiguous() : t.is_contiguous(at::MemoryFormat::ChannelsLast);
    if (t.dim() != 4 || t.numel() == 0 || !from_other ||
        !(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble)) {
      return t.contiguous(format);
    }
    at::Tensor out = at::empty(t.sizes(), t.options().memory_format(format));
    const int64_t batch = t.size(0), C = t.size(1), P = t.size(2) * t.size(3);
    constexpr int64_t kBlock = 256;  // pixels per unit of work
    const int64_t blocks = (P + kBlock - 1) / kBlock;
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / (kBlock * C));
    AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "deform_conv2d_cpu", [&] {
      const scalar_t* src = t.data_ptr<scalar_t>();
      scalar_t* dst = out.data_ptr<scalar_t>();
      at::parallel_for(0, batch * blocks, grain, [&](int64_t begin, int64_t end) {
        for (int64_t u = begin; u < end; ++u) {
          const int64_t b = u / blocks, p0 = u % blocks * kBlock, n = std::min(kBlock, P - p0);
          const int64_t image = b * C * P;
          if (to_rows) {
            AECR_ON_ISA(transpose<scalar_t>, src + image + p0, P, dst + image + p0 * C, C, C, n);
          } else {
            AECR_ON_ISA(transpose<scalar_t>, src + image + p0 * C, C, dst + image + p0, P, n, C);
          }
        }
      });
    });
    return out;
  }

  // dst = a b^T, or dst += a b^T where `accumulate` (a [M, K], b [N, K], dst [M, N], any strides).
  void linear(at::Tensor& dst, const at::Tensor& a, const at::Tensor& b, bool accumulate) const {
    const auto& op = onednn_linear();
    if (!op.has_value() || a.scalar_type() != at::kFloat || !at::globalContext().userEnabledMkldnn()) {
      if (accumulate) {
        dst.addmm_(a, b.t());
      } else {
        at::mm_out(dst, a, b.t());
      }
      return;
    }
    std::vector<c10::IValue> stack{a.contiguous(), b.contiguous(), c10::IValue(), c10::IValue("none"),
                                   c10::IValue(c10::List<std::optional<at::Scalar>>()), c10::IValue()};
    op->callBoxed(&stack);
    if (accumulate) {
      dst.add_(stack[0].toTensor());
    } else {
      dst.copy_(stack[0].toTensor());
    }
  }

  // dst [n, m] = src [m, n]^T, both with rows of unit stride, by register transposes (in the calling thread).
  void transpose_into(const at::Tensor& src, at::Tensor dst) const {
    TORCH_INTERNAL_ASSERT(dst.size(0) == src.size(1) && dst.size(1) == src.size(0));
    if (src.numel() == 0) return;
    if (!(src.stride(1) == 1 || src.size(1) == 1) || !(dst.stride(1) == 1 || dst.size(1) == 1)) {
      dst.copy_(src.t());
      return;
    }
    AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "deform_conv2d_cpu", [&] {
      AECR_ON_ISA(transpose<scalar_t>, src.data_ptr<scalar_t>(), src.stride(0), dst.data_ptr<scalar_t>(),
                  dst.stride(0), src.size(0), src.size(1));
    });
  }

  void sample_rows(const DeformConvShape& s, const RowLayout& layout, const RowsInput& in, const PixelTile& tile,
                   const at::Tensor& columns) const {
    AT_DISPATCH_FLOATING_TYPES(in.features.scalar_type(), "deform_conv2d_cpu", [&] {
      const ProblemOf<scalar_t> p(s, layout, in);
      AECR_ON_ISA(sample_tile<scalar_t>, p.problem, tile, columns.data_ptr<scalar_t>());
    });
  }

  void add_bias(const at::Tensor& out, const at::Tensor& bias, bool rows) const {
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "deform_conv2d_cpu", [&] {
      scalar_t* o = out.data_ptr<scalar_t>();
      const scalar_t* b = bias.data_ptr<scalar_t>();
      const int64_t n = out.size(0), m = out.size(1), stride = out.stride(0);
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t j = 0; j < m; ++j) o[i * stride + j] += rows ? b[j] : b[i];
      }
    });
  }

  void sampling_grad_rows(const DeformConvShape& s, const RowLayout& layout, const RowsInput& in,
                          const PixelTile& tile, const at::Tensor& grad_columns,
                          const std::optional<at::Tensor>& columns, const std::optional<at::Tensor>& grad_offset,
                          const std::optional<at::Tensor>& grad_mask) const {
    AT_DISPATCH_FLOATING_TYPES(in.features.scalar_type(), "deform_conv2d_backward_cpu", [&] {
      const ProblemOf<scalar_t> p(s, layout, in);
      AECR_ON_ISA(sampling_grad_tile<scalar_t>, p.problem, tile, grad_columns.data_ptr<scalar_t>(),
                  mutable_data<scalar_t>(columns), mutable_data<scalar_t>(grad_offset),
                  mutable_data<scalar_t>(grad_mask));
    });
  }

  // Threads own disjoint blocks of (image, channels), so the scatter needs no atomics.
  void scatter_rows(const DeformConvShape& s, const RowLayout& layout, const RowsInput& in, const TilePlan& plan,
                    int64_t first, int64_t end, const at::Tensor& grad_columns, at::Tensor& grad_features) const {
    const int64_t b0 = plan.tile(first).b, images = plan.tile(end - 1).b - b0 + 1;
    const int64_t runs = static_cast<int64_t>(layout.runs.size());
    const int64_t wanted = at::get_num_threads();
    const int64_t per_run = std::max<int64_t>(1, (wanted + images * runs - 1) / (images * runs));
    AT_DISPATCH_FLOATING_TYPES(in.features.scalar_type(), "deform_conv2d_backward_cpu", [&] {
      const ProblemOf<scalar_t> p(s, layout, in);
      const scalar_t* g = grad_columns.data_ptr<scalar_t>();
      scalar_t* out = grad_features.data_ptr<scalar_t>();
      at::parallel_for(0, images * runs * per_run, 1, [&](int64_t begin, int64_t stop) {
        for (int64_t u = begin; u < stop; ++u) {
          const ChannelRun& run = layout.runs[(u / per_run) % runs];
          const int64_t b = b0 + u / (per_run * runs), part = u % per_run;
          const int64_t size = (run.count + per_run - 1) / per_run;
          const int64_t c_begin = run.channel + std::min(run.count, part * size);
          const int64_t c_end = run.channel + std::min(run.count, (part + 1) * size);
          if (c_begin < c_end) {
            AECR_ON_ISA(scatter_block<scalar_t>, p.problem, plan, first, end, b, run, c_begin, c_end, g, out);
          }
        }
      });
    });
  }
};


void check_cpu_dtype(const at::Tensor& input) {
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
              "deform_conv2d on the CPU supports float32 and float64, got `input` of dtype ", input.scalar_type(),
              " (float16 and bfloat16 run on CUDA)");
}

at::Tensor deform_conv2d_cpu(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
                             const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& bias,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                             int64_t offset_groups) {
  const DeformConvShape s =
      check_deform_conv(input, weight, offset, mask, bias, stride, padding, dilation, groups, offset_groups);
  check_cpu_dtype(input);
  return deform_conv2d_forward_rows(CpuDeformConvKernels{}, s, input, weight, offset, mask, bias, groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
    const std::optional<at::Tensor>& mask, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, int64_t offset_groups, const c10::List<bool>& output_mask) {
  const DeformConvShape s = check_deform_conv(input, weight, offset, mask, std::nullopt, stride, padding, dilation,
                                              groups, offset_groups);
  check_cpu_dtype(input);
  check_grad_output(grad_output, input, s, weight.size(0));
  return deform_conv2d_backward_rows(CpuDeformConvKernels{}, s, grad_output, input, weight, offset, mask, groups,
                                check_output_mask(output_mask, mask));
}

std::string deform_conv2d_path_cpu(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
                                   const std::optional<at::Tensor>& mask, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                   int64_t offset_groups) {
  check_deform_conv(input, weight, offset, mask, std::nullopt, stride, padding, dilation, groups, offset_groups);
  return "cpu";
}

}  // namespace

TORCH_LIBRARY_IMPL(aecr_ops, CPU, m) {
  m.impl("deform_conv2d", &deform_conv2d_cpu);
  m.impl("deform_conv2d_backward", &deform_conv2d_backward_cpu);
  m.impl("deform_conv2d_path", &deform_conv2d_path_cpu);
}

}  // namespace aecr
