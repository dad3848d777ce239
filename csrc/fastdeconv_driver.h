// FastDeconv's two ops, written once for both devices: the algorithm (tiles, GEMMs, reductions, the choice
// between the matrix and spectral Newton-Schulz forms) in ATen, the per-element work in a `Kernels` class that
// cpu/fastdeconv_cpu.cpp and cuda/fastdeconv_cuda.cu provide:
//
//   static bool moments(const PatchShape&, const at::Tensor& input, double eps, at::Tensor& mean,
//                       at::Tensor& cov);   // the whole statistics in a few launches, or false (not offered)
//   static void build_tile(const PatchShape&, int64_t n0, int64_t n1, const at::Tensor& input,
//                          const at::Tensor& shift, at::Tensor& tile);      // patches of images n0..n1-1 (- shift)
//   static void gather_input_grad(const PatchShape&, int64_t n0, int64_t n1, int64_t r0, int64_t rows,
//                                 const at::Tensor& grad_tile, at::Tensor& grad_input);  // images n0..n1-1
//   static at::Tensor ns_fused_forward(const at::Tensor& a, const at::Tensor& norm, int64_t n_iter);
//   static at::Tensor ns_fused_backward(const at::Tensor& a, const at::Tensor& norm, const at::Tensor& grad,
//                                       int64_t n_iter);                  // gradient w.r.t. Y0 = A/||A||
//   static constexpr bool kSpectralForm;   // above kNsFusedMaxFeatures: the spectral form (and then the two
//                                          // below) or the iteration as batched GEMMs (no host sync: CUDA)
//   static at::Tensor ns_spectral_values(const at::Tensor& lambda, int64_t n_iter);          // z_n(lambda)
//   static at::Tensor ns_divided_differences(const at::Tensor& lambda, int64_t n_iter);      // [B, F, F]
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "aecr/newton_schulz.h"
#include "aecr/patch_stats.h"
#include "aecr/running_update.h"

namespace aecr {

inline void check_float_or_double(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": `", name,
              "` must be float32 or float64, got ", t.scalar_type());
}

inline PatchShape make_patch_shape(const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef dilation,
                                   at::IntArrayRef padding, int64_t sampling_stride, int64_t block, int64_t groups) {
  const char* op = "patch_statistics";
  TORCH_CHECK(input.dim() == 4, op, ": `input` must be 4-D [N, C, H, W], got shape ", input.sizes());
  check_float_or_double(input, op, "input");
  TORCH_CHECK(kernel_size.size() == 2 && kernel_size[0] >= 1 && kernel_size[1] >= 1 &&
                  kernel_size[0] * kernel_size[1] <= kMaxPatchTaps,
              op, ": `kernel_size` must be 2 values >= 1 with at most ", kMaxPatchTaps, " taps, got ", kernel_size);
  TORCH_CHECK(dilation.size() == 2 && dilation[0] >= 1 && dilation[1] >= 1, op,
              ": `dilation` must be 2 values >= 1, got ", dilation);
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0, op,
              ": `padding` must be 2 values >= 0, got ", padding);
  TORCH_CHECK(sampling_stride >= 1, op, ": `sampling_stride` must be >= 1, got ", sampling_stride);
  const int64_t channels = input.size(1);
  TORCH_CHECK(groups >= 1 && channels % groups == 0, op, ": `groups`=", groups, " must divide the ", channels,
              " input channels");
  PatchShape s;
  s.batch = input.size(0);
  s.channels = channels;
  s.height = input.size(2);
  s.width = input.size(3);
  s.kernel_h = kernel_size[0];
  s.kernel_w = kernel_size[1];
  s.dilation_h = dilation[0];
  s.dilation_w = dilation[1];
  s.pad_h = padding[0];
  s.pad_w = padding[1];
  s.stride = sampling_stride;
  s.pixel_mode = s.kernel_h == 1 && s.kernel_w == 1;
  s.groups = groups;
  if (groups == 1) {
    TORCH_CHECK(block >= 1 && channels % block == 0, op, ": `block`=", block, " must divide the ", channels,
                " input channels");
    s.interleave = channels / block;
  } else {
    TORCH_CHECK(block == channels / groups, op, ": with groups > 1, `block` must be channels / groups = ",
                channels / groups, ", got ", block);
    s.interleave = 1;
  }
  s.features = s.taps() * block;
  s.patches_h = s.patches_w = 1;
  if (!s.pixel_mode) {
    s.patches_h = (s.height + 2 * s.pad_h - s.dilation_h * (s.kernel_h - 1) - 1) / s.stride + 1;
    s.patches_w = (s.width + 2 * s.pad_w - s.dilation_w * (s.kernel_w - 1) - 1) / s.stride + 1;
    TORCH_CHECK(s.height + 2 * s.pad_h >= s.dilation_h * (s.kernel_h - 1) + 1 &&
                    s.width + 2 * s.pad_w >= s.dilation_w * (s.kernel_w - 1) + 1,
                op, ": the ", s.kernel_h, "x", s.kernel_w, " kernel (dilation ", dilation, ", padding ", padding,
                ") does not fit in the ", s.height, "x", s.width, " input");
  }
  TORCH_CHECK(s.rows() > 0, op, ": `input` has no patches (shape ", input.sizes(), ")");
  return s;
}

