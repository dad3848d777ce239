// The CPU's per-tile work of deform_conv2d over channels-last data, written once and compiled once per instruction
// set (deform_conv_cpu.cpp includes this file inside each of its ISA namespaces; there is no include guard on
// purpose). Every function carries AECR_ROWS_TARGET, the instruction set of its copy, and works on raw pointers
// only, so that no inline function of another library is compiled for an instruction set the CPU may lack.
//
// A corner of a bilinear point is a row of channels of the channels-last input (`features`, [B, H, W, C]), read
// as whole vectors of AECR_ROWS_BYTES bytes. A corner outside the plane points at a row of zeros (`zeros`), so the
// loops have no branch per corner; a corner inside is read even when its weight is 0, and corners of weight 0
// receive no gradient: torchvision's semantics for NaN and Inf (bilinear.h).
//
// Expects, before inclusion: AECR_ROWS_NAMESPACE, AECR_ROWS_TARGET, AECR_ROWS_BYTES, and deform_conv_tiles.h.

namespace aecr {
namespace cpu {
namespace AECR_ROWS_NAMESPACE {

template <typename T>
struct Lanes;
template <>
struct Lanes<float> {
  typedef float type __attribute__((vector_size(AECR_ROWS_BYTES)));
  typedef int32_t index __attribute__((vector_size(AECR_ROWS_BYTES)));
};
template <>
struct Lanes<double> {
  typedef double type __attribute__((vector_size(AECR_ROWS_BYTES)));
  typedef int64_t index __attribute__((vector_size(AECR_ROWS_BYTES)));
};
template <typename T>
using vec_t = typename Lanes<T>::type;
template <typename T>
using index_t = typename Lanes<T>::index;
template <typename T>
constexpr int64_t kLanes = AECR_ROWS_BYTES / sizeof(T);

template <typename T>
AECR_ROWS_TARGET inline vec_t<T> load(const T* p) {
  vec_t<T> v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
AECR_ROWS_TARGET inline void store(T* p, vec_t<T> v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

template <typename T>
AECR_ROWS_TARGET inline vec_t<T> splat(T x) {
  return vec_t<T>{} + x;
}

// The lanes of v summed in lane order.
template <typename T>
AECR_ROWS_TARGET inline T lane_sum(vec_t<T> v) {
  T s = v[0];
  for (int64_t i = 1; i < kLanes<T>; ++i) s += v[i];
  return s;
}

// mask * (w0 x0 + w1 x1 + w2 x2 + w3 x3), summed in that order: a column value, of one channel (V = T) or of a
// vector of them.
template <typename V>
AECR_ROWS_TARGET inline V masked_sample(V m, V w0, V w1, V w2, V w3, V x0, V x1, V x2, V x3) {
  V v = w0 * x0;
  v += w1 * x1;
  v += w2 * x2;
  v += w3 * x3;
  return m * v;
}

// Channel c of masked_sample at a site's corners.
template <typename T>
AECR_ROWS_TARGET inline T masked_sample_at(const Corners<T>& p, const T* const x[4], int64_t c) {
  return masked_sample<T>(p.mask, p.weight[0], p.weight[1], p.weight[2], p.weight[3], x[0][c], x[1][c], x[2][c],
                          x[3][c]);
}

// dst[c] = masked_sample at channel c for c < n: the column values of one run of channels.
template <typename T>
AECR_ROWS_TARGET inline void sample_run(const Corners<T>& p, const T* const x[4], T* dst, int64_t n) {
  const vec_t<T> w0 = splat(p.weight[0]), w1 = splat(p.weight[1]), w2 = splat(p.weight[2]), w3 = splat(p.weight[3]);
  const vec_t<T> m = splat(p.mask);
  int64_t c = 0;
  for (; c + kLanes<T> <= n; c += kLanes<T>) {
    store(dst + c, masked_sample(m, w0, w1, w2, w3, load(x[0] + c), load(x[1] + c), load(x[2] + c), load(x[3] + c)));
  }
  for (; c < n; ++c) dst[c] = masked_sample_at<T>(p, x, c);
}

// dots[j] += sum_c g[c] x_j[c] for c < n (lanes first, then a fixed-order sum of the lanes), and, when `dst` is
// not null, the run's column values as sample_run writes them.
template <typename T>
AECR_ROWS_TARGET inline void corner_dots(const Corners<T>& p, const T* const x[4], const T* g, int64_t n, T dots[4],
                                         T* dst) {
  vec_t<T> d0{}, d1{}, d2{}, d3{};
  const vec_t<T> w0 = splat(p.weight[0]), w1 = splat(p.weight[1]), w2 = splat(p.weight[2]), w3 = splat(p.weight[3]);
  const vec_t<T> m = splat(p.mask);
  int64_t c = 0;
  for (; c + kLanes<T> <= n; c += kLanes<T>) {
    const vec_t<T> gc = load(g + c);
    const vec_t<T> x0 = load(x[0] + c), x1 = load(x[1] + c), x2 = load(x[2] + c), x3 = load(x[3] + c);
    d0 += gc * x0;
    d1 += gc * x1;
    d2 += gc * x2;
    d3 += gc * x3;
    if (dst != nullptr) store(dst + c, masked_sample(m, w0, w1, w2, w3, x0, x1, x2, x3));
  }
  T s[4] = {lane_sum<T>(d0), lane_sum<T>(d1), lane_sum<T>(d2), lane_sum<T>(d3)};
  for (; c < n; ++c) {
    for (int j = 0; j < 4; ++j) s[j] += g[c] * x[j][c];
    if (dst != nullptr) dst[c] = masked_sample_at<T>(p, x, c);
  }
  for (int j = 0; j < 4; ++j) dots[j] += s[j];
}

// out_j[c] += (mask * weight_j) g[c] for the corners j of non-zero weight, c < n.
template <typename T>
AECR_ROWS_TARGET inline void scatter_run(const Corners<T>& p, T* const out[4], const T* g, int64_t n) {
  for (int j = 0; j < 4; ++j) {
    if (p.weight[j] == T(0)) continue;
    const T coef = p.mask * p.weight[j];
    const vec_t<T> cv = splat(coef);
    T* o = out[j];
    int64_t c = 0;
    for (; c + kLanes<T> <= n; c += kLanes<T>) store(o + c, load(o + c) + cv * load(g + c));
    for (; c < n; ++c) o[c] += coef * g[c];
  }
}

// The column rows [tile.pixels, layout.row] of a tile. The runs come by offset group, so a site's corners are
// found once for all the runs of its group.
template <typename T>
AECR_ROWS_TARGET void sample_tile(const RowsProblem<T>& pr, const PixelTile& tile, T* columns) {
  const RowLayout& layout = pr.layout;
  for (int64_t q = 0; q < tile.pixels; ++q) {
    T* row = columns + q * layout.row;
    const WindowOrigin origin = window_origin(pr.s, tile.pixel_begin + q);
    for (int64_t k = 0; k < pr.s.taps(); ++k) {
      Corners<T> p;
      int64_t group = -1;
      for (const ChannelRun& run : layout.runs) {
        if (run.group != group) {
          group = run.group;
          p = corners_of(pr, SamplingSite{tile.b, group, k, tile.pixel_begin + q}, origin, false);
        }
        const T* x[4] = {p.row[0] + run.channel, p.row[1] + run.channel, p.row[2] + run.channel,
                         p.row[3] + run.channel};
        sample_run<T>(p, x, row + run.column + k * layout.tap_stride, run.count);
      }
    }
  }
}

// The offset and mask gradients of one site from its corner dot products D_j.
template <typename T>
AECR_ROWS_TARGET inline void finish_site(const RowsProblem<T>& pr, const SamplingSite& site, const Corners<T>& p,
                                         const T dots[4], T* grad_offset, T* grad_mask) {
  SiteGradSums<T> sums{T(0), T(0), T(0)};
  for (int j = 0; j < 4; ++j) {
    sums.value += p.weight[j] * dots[j];
    sums.h += p.d_h[j] * dots[j];
    sums.w += p.d_w[j] * dots[j];
  }
  store_site_grad<T>(pr.s, site, p.mask, sums, grad_offset, grad_mask);
}

// Offset and mask gradients of a tile's sites from its column-gradient rows [tile.pixels, layout.row]; the
// column rows too where `columns` is not null. Either gradient may be null. With D_j = sum_c gcol_c x_j[c] over
// the group's channels: d/d mask = sum_j w_j D_j, d/d dy = mask sum_j (d w_j / dh) D_j, dx likewise.
template <typename T>
AECR_ROWS_TARGET void sampling_grad_tile(const RowsProblem<T>& pr, const PixelTile& tile, const T* grad_columns,
                                         T* columns, T* grad_offset, T* grad_mask) {
  const RowLayout& layout = pr.layout;
  for (int64_t q = 0; q < tile.pixels; ++q) {
    const T* grow = grad_columns + q * layout.row;
    T* row = columns == nullptr ? nullptr : columns + q * layout.row;
    const WindowOrigin origin = window_origin(pr.s, tile.pixel_begin + q);
    for (int64_t k = 0; k < pr.s.taps(); ++k) {
      Corners<T> p;
      SamplingSite site{tile.b, -1, k, tile.pixel_begin + q};
      T dots[4] = {T(0), T(0), T(0), T(0)};
      for (const ChannelRun& run : layout.runs) {
        if (run.group != site.g) {
          if (site.g >= 0) finish_site<T>(pr, site, p, dots, grad_offset, grad_mask);
          site.g = run.group;
          p = corners_of(pr, site, origin, true);
          for (int j = 0; j < 4; ++j) dots[j] = T(0);
        }
        const T* x[4] = {p.row[0] + run.channel, p.row[1] + run.channel, p.row[2] + run.channel,
                         p.row[3] + run.channel};
        const int64_t at = run.column + k * layout.tap_stride;
        corner_dots<T>(p, x, grow + at, run.count, dots, row == nullptr ? nullptr : row + at);
      }
      if (site.g >= 0) finish_site<T>(pr, site, p, dots, grad_offset, grad_mask);
    }
  }
}

// The input gradient of channels [c_begin, c_end) of run `run`, image b, from the column-gradient rows of the
// tiles [first, end) (grad_columns: the rows from tile `first` on), added into grad_features [B, H, W, C]. Each
// element receives its terms in the order of (pixel, tap, corner), whoever runs it.
template <typename T>
AECR_ROWS_TARGET void scatter_block(const RowsProblem<T>& pr, const TilePlan& plan, int64_t first, int64_t end,
                                    int64_t b, const ChannelRun& run, int64_t c_begin, int64_t c_end,
                                    const T* grad_columns, T* grad_features) {
  const DeformConvShape& s = pr.s;
  const RowLayout& layout = pr.layout;
  const int64_t row0 = plan.row(first);
  T* image = grad_features + b * s.plane() * s.channels + c_begin;
  for (int64_t i = std::max(first, b * plan.tiles_per_image); i < std::min(end, (b + 1) * plan.tiles_per_image); ++i) {
    const PixelTile tile = plan.tile(i);
    const T* grows = grad_columns + (plan.row(i) - row0) * layout.row + run.column + (c_begin - run.channel);
    for (int64_t q = 0; q < tile.pixels; ++q) {
      const WindowOrigin origin = window_origin(s, tile.pixel_begin + q);
      for (int64_t k = 0; k < s.taps(); ++k) {
        const Corners<T> p = corners_of(pr, SamplingSite{b, run.group, k, tile.pixel_begin + q}, origin, false);
        T* out[4];
        for (int j = 0; j < 4; ++j) out[j] = image + p.index[j] * s.channels;
        scatter_run<T>(p, out, grows + q * layout.row + k * layout.tap_stride, c_end - c_begin);
      }
    }
  }
}

// One stage of a register transpose of the L x L block r[0..L) (L = kLanes): rows a and a + H (a & H == 0) swap
// their off-diagonal H x H blocks. Stages H = L/2, L/4, ..., 1 transpose the block.
template <typename T, int64_t H>
AECR_ROWS_TARGET inline void swap_blocks(vec_t<T>* r) {
  constexpr int64_t L = kLanes<T>;
  index_t<T> low, high;
  for (int64_t k = 0; k < L; ++k) {
    low[k] = (k & H) ? L + k - H : k;
    high[k] = (k & H) ? L + k : k + H;
  }
  for (int64_t a = 0; a < L; ++a) {
    if (a & H) continue;
    const vec_t<T> x = r[a], y = r[a + H];
    r[a] = __builtin_shuffle(x, y, low);
    r[a + H] = __builtin_shuffle(x, y, high);
  }
  if constexpr (H > 1) swap_blocks<T, H / 2>(r);
}

// dst[j * dst_stride + i] = src[i * src_stride + j] for i < rows, j < cols: a block of planes changing memory
// format ([C, pixels] to [pixels, C] or back), by register transposes of L x L blocks and scalar edges.
template <typename T>
AECR_ROWS_TARGET void transpose(const T* src, int64_t src_stride, T* dst, int64_t dst_stride, int64_t rows,
                                int64_t cols) {
  constexpr int64_t L = kLanes<T>;
  const int64_t full_rows = rows / L * L, full_cols = cols / L * L;
  for (int64_t i = 0; i < full_rows; i += L) {
    for (int64_t j = 0; j < full_cols; j += L) {
      vec_t<T> r[L];
      for (int64_t a = 0; a < L; ++a) r[a] = load(src + (i + a) * src_stride + j);
      if constexpr (L > 1) swap_blocks<T, L / 2>(r);
      for (int64_t a = 0; a < L; ++a) store(dst + (j + a) * dst_stride + i, r[a]);
    }
    for (int64_t j = full_cols; j < cols; ++j) {
      for (int64_t a = 0; a < L; ++a) dst[j * dst_stride + i + a] = src[(i + a) * src_stride + j];
    }
  }
  for (int64_t i = full_rows; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) dst[j * dst_stride + i] = src[i * src_stride + j];
  }
}

}  // namespace AECR_ROWS_NAMESPACE
}  // namespace cpu
}  // namespace aecr
