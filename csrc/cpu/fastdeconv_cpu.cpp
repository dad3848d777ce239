// CPU kernels of FastDeconv's ops (patch statistics, Newton-Schulz); the algorithm is in fastdeconv_driver.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "aecr/newton_schulz.h"
#include "aecr/patch_stats.h"
#include "fastdeconv_driver.h"

namespace aecr {
namespace {

constexpr int64_t kTileBudget = int64_t(1) << 20;  // patch entries per tile (4 MB in float32)

struct NoSync {
  void operator()() const {}
};

// Per-call tables, so that the inner loops do no integer division: where each column of a patch row lands in
// a tile row and which (matrix, feature) it belongs to, and each tap's offset from the patch origin.
struct PatchTables {
  std::vector<int64_t> offset, feature, dy, dx;
  bool identity;  // offset[col] == feature[col] == col (a single matrix with a single block)
  PatchTables(const PatchShape& s, int64_t rows)
      : offset(s.columns()), feature(s.columns()), dy(s.taps()), dx(s.taps()),
        identity(s.groups == 1 && s.interleave == 1) {
    for (int64_t col = 0; col < s.columns(); ++col) {
      int64_t g, f, j;
      column_slot(s, col, g, f, j);
      offset[col] = column_tile_offset(s, rows, col);
      feature[col] = g * s.features + f;
    }
    for (int64_t tap = 0; tap < s.taps(); ++tap) {
      dy[tap] = tap_dy(s, tap);
      dx[tap] = tap_dx(s, tap);
    }
  }
};

// Calls body(r, n, y0, x0) for the patch rows of image n, in order.
template <class Body>
void for_each_patch_of_image(const PatchShape& s, int64_t n, const Body& body) {
  if (s.pixel_mode) {
    for (int64_t r = s.first_row(n); r < s.first_row(n + 1); ++r) {
      int64_t nn, y0, x0;
      patch_origin(s, r, nn, y0, x0);
      body(r, n, y0, x0);
    }
    return;
  }
  int64_t r = s.first_row(n);
  for (int64_t py = 0; py < s.patches_h; ++py) {
    for (int64_t px = 0; px < s.patches_w; ++px, ++r) body(r, n, py * s.stride - s.pad_h, px * s.stride - s.pad_w);
  }
}

// Calls body(r, n, y0, x0) for the patch rows of images n0..n1-1, in parallel (each call is independent).
template <class Body>
void for_each_patch(const PatchShape& s, int64_t n0, int64_t n1, const Body& body) {
  if (s.pixel_mode) {
    at::parallel_for(s.first_row(n0), s.first_row(n1), 256, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        int64_t n, y0, x0;
        patch_origin(s, r, n, y0, x0);
        body(r, n, y0, x0);
      }
    });
    return;
  }
  at::parallel_for(n0 * s.patches_h, n1 * s.patches_h, 1, [&](int64_t begin, int64_t end) {
    for (int64_t np = begin; np < end; ++np) {
      const int64_t n = np / s.patches_h, py = np % s.patches_h;
      int64_t r = np * s.patches_w;
      for (int64_t px = 0; px < s.patches_w; ++px, ++r) {
        body(r, n, py * s.stride - s.pad_h, px * s.stride - s.pad_w);
      }
    }
  });
}

struct CpuKernels {
  static constexpr bool kSpectralForm = true;  // above kNsFusedMaxFeatures: one eigh instead of 3 n_iter GEMMs
  // The tiled path is the CPU's: its per-tile products are one MKL GEMM each.
  static bool moments(const PatchShape&, const at::Tensor&, double, at::Tensor&, at::Tensor&) { return false; }