// Arguments of fastdeconv_update_running: buffers and statistics of one shape, dtype (float32 or float64) and
// device; the buffers contiguous (they are updated in place).
inline void check_running_update(const at::Tensor& running_mean, const at::Tensor& running_deconv,
                                 const at::Tensor& mean, const at::Tensor& deconv) {
  const char* op = "fastdeconv_update_running";
  check_float_or_double(running_mean, op, "running_mean");
  const std::pair<const at::Tensor*, const at::Tensor*> pairs[] = {{&running_mean, &mean},
                                                                   {&running_deconv, &deconv}};
  const char* names[] = {"mean", "deconv"};
  for (int i = 0; i < 2; ++i) {
    const at::Tensor& running = *pairs[i].first;
    const at::Tensor& stat = *pairs[i].second;
    TORCH_CHECK(stat.sizes() == running.sizes(), op, ": `", names[i], "` must have the shape of its running buffer ",
                running.sizes(), ", got ", stat.sizes());
    TORCH_CHECK(stat.scalar_type() == running_mean.scalar_type() && running.scalar_type() == running_mean.scalar_type(),
                op, ": buffers and statistics must share one dtype");
    TORCH_CHECK(stat.device() == running_mean.device() && running.device() == running_mean.device(), op,
                ": buffers and statistics must be on one device");
    TORCH_CHECK(running.is_contiguous(), op, ": the running buffers must be contiguous");
  }
}

// Tiles of whole images, each holding about `budget` patch entries (at least one image).
inline std::vector<std::pair<int64_t, int64_t>> image_tiles(const PatchShape& s, int64_t budget) {
  const int64_t per_image = std::max<int64_t>(1, (s.rows() + s.batch - 1) / s.batch * s.columns());
  const int64_t step = std::max<int64_t>(1, budget / per_image);
  std::vector<std::pair<int64_t, int64_t>> tiles;
  for (int64_t n0 = 0; n0 < s.batch; n0 += step) tiles.emplace_back(n0, std::min(s.batch, n0 + step));
  return tiles;
}

template <class K>
struct FastDeconvDriver {
  static at::Tensor tile_of(const PatchShape& s, const std::pair<int64_t, int64_t>& t, const at::Tensor& input,
                            const at::Tensor& shift) {
    const int64_t r0 = s.first_row(t.first), rows = s.first_row(t.second) - r0;
    at::Tensor tile = at::empty({s.groups, rows * s.interleave, s.features}, input.options());
    K::build_tile(s, t.first, t.second, input, shift, tile);
    return tile;
  }

