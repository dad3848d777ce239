// Host side of the implicit-GEMM deform_conv2d (kernels in deform_conv_implicit_kernels.cuh), written over a
// launcher (cuda_launcher.cuh in production; tests/cuda_emulation runs the same code on the CPU).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "cuda/deform_conv_gather.cuh"
#include "cuda/deform_conv_implicit_kernels.cuh"
#include "cuda/device_memory.cuh"
#include "deform_conv_args.h"
#include "deform_conv_driver.h"

namespace aecr {
namespace {

constexpr int64_t kImplicitColumnBudget = int64_t(1) << 28;  // deterministic input gradient: elements per chunk

Geometry geometry_of(const DeformConvShape& s, const at::Tensor& input, const at::Tensor& weight, int64_t groups) {
  return Geometry{input.size(0) * s.pixels(), groups, s.channels / groups, weight.size(0) / groups};
}

// The input channels-last, the weight as [G, C_out/G, K, C/G] (the GEMMs' reduction order, tap then channel).
at::Tensor channels_last_input(const at::Tensor& input) { return input.permute({0, 2, 3, 1}).contiguous(); }

at::Tensor tap_major_weight(const at::Tensor& weight, int64_t groups, int64_t taps) {
  const int64_t out = weight.size(0), in_g = weight.size(1);
  return weight.reshape({groups, out / groups, in_g, taps}).permute({0, 1, 3, 2}).contiguous();
}

// offset and mask in float32.
template <class L>
at::Tensor sample_plan(const L& launch, const DeformConvShape& s, int64_t images, const at::Tensor& offset,
                       const std::optional<at::Tensor>& mask) {
  const int64_t sites = images * s.offset_groups * s.taps() * s.pixels();
  at::Tensor plan = at::empty({sites * static_cast<int64_t>(sizeof(SamplePlan))}, offset.options().dtype(at::kByte));
  launch(implicit_sample_plan_kernel, dim3(grid_for(sites)), dim3(kThreads), s, images, device_ptr<const float>(offset),
         optional_ptr<const float>(mask), device_ptr_as<SamplePlan>(plan));
  return plan;
}

dim3 tiles(int64_t x, int64_t y, int64_t z = 1) {
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(y), static_cast<unsigned>(z));
}

template <typename Fn>
void dispatch_tensor_core_types(at::ScalarType type, Fn&& fn) {
  switch (type) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "deform_conv2d: the implicit path does not take ", type);
  }
}

// The implicit path does not chunk: its sample plan, partial sums, channels-last copy and float32 accumulator
// grow with the batch and the image (review R3: about 19 GB for one 4K x 256 bf16 image). implicit_path_applies
// declines a problem whose workspace would exceed this many bytes, and the simple path, which chunks, takes it.
constexpr int64_t kImplicitWorkspaceBudget = int64_t(1) << 30;

// The most the implicit path allocates beyond its arguments and results, forward or backward, either determinism,
// on `multiprocessors` SMs, for features of `element_bytes` bytes.
inline int64_t implicit_workspace_bytes(const DeformConvShape& s, const Geometry& q, int64_t batch,
                                        int64_t element_bytes, int64_t weight_numel, int64_t multiprocessors) {
  const int64_t K = s.taps(), sites = batch * s.offset_groups * K * s.pixels();
  const int64_t features = batch * s.channels * s.plane();
  const int64_t copies = (features + weight_numel) * element_bytes;                 // channels-last input, weight
  const int64_t plan = sites * static_cast<int64_t>(sizeof(SamplePlan));
  const int64_t partial = channel_chunk_count(s, q) * K * 3 * q.columns * 4;
  const int64_t accumulator = features * 4;                                           // fp32 input gradient
  const int64_t geometry = 2 * 3 * sites * 4;                                         // fp32 offset, mask, grads
  const int64_t splits = std::max<int64_t>(1, 4 * multiprocessors) + 1;               // split-K partials, summed
  return copies + plan + partial + accumulator + geometry + splits * weight_numel * 4;
}

// Whether the kernels' grids fit CUDA's limits (y and z at most 65535).
bool implicit_grids_fit(const DeformConvShape& s, const Geometry& q) {
  const int64_t limit = 65535;
  return q.groups <= limit && ceil_div(q.out_per_group, kTile) <= limit && channel_chunk_count(s, q) * s.taps() <= limit;
}