  // For each (patch, tap) the position is computed once for all channels.
  static void build_tile(const PatchShape& s, int64_t n0, int64_t n1, const at::Tensor& input,
                         const at::Tensor& shift, at::Tensor& tile) {
    const int64_t r0 = s.first_row(n0), rows = s.first_row(n1) - r0;
    const PatchTables tables(s, rows);
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "build_tile", [&] {
      const scalar_t* in = input.data_ptr<scalar_t>();
      const scalar_t* sh = shift.defined() ? shift.data_ptr<scalar_t>() : nullptr;
      scalar_t* out = tile.data_ptr<scalar_t>();
      const int64_t* offset = tables.offset.data();
      const int64_t* feature = tables.feature.data();
      for_each_patch(s, n0, n1, [&](int64_t r, int64_t n, int64_t y0, int64_t x0) {
        scalar_t* row = out + (r - r0) * s.interleave * s.features;
        const scalar_t* image = in + n * s.channels * s.plane();
        int64_t source[kMaxPatchTaps];  // offset of each tap in a plane, -1 in the padding
        for (int64_t tap = 0; tap < s.taps(); ++tap) {
          const int64_t y = y0 + tables.dy[tap], x = x0 + tables.dx[tap];
          source[tap] = (y >= 0 && y < s.height && x >= 0 && x < s.width) ? y * s.width + x : -1;
        }
        if (tables.identity) {  // one block: column col is tile column col, shift index col
          for (int64_t c = 0, col = 0; c < s.channels; ++c) {
            const scalar_t* plane = image + c * s.plane();
            for (int64_t tap = 0; tap < s.taps(); ++tap, ++col) {
              const scalar_t v = source[tap] >= 0 ? plane[source[tap]] : scalar_t(0);
              row[col] = sh == nullptr ? v : v - sh[col];
            }
          }
          return;
        }
        for (int64_t c = 0, col = 0; c < s.channels; ++c) {
          const scalar_t* plane = image + c * s.plane();
          for (int64_t tap = 0; tap < s.taps(); ++tap, ++col) {
            const scalar_t v = source[tap] >= 0 ? plane[source[tap]] : scalar_t(0);
            row[offset[col]] = sh == nullptr ? v : v - sh[feature[col]];
          }
        }
      });
    });
  }

  // Each thread owns whole (image, channel) planes, so the sums need no atomics and run in a fixed order.
  static void gather_input_grad(const PatchShape& s, int64_t n0, int64_t n1, int64_t r0, int64_t rows,
                                const at::Tensor& grad_tile, at::Tensor& grad_input) {
    const PatchTables tables(s, rows);
    AT_DISPATCH_FLOATING_TYPES(grad_input.scalar_type(), "gather_input_grad", [&] {
      const scalar_t* gt = grad_tile.data_ptr<scalar_t>();
      scalar_t* gi = grad_input.data_ptr<scalar_t>();
      const int64_t* offset = tables.offset.data();
      at::parallel_for(n0 * s.channels, n1 * s.channels, 1, [&](int64_t begin, int64_t end) {
        for (int64_t nc = begin; nc < end; ++nc) {
          const int64_t n = nc / s.channels, c = nc % s.channels;
          scalar_t* plane = gi + nc * s.plane();
          const int64_t* col_offset = offset + c * s.taps();
          for_each_patch_of_image(s, n, [&](int64_t r, int64_t, int64_t y0, int64_t x0) {
            const scalar_t* row = gt + (r - r0) * s.interleave * s.features;
            for (int64_t tap = 0; tap < s.taps(); ++tap) {
              const int64_t y = y0 + tables.dy[tap], x = x0 + tables.dx[tap];
              if (y >= 0 && y < s.height && x >= 0 && x < s.width) plane[y * s.width + x] += row[col_offset[tap]];
            }
          });
        }
      });
    });
  }

  static at::Tensor ns_fused_forward(const at::Tensor& a, const at::Tensor& norm, int64_t n_iter) {
    at::Tensor out = at::empty_like(a);
    const int64_t f = a.size(1);
    AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "ns_fused_forward", [&] {
      const scalar_t* pa = a.data_ptr<scalar_t>();
      const scalar_t* pn = norm.data_ptr<scalar_t>();
      scalar_t* po = out.data_ptr<scalar_t>();
      at::parallel_for(0, a.size(0), 1, [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> work(kNsWorkMatrices * f * f);
        for (int64_t b = begin; b < end; ++b) {
          ns_forward_program<scalar_t>(pa + b * f * f, pn[b], po + b * f * f, work.data(), f, n_iter, 0, 1, NoSync{});
        }
      });
    });
    return out;
  }

  static at::Tensor ns_fused_backward(const at::Tensor& a, const at::Tensor& norm, const at::Tensor& grad,
                                      int64_t n_iter) {
    at::Tensor out = at::empty_like(a);
    const int64_t f = a.size(1);
    AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "ns_fused_backward", [&] {
      const scalar_t* pa = a.data_ptr<scalar_t>();
      const scalar_t* pn = norm.data_ptr<scalar_t>();
      const scalar_t* pg = grad.data_ptr<scalar_t>();
      scalar_t* po = out.data_ptr<scalar_t>();
      at::parallel_for(0, a.size(0), 1, [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> work(kNsWorkMatrices * f * f);
        for (int64_t b = begin; b < end; ++b) {
          ns_backward_program<scalar_t>(pa + b * f * f, pn[b], pg + b * f * f, po + b * f * f, work.data(), f, n_iter,
                                        0, 1, NoSync{});
        }
      });
    });
    return out;
  }

  static at::Tensor ns_spectral_values(const at::Tensor& lambda, int64_t n_iter) {
    at::Tensor out = at::empty_like(lambda);
    AT_DISPATCH_FLOATING_TYPES(lambda.scalar_type(), "ns_spectral_values", [&] {
      const scalar_t* l = lambda.data_ptr<scalar_t>();
      scalar_t* o = out.data_ptr<scalar_t>();
      for (int64_t i = 0; i < lambda.numel(); ++i) o[i] = scalar_iteration<scalar_t>(l[i], n_iter);
    });
    return out;
  }

  // The iterates of every eigenvalue are computed once; each row i then runs the recurrence of the divided
  // differences against all j at once (a loop the compiler vectorises).
  static at::Tensor ns_divided_differences(const at::Tensor& lambda_, int64_t n_iter) {
    const at::Tensor lambda = lambda_.contiguous();
    const int64_t batch = lambda.size(0), f = lambda.size(1);
    at::Tensor out = at::empty({batch, f, f}, lambda.options());
    AT_DISPATCH_FLOATING_TYPES(lambda.scalar_type(), "ns_divided_differences", [&] {
      const scalar_t* l = lambda.data_ptr<scalar_t>();
      scalar_t* o = out.data_ptr<scalar_t>();
      for (int64_t b = 0; b < batch; ++b) {
        // y, z, t of every eigenvalue before each step: [n_iter][f] each.
        std::vector<scalar_t> ys(n_iter * f), zs(n_iter * f), ts(n_iter * f);
        for (int64_t j = 0; j < f; ++j) {
          scalar_t y = l[b * f + j], z = 1;
          for (int64_t k = 0; k < n_iter; ++k) {
            const scalar_t t = scalar_t(1.5) - scalar_t(0.5) * z * y;
            ys[k * f + j] = y;
            zs[k * f + j] = z;
            ts[k * f + j] = t;
            y = y * t;
            z = t * z;
          }
        }
        at::parallel_for(0, f, 8, [&](int64_t begin, int64_t end) {
          std::vector<scalar_t> dy(f), dz(f);
          for (int64_t i = begin; i < end; ++i) {
            std::fill(dy.begin(), dy.end(), scalar_t(1));
            std::fill(dz.begin(), dz.end(), scalar_t(0));
            for (int64_t k = 0; k < n_iter; ++k) {
              const scalar_t ya = ys[k * f + i], za = zs[k * f + i], ta = ts[k * f + i];
              const scalar_t* yb = ys.data() + k * f;
              const scalar_t* zb = zs.data() + k * f;
              const scalar_t* tb = ts.data() + k * f;
              for (int64_t j = 0; j < f; ++j) divided_difference_step(ya, za, ta, yb[j], zb[j], tb[j], dy[j], dz[j]);
            }
            std::copy(dz.begin(), dz.end(), o + (b * f + i) * f);
          }
        });
      }
    });
    return out;
  }
};