  // mean [groups, F] and covariance + eps*I [groups, F, F] of the patch rows, in one pass over tiles of the
  // patches shifted by the first tile's mean (the shifted-data algorithm: with the shift close to the mean the
  // final correction d d^T is tiny, so nothing cancels). Sums and the accumulation over tiles are in float64;
  // each tile's products are one GEMM.
  static std::tuple<at::Tensor, at::Tensor> statistics(const at::Tensor& input_, at::IntArrayRef kernel_size,
                                                       at::IntArrayRef dilation, at::IntArrayRef padding,
                                                       int64_t sampling_stride, int64_t block, int64_t groups,
                                                       double eps, int64_t budget) {
    const PatchShape s = make_patch_shape(input_, kernel_size, dilation, padding, sampling_stride, block, groups);
    const at::Tensor input = input_.contiguous();
    at::Tensor shift, sum, cov;
    if (K::moments(s, input, eps, shift, cov)) return {shift, cov};
    const auto tiles = image_tiles(s, budget);
    for (size_t i = 0; i < tiles.size(); ++i) {
      at::Tensor tile = tile_of(s, tiles[i], input, shift);
      // Tile sums are pairwise reductions in the tile's dtype (no float64 copy of the tile).
      if (i == 0) {
        shift = tile.sum(1).div_(static_cast<double>(tile.size(1)));
        tile.sub_(shift.unsqueeze(1));
        sum = tile.sum(1).to(at::kDouble);
        cov = at::bmm(tile.transpose(1, 2), tile).to(at::kDouble);
      } else {
        sum.add_(tile.sum(1));
        cov.add_(at::bmm(tile.transpose(1, 2), tile));
      }
    }
    const double m = static_cast<double>(s.matrix_rows());
    const at::Tensor d = sum.div_(m);
    cov.div_(m).sub_(d.unsqueeze(2) * d.unsqueeze(1)).add_(at::eye(s.features, cov.options()).mul_(eps));
    return {(shift.to(at::kDouble) + d).to(input.scalar_type()), cov.to(input.scalar_type())};
  }

  // Gradient w.r.t. input: each patch entry gets (grad_mean + (G + G^T) x_centred) / M, then every input
  // element sums the entries that read it.
  static at::Tensor statistics_backward(const at::Tensor& grad_mean, const at::Tensor& grad_cov,
                                        const at::Tensor& input_, const at::Tensor& mean, at::IntArrayRef kernel_size,
                                        at::IntArrayRef dilation, at::IntArrayRef padding, int64_t sampling_stride,
                                        int64_t block, int64_t groups, int64_t budget) {
    const PatchShape s = make_patch_shape(input_, kernel_size, dilation, padding, sampling_stride, block, groups);
    const char* op = "patch_statistics_backward";
    const std::vector<int64_t> vec{s.groups, s.features}, mat{s.groups, s.features, s.features};
    TORCH_CHECK(grad_mean.sizes() == at::IntArrayRef(vec), op, ": `grad_mean` must have shape ", vec, ", got ",
                grad_mean.sizes());
    TORCH_CHECK(mean.sizes() == at::IntArrayRef(vec), op, ": `mean` must have shape ", vec, ", got ", mean.sizes());
    TORCH_CHECK(grad_cov.sizes() == at::IntArrayRef(mat), op, ": `grad_cov` must have shape ", mat, ", got ",
                grad_cov.sizes());
    for (const at::Tensor* t : {&grad_mean, &grad_cov, &mean}) {
      TORCH_CHECK(t->scalar_type() == input_.scalar_type() && t->device() == input_.device(), op,
                  ": gradients and `mean` must match `input`'s dtype and device");
    }
    const at::Tensor input = input_.contiguous();
    const double m = static_cast<double>(s.matrix_rows());
    const at::Tensor g_sym = (grad_cov + grad_cov.transpose(1, 2)).div_(m);
    const at::Tensor g_mean = (grad_mean / m).unsqueeze(1);
    const at::Tensor shift = mean.contiguous();
    at::Tensor grad_input = at::zeros_like(input);
    for (const auto& t : image_tiles(s, budget)) {
      const at::Tensor tile = tile_of(s, t, input, shift);
      const at::Tensor grad_tile = at::baddbmm(g_mean, tile, g_sym).contiguous();
      const int64_t r0 = s.first_row(t.first);
      K::gather_input_grad(s, t.first, t.second, r0, s.first_row(t.second) - r0, grad_tile, grad_input);
    }
    return grad_input;
  }

  static void check_matrices(const at::Tensor& a, int64_t n_iter, const char* op) {
    TORCH_CHECK(a.dim() == 3 && a.size(1) == a.size(2) && a.size(1) > 0, op,
                ": `a` must be a batch of square matrices [B, F, F], got shape ", a.sizes());
    check_float_or_double(a, op, "a");
    TORCH_CHECK(n_iter >= 0, op, ": `n_iter` must be >= 0, got ", n_iter);
  }

  static bool fused(const at::Tensor& a) { return a.size(1) <= kNsFusedMaxFeatures; }