// Forward, for arguments checked by check_deform_conv; fp16, bf16 or fp32 (computed as TF32).
template <class L>
at::Tensor implicit_forward(const L& launch, const DeformConvShape& s, const at::Tensor& input_,
                            const at::Tensor& weight_, const at::Tensor& offset_, const std::optional<at::Tensor>& mask_,
                            const std::optional<at::Tensor>& bias_, int64_t groups) {
  const at::Tensor input = input_.contiguous(), offset = geometry(offset_, at::kFloat);
  const std::optional<at::Tensor> mask = geometry(mask_, at::kFloat), bias = contiguous(bias_);
  const Geometry q = geometry_of(s, input, weight_, groups);
  at::Tensor output = at::empty({input.size(0), weight_.size(0), s.out_height, s.out_width}, input.options());
  if (output.numel() == 0) return output;
  const at::Tensor x = channels_last_input(input), w = tap_major_weight(weight_, groups, s.taps());
  dispatch_tensor_core_types(input.scalar_type(), [&](auto tag) {
    using V = decltype(tag);
    const at::Tensor plan = sample_plan(launch, s, input.size(0), offset, mask);
    launch(implicit_forward_kernel<V>, tiles(ceil_div(q.columns, kTile), ceil_div(q.out_per_group, kTile), groups),
           dim3(kBlockThreads), s, q, device_ptr<const V>(x), device_ptr_as<const SamplePlan>(plan),
           device_ptr<const V>(w), optional_ptr<const V>(bias), device_ptr<V>(output));
  });
  return output;
}