using Driver = FastDeconvDriver<CpuKernels>;

std::tuple<at::Tensor, at::Tensor> patch_statistics_cpu(const at::Tensor& input, at::IntArrayRef kernel_size,
                                                        at::IntArrayRef dilation, at::IntArrayRef padding,
                                                        int64_t sampling_stride, int64_t block, int64_t groups,
                                                        double eps) {
  return Driver::statistics(input, kernel_size, dilation, padding, sampling_stride, block, groups, eps, kTileBudget);
}

at::Tensor patch_statistics_backward_cpu(const at::Tensor& grad_mean, const at::Tensor& grad_cov,
                                         const at::Tensor& input, const at::Tensor& mean, at::IntArrayRef kernel_size,
                                         at::IntArrayRef dilation, at::IntArrayRef padding, int64_t sampling_stride,
                                         int64_t block, int64_t groups) {
  return Driver::statistics_backward(grad_mean, grad_cov, input, mean, kernel_size, dilation, padding,
                                     sampling_stride, block, groups, kTileBudget);
}

at::Tensor fastdeconv_update_running_cpu(at::Tensor& running_mean, at::Tensor& running_deconv, const at::Tensor& mean,
                                         const at::Tensor& deconv, double momentum) {
  check_running_update(running_mean, running_deconv, mean, deconv);
  const at::Tensor stats[] = {mean.contiguous(), deconv.contiguous()};
  at::Tensor* buffers[] = {&running_mean, &running_deconv};
  bool finite = true;
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "fastdeconv_update_running_cpu", [&] {
    for (const at::Tensor& stat : stats) {
      const scalar_t* p = stat.data_ptr<scalar_t>();
      for (int64_t i = 0; i < stat.numel(); ++i) finite = finite && finite_value(p[i]);
    }
    if (!finite) return;
    for (int b = 0; b < 2; ++b) {
      scalar_t* r = buffers[b]->data_ptr<scalar_t>();
      const scalar_t* p = stats[b].data_ptr<scalar_t>();
      const scalar_t keep = static_cast<scalar_t>(1.0 - momentum), m = static_cast<scalar_t>(momentum);
      for (int64_t i = 0; i < stats[b].numel(); ++i) r[i] = running_update(r[i], p[i], keep, m);
    }
  });
  return at::scalar_tensor(finite, mean.options().dtype(at::kBool));
}

}  // namespace

TORCH_LIBRARY_IMPL(aecr_ops, CPU, m) {
  m.impl("patch_statistics", &patch_statistics_cpu);
  m.impl("patch_statistics_backward", &patch_statistics_backward_cpu);
  m.impl("isqrt_newton_schulz", &Driver::isqrt);
  m.impl("isqrt_newton_schulz_backward", &Driver::isqrt_backward);
  m.impl("fastdeconv_update_running", &fastdeconv_update_running_cpu);
}

}  // namespace aecr