  // The iteration on Y0 [B, F, F] as batched GEMMs; with `iterates`, (Y_k, Z_k, T_k) for k < n_iter kept there
  // for the reverse mode. Returns Z_n.
  static at::Tensor ns_gemm_forward(const at::Tensor& y0, int64_t n_iter, std::vector<at::Tensor>* iterates) {
    const at::Tensor eye = at::eye(y0.size(1), y0.options()).expand_as(y0);
    const at::Tensor eye_15 = eye * 1.5;
    at::Tensor y = y0, z = eye.contiguous();
    for (int64_t k = 0; k < n_iter; ++k) {
      const at::Tensor t = at::baddbmm(eye_15, z, y, /*beta=*/1, /*alpha=*/-0.5);  // (3I - Z Y) / 2
      if (iterates != nullptr) iterates->insert(iterates->end(), {y, z, t});
      y = at::bmm(y, t);
      z = at::bmm(t, z);
    }
    return z;
  }

  // The gradient w.r.t. Y0 of <grad_z, Z_n> for the iteration of ns_gemm_forward (newton_schulz.h's reverse
  // steps, as batched GEMMs).
  static at::Tensor ns_gemm_backward(const at::Tensor& y0, const at::Tensor& grad_z, int64_t n_iter) {
    std::vector<at::Tensor> it;
    ns_gemm_forward(y0, n_iter, &it);
    at::Tensor g_y = at::zeros_like(y0), g_z = grad_z;
    for (int64_t k = n_iter - 1; k >= 0; --k) {
      const at::Tensor &y = it[3 * k], &z = it[3 * k + 1], &t = it[3 * k + 2];
      const at::Tensor g_t = at::baddbmm(at::bmm(y.transpose(1, 2), g_y), g_z, z.transpose(1, 2));
      const at::Tensor g_y_k = at::baddbmm(at::bmm(g_y, t.transpose(1, 2)), z.transpose(1, 2), g_t, 1, -0.5);
      g_z = at::baddbmm(at::bmm(t.transpose(1, 2), g_z), g_t, y.transpose(1, 2), 1, -0.5);
      g_y = g_y_k;
    }
    return g_y;
  }

  // NaN where the matrix's norm is not finite (as the spectral form gives), `x` elsewhere; no host sync.
  static at::Tensor nan_unless_finite(const at::Tensor& x, const at::Tensor& norm) {
    return at::where(at::isfinite(norm).view({-1, 1, 1}), x, std::numeric_limits<double>::quiet_NaN());
  }

  // Eigen-decomposition of the (symmetric) matrices for the spectral form; refuses matrices that are not
  // symmetric, for which the spectral form would compute something else.
  static std::tuple<at::Tensor, at::Tensor> eigen(const at::Tensor& a, const at::Tensor& norm, const char* op) {
    const at::Tensor asym = (a - a.transpose(1, 2)).abs().amax();
    const at::Tensor scale = a.abs().amax();
    const at::Tensor verdict = at::stack({asym, scale}).cpu();
    const double asym_v = verdict[0].item<double>(), scale_v = verdict[1].item<double>();
    const double tol = 1000 * (a.scalar_type() == at::kFloat ? std::numeric_limits<float>::epsilon()
                                                               : std::numeric_limits<double>::epsilon());
    if (!std::isfinite(asym_v) || !std::isfinite(scale_v)) {
      return {at::full({a.size(0), a.size(1)}, std::numeric_limits<double>::quiet_NaN(), a.options()),
              at::full_like(a, std::numeric_limits<double>::quiet_NaN())};
    }
    TORCH_CHECK(asym_v <= tol * scale_v, op, ": matrices with more than ", kNsFusedMaxFeatures,
                " features must be symmetric (as covariances are); largest |a - a^T| is ", asym_v, " for |a| up to ",
                scale_v);
    at::Tensor values, vectors;
    std::tie(values, vectors) = at::linalg_eigh((a + a.transpose(1, 2)).mul_(0.5));
    return {values.div_(norm.unsqueeze(1)), vectors};
  }

  static at::Tensor frobenius(const at::Tensor& a) { return at::linalg_vector_norm(a, 2, {1, 2}); }