// Backward: (grad_input, grad_weight, grad_offset, grad_mask, grad_bias), those in `needed` (the others empty, as
// in deform_conv_driver.h). `deterministic`: the input gradient without atomics (everything else is
// deterministic anyway), through a column-gradient buffer of at most `column_budget` elements a chunk.
template <class L>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> implicit_backward(
    const L& launch, const DeformConvShape& s, const at::Tensor& grad_output_, const at::Tensor& input_,
    const at::Tensor& weight, const at::Tensor& offset_, const std::optional<at::Tensor>& mask_, int64_t groups,
    bool deterministic, const DeformConvGrads& needed, int64_t column_budget = kImplicitColumnBudget) {
  const at::Tensor input = input_.contiguous(), offset = geometry(offset_, at::kFloat);
  const at::Tensor grad_output = grad_output_.contiguous();
  const std::optional<at::Tensor> mask = geometry(mask_, at::kFloat);
  const Geometry q = geometry_of(s, input, weight, groups);
  const int64_t batch = input.size(0), K = s.taps(), P = s.pixels();
  const auto float_options = input.options().dtype(at::kFloat);
  const auto none = [&] { return at::empty({0}, input.options()); };  // a new one for each: outputs must not alias
  at::Tensor grad_input = needed.input ? at::zeros_like(input) : none();
  at::Tensor grad_weight = needed.weight ? at::zeros_like(weight) : none();
  at::Tensor grad_offset = needed.offset ? at::zeros_like(offset) : none();
  at::Tensor grad_mask = needed.mask ? at::zeros_like(*mask) : none();
  const at::Tensor grad_bias =
      needed.bias ? grad_output.sum({0, 2, 3}, /*keepdim=*/false, at::toOpMathType(grad_output.scalar_type()))
                        .to(weight.scalar_type())
                  : none();
  if (batch == 0 || grad_output.numel() == 0 || !(needed.column_grad() || needed.weight)) {
    return {grad_input, grad_weight, in_dtype_of(grad_offset, offset_), in_dtype_of(grad_mask, mask_), grad_bias};
  }

  const int64_t n_chunks = channel_chunk_count(s, q);
  const at::Tensor x = channels_last_input(input), w = tap_major_weight(weight, groups, K);
  const at::Tensor partial =
      needed.sampling() ? at::empty({n_chunks * K * 3 * q.columns}, float_options) : at::empty({0}, float_options);
  const Global<float> partial_ptr = needed.sampling() ? device_ptr<float>(partial) : Global<float>(nullptr);

  dispatch_tensor_core_types(input.scalar_type(), [&](auto tag) {
    using V = decltype(tag);

    // Input side: input gradient, and per-chunk partial sums of the offset and mask gradients.
    if (needed.column_grad() && deterministic && needed.input) {  // column-gradient chunks, as in the simple path
      const ChunkPlan chunks = plan_chunks(s, batch, column_budget);
      const at::Tensor columns = at::empty({s.channels * K * chunks.images * chunks.pixels}, input.options());
      // Summed in fp32 (a chunk's images, as in deform_conv_driver.h), rounded once after their last pixel chunk.
      at::Tensor input_sum = at::zeros({chunks.images, s.channels, s.height, s.width}, float_options);
      for_each_chunk(s, batch, chunks, [&](int64_t b0, const ColumnChunk& c) {
        const at::Tensor chunk_columns = columns.narrow(0, 0, s.channels * K * c.width());
        const int64_t n_begin = b0 * P + c.pixel_begin;
        launch(implicit_input_grad_kernel<V>, tiles(ceil_div(c.width(), kTile), n_chunks * K), dim3(kBlockThreads), s,
               q, n_begin, n_begin + c.width(), device_ptr<const V>(x), device_ptr<const float>(offset),
               optional_ptr<const float>(mask), device_ptr<const V>(w), device_ptr<const V>(grad_output),
               Global<float>(nullptr), device_ptr<V>(chunk_columns), b0, c, partial_ptr);
        deterministic_input_grad<V>(launch, s, c, offset.narrow(0, b0, c.images), images(mask, b0, c.images),
                                    chunk_columns, input_sum.narrow(0, 0, c.images));
        flush_input_sum(input_sum, grad_input, b0, c, P);
      });
    } else if (needed.column_grad()) {
      const at::Tensor acc = needed.input ? at::zeros({batch, s.height, s.width, s.channels}, float_options)
                                          : at::empty({0}, float_options);
      launch(implicit_input_grad_kernel<V>, tiles(ceil_div(q.columns, kTile), n_chunks * K), dim3(kBlockThreads), s, q,
             int64_t(0), q.columns, device_ptr<const V>(x), device_ptr<const float>(offset),
             optional_ptr<const float>(mask),
             device_ptr<const V>(w), device_ptr<const V>(grad_output),
             needed.input ? device_ptr<float>(acc) : Global<float>(nullptr), Global<V>(nullptr), int64_t(0),
             whole_images(s, batch), partial_ptr);
      if (needed.input) grad_input.copy_(acc.permute({0, 3, 1, 2}));
    }
    if (needed.sampling()) {
      launch(implicit_offset_mask_grad_kernel, dim3(grid_for(batch * s.offset_groups * K * P)), dim3(kThreads), s,
             q, device_ptr<const float>(partial), optional_ptr<const float>(mask),
             needed.offset ? device_ptr<float>(grad_offset) : Global<float>(nullptr),
             needed.mask ? device_ptr<float>(grad_mask) : Global<float>(nullptr));
    }
    if (!needed.weight) return;

    // Weight side: enough pixel splits to give every SM a few blocks, each split at least 8 K steps long.
    const at::Tensor plan = sample_plan(launch, s, batch, offset, mask);
    const int64_t out_tiles = n_chunks * K * ceil_div(q.out_per_group, kTile);
    const int64_t splits = std::max<int64_t>(1, std::min<int64_t>({ceil_div(4 * launch.multiprocessors(), out_tiles),
                                                                    ceil_div(q.columns, 8 * kStep), 65535}));
    const int64_t per_split = ceil_div(ceil_div(q.columns, splits), kStep) * kStep;
    const int64_t used_splits = ceil_div(q.columns, per_split);
    const int64_t size = weight.numel();
    at::Tensor partial_w = at::empty({used_splits * size}, float_options);
    launch(implicit_weight_grad_kernel<V>, tiles(n_chunks * K, ceil_div(q.out_per_group, kTile), used_splits),
           dim3(kBlockThreads), s, q, per_split, device_ptr<const V>(x), device_ptr_as<const SamplePlan>(plan),
           device_ptr<const V>(grad_output), device_ptr<float>(partial_w));
    at::Tensor summed = at::empty({size}, float_options);
    launch(implicit_sum_splits_kernel, dim3(grid_for(size)), dim3(kThreads), device_ptr<const float>(partial_w),
           used_splits, size, device_ptr<float>(summed));
    grad_weight.copy_(summed.view({weight.size(0), K, q.in_per_group}).permute({0, 2, 1}).reshape(weight.sizes()));
  });
  return {grad_input, grad_weight, in_dtype_of(grad_offset, offset_), in_dtype_of(grad_mask, mask_), grad_bias};
}

}  // namespace
}  // namespace aecr