  // (result, saved): `saved` is what the backward needs besides `a` and `result`: for the spectral form the
  // eigenvectors and eigenvalues of a/||a||_F, [B, F + 1, F]; for the matrix form nothing, [0].
  static std::tuple<at::Tensor, at::Tensor> isqrt(const at::Tensor& a_, int64_t n_iter) {
    check_matrices(a_, n_iter, "isqrt_newton_schulz");
    const at::Tensor a = a_.contiguous();
    const at::Tensor norm = frobenius(a);
    if (fused(a)) return {K::ns_fused_forward(a, norm, n_iter), at::empty({0}, a.options())};
    if constexpr (!K::kSpectralForm) {
      const at::Tensor z = ns_gemm_forward(a / norm.view({-1, 1, 1}), n_iter, nullptr);
      return {nan_unless_finite(z / norm.sqrt().view({-1, 1, 1}), norm), at::empty({0}, a.options())};
    } else {
      at::Tensor lambda, u;
      std::tie(lambda, u) = eigen(a, norm, "isqrt_newton_schulz");
      const at::Tensor z = K::ns_spectral_values(lambda, n_iter);
      at::Tensor result = at::matmul(u * z.unsqueeze(1), u.transpose(1, 2)).div_(norm.sqrt().view({-1, 1, 1}));
      return {result, at::cat({u, lambda.unsqueeze(1)}, 1)};
    }
  }

  // d<grad, D>/dA for D = isqrt(A): the iteration's gradient w.r.t. Y0 = A/||A||_F, then the normalisation's.
  static at::Tensor isqrt_backward(const at::Tensor& grad_, const at::Tensor& a_, const at::Tensor& result_,
                                   const at::Tensor& saved, int64_t n_iter) {
    const char* op = "isqrt_newton_schulz_backward";
    check_matrices(a_, n_iter, op);
    TORCH_CHECK(grad_.sizes() == a_.sizes() && result_.sizes() == a_.sizes(), op,
                ": `grad` and `result` must have the shape of `a`, ", a_.sizes());
    const at::Tensor a = a_.contiguous(), grad = grad_.contiguous(), result = result_.contiguous();
    const at::Tensor norm = frobenius(a);
    const int64_t f = a.size(1);
    at::Tensor grad_y0;
    if (fused(a)) {
      grad_y0 = K::ns_fused_backward(a, norm, grad, n_iter);
    } else if constexpr (!K::kSpectralForm) {
      TORCH_CHECK(saved.numel() == 0, op, ": `saved` must be the second output of isqrt_newton_schulz, [0] on ",
                  a.device().type(), "; got ", saved.sizes());
      grad_y0 = nan_unless_finite(
          ns_gemm_backward(a / norm.view({-1, 1, 1}), grad / norm.sqrt().view({-1, 1, 1}), n_iter), norm);
    } else {
      // For symmetric Y0 = U diag(lambda) U^T and the polynomial P of the iteration, the gradient of <G, P(Y0)>
      // is U (L o (U^T G U)) U^T with L the divided differences of P (Daleckii-Krein).
      at::Tensor lambda, u;
      if (saved.dim() == 3 && saved.size(0) == a.size(0) && saved.size(1) == f + 1 && saved.size(2) == f) {
        u = saved.narrow(1, 0, f);
        lambda = saved.select(1, f).contiguous();
      } else {
        TORCH_CHECK(saved.numel() == 0, op, ": `saved` must be the second output of isqrt_newton_schulz, [B, F+1, F] = [",
                    a.size(0), ", ", f + 1, ", ", f, "], or empty; got ", saved.sizes());
        std::tie(lambda, u) = eigen(a, norm, op);
      }
      const at::Tensor l = K::ns_divided_differences(lambda, n_iter);
      const at::Tensor g = grad / norm.sqrt().view({-1, 1, 1});
      const at::Tensor ut = u.transpose(1, 2);
      grad_y0 = at::matmul(at::matmul(u, l * at::matmul(at::matmul(ut, g), u)), ut);
    }
    const at::Tensor n3 = norm.view({-1, 1, 1});
    const at::Tensor g_norm = (grad * result).sum({1, 2}, true).mul_(-0.5).div_(n3) -
                              (grad_y0 * a).sum({1, 2}, true).div_(n3 * n3);
    return grad_y0 / n3 + g_norm * a / n3;
  }
};

}  // namespace aecr
