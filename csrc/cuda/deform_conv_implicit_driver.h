// Host side of the implicit-GEMM deform_conv2d (kernels in deform_conv_implicit_kernels.cuh), written over a
// launcher L:
//
//   launch(kernel, dim3 grid, dim3 block, args...)   runs kernel<<<grid, block>>>(args...) and checks it
//   launch.multiprocessors()                         streaming multiprocessors of the device
//
// cuda_launcher.cuh is the production one; tests/cuda_emulation runs the same code on the CPU.
#pragma once

#include <ATen/ATen.h>

#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "cuda/deform_conv_gather.cuh"
#include "cuda/deform_conv_implicit_kernels.cuh"
#include "deform_conv_args.h"

namespace aecr {
namespace {

constexpr int64_t kImplicitColumnBudget = int64_t(1) << 28;  // deterministic input gradient: columns per chunk

Geometry geometry_of(const DeformConvShape& s, const at::Tensor& input, const at::Tensor& weight, int64_t groups) {
  return Geometry{input.size(0) * s.pixels(), groups, s.channels / groups, weight.size(0) / groups};
}

// Channel runs of at most kTile channels, each inside one conv group and one offset group, in channel order.
std::vector<ChannelChunk> channel_chunk_list(const DeformConvShape& s, const Geometry& q) {
  std::vector<ChannelChunk> chunks;
  const int64_t cpg = s.channels_per_offset_group();
  for (int64_t g = 0; g < q.groups; ++g) {
    const int64_t lo = g * q.in_per_group, hi = lo + q.in_per_group;
    for (int64_t og = lo / cpg; og * cpg < hi; ++og) {
      const int64_t seg_hi = std::min(hi, (og + 1) * cpg);
      for (int64_t c = std::max(lo, og * cpg); c < seg_hi; c += kTile) {
        chunks.push_back({g, og, c, std::min(seg_hi, c + kTile)});
      }
    }
  }
  return chunks;
}

// The same on the device, as bytes: [n * sizeof(ChannelChunk)]. Copied from pinned memory without blocking
// (a copy from pageable memory would wait for the stream).
at::Tensor channel_chunks(const DeformConvShape& s, const Geometry& q, const at::Device& device) {
  const std::vector<ChannelChunk> chunks = channel_chunk_list(s, q);
  at::Tensor host = at::empty({static_cast<int64_t>(chunks.size() * sizeof(ChannelChunk))},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(device.is_cuda()));
  std::memcpy(host.data_ptr(), chunks.data(), chunks.size() * sizeof(ChannelChunk));
  return host.to(device, /*non_blocking=*/true);
}

int64_t chunk_count(const at::Tensor& chunks) { return chunks.numel() / static_cast<int64_t>(sizeof(ChannelChunk)); }

template <typename T>
T* bytes_as(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

// The input channels-last, the weight as [G, C_out/G, K, C/G] (the GEMMs' reduction order, tap then channel).
at::Tensor channels_last_input(const at::Tensor& input) { return input.permute({0, 2, 3, 1}).contiguous(); }

at::Tensor tap_major_weight(const at::Tensor& weight, int64_t groups, int64_t taps) {
  const int64_t out = weight.size(0), in_g = weight.size(1);
  return weight.view({groups, out / groups, in_g, taps}).permute({0, 1, 3, 2}).contiguous();
}

template <typename V, class L>
at::Tensor sample_plan(const L& launch, const DeformConvShape& s, int64_t images, const at::Tensor& offset,
                       const std::optional<at::Tensor>& mask) {
  const int64_t sites = images * s.offset_groups * s.taps() * s.pixels();
  at::Tensor plan = at::empty({sites * static_cast<int64_t>(sizeof(SamplePlan))}, offset.options().dtype(at::kByte));
  launch(sample_plan_kernel<V>, dim3(grid_for(sites)), dim3(kThreads), s, images, offset.data_ptr<V>(),
         optional_data<V>(mask, 0), bytes_as<SamplePlan>(plan));
  return plan;
}

dim3 tiles(int64_t x, int64_t y, int64_t z = 1) {
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(y), static_cast<unsigned>(z));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename Fn>
void dispatch_tensor_core_types(at::ScalarType type, Fn&& fn) {
  switch (type) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "deform_conv2d: the implicit path does not take ", type);
  }
}

// Forward. Arguments checked (check_deform_conv) and contiguous; fp16, bf16 or fp32 (computed as TF32).
template <class L>
at::Tensor implicit_forward(const L& launch, const DeformConvShape& s, const at::Tensor& input,
                            const at::Tensor& weight, const at::Tensor& offset, const std::optional<at::Tensor>& mask,
                            const std::optional<at::Tensor>& bias, int64_t groups) {
  const Geometry q = geometry_of(s, input, weight, groups);
  at::Tensor output = at::empty({input.size(0), weight.size(0), s.out_height, s.out_width}, input.options());
  if (output.numel() == 0) return output;
  const at::Tensor x = channels_last_input(input), w = tap_major_weight(weight, groups, s.taps());
  dispatch_tensor_core_types(input.scalar_type(), [&](auto tag) {
    using V = decltype(tag);
    const at::Tensor plan = sample_plan<V>(launch, s, input.size(0), offset, mask);
    launch(forward_kernel<V>, tiles(ceil_div(q.columns, kTile), ceil_div(q.out_per_group, kTile), groups),
           dim3(kBlockThreads), s, q, x.data_ptr<V>(), bytes_as<SamplePlan>(plan), w.data_ptr<V>(),
           optional_data<V>(bias, 0), output.data_ptr<V>());
  });
  return output;
}

// Backward: (grad_input, grad_weight, grad_offset, grad_mask, grad_bias). `deterministic`: the input gradient
// without atomics (everything else is deterministic anyway).
template <class L>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> implicit_backward(
    const L& launch, const DeformConvShape& s, const at::Tensor& grad_output, const at::Tensor& input,
    const at::Tensor& weight, const at::Tensor& offset, const std::optional<at::Tensor>& mask, int64_t groups,
    bool deterministic) {
  const Geometry q = geometry_of(s, input, weight, groups);
  const int64_t batch = input.size(0), K = s.taps(), P = s.pixels();
  const auto float_options = input.options().dtype(at::kFloat);
  at::Tensor grad_input = at::zeros_like(input), grad_weight = at::zeros_like(weight);
  at::Tensor grad_offset = at::zeros_like(offset);
  at::Tensor grad_mask = mask.has_value() ? at::zeros_like(*mask) : at::empty({0}, input.options());
  at::Tensor grad_bias =
      grad_output.sum({0, 2, 3}, /*keepdim=*/false, at::toOpMathType(grad_output.scalar_type())).to(weight.scalar_type());
  if (batch == 0 || grad_output.numel() == 0) return {grad_input, grad_weight, grad_offset, grad_mask, grad_bias};

  const at::Tensor chunks = channel_chunks(s, q, input.device());
  const int64_t n_chunks = chunk_count(chunks);
  const at::Tensor x = channels_last_input(input), w = tap_major_weight(weight, groups, K);
  at::Tensor partial = at::empty({n_chunks * K * 3 * q.columns}, float_options);

  dispatch_tensor_core_types(input.scalar_type(), [&](auto tag) {
    using V = decltype(tag);
    const at::Tensor plan = sample_plan<V>(launch, s, batch, offset, mask);
    const ChannelChunk* chunk_ptr = bytes_as<ChannelChunk>(chunks);
    const V* msk = optional_data<V>(mask, 0);

    // Input side: input gradient, and per-chunk partial sums of the offset and mask gradients.
    if (deterministic) {
      const int64_t per_chunk = images_per_chunk(s, batch, kImplicitColumnBudget);
      at::Tensor columns = at::empty({s.channels * K * per_chunk * P}, input.options());
      for (int64_t b0 = 0; b0 < batch; b0 += per_chunk) {
        const int64_t n = std::min(per_chunk, batch - b0);
        launch(input_grad_kernel<V>, tiles(ceil_div(n * P, kTile), n_chunks * K), dim3(kBlockThreads), s, q,
               chunk_ptr, b0 * P, (b0 + n) * P, x.data_ptr<V>(), offset.data_ptr<V>(), msk, w.data_ptr<V>(),
               grad_output.data_ptr<V>(), static_cast<float*>(nullptr), columns.data_ptr<V>(), b0, n,
               partial.data_ptr<float>());
        deterministic_input_grad<V>(launch, s, n, offset.data_ptr<V>() + b0 * offset.stride(0),
                                    optional_data<V>(mask, b0 * (mask ? mask->stride(0) : 0)), columns.data_ptr<V>(),
                                    grad_input.narrow(0, b0, n));
      }
    } else {
      at::Tensor acc = at::zeros({batch, s.height, s.width, s.channels}, float_options);
      launch(input_grad_kernel<V>, tiles(ceil_div(q.columns, kTile), n_chunks * K), dim3(kBlockThreads), s, q,
             chunk_ptr, int64_t(0), q.columns, x.data_ptr<V>(), offset.data_ptr<V>(), msk, w.data_ptr<V>(),
             grad_output.data_ptr<V>(), acc.data_ptr<float>(), static_cast<V*>(nullptr), int64_t(0), batch,
             partial.data_ptr<float>());
      grad_input.copy_(acc.permute({0, 3, 1, 2}));
    }
    launch(offset_mask_grad_kernel<V>, dim3(grid_for(batch * s.offset_groups * K * P)), dim3(kThreads), s, batch,
           q.columns, chunk_ptr, n_chunks, partial.data_ptr<float>(), msk, grad_offset.data_ptr<V>(),
           mask ? grad_mask.data_ptr<V>() : static_cast<V*>(nullptr));

    // Weight side: enough pixel splits to give every SM a few blocks, each split at least 8 K steps long.
    const int64_t out_tiles = n_chunks * K * ceil_div(q.out_per_group, kTile);
    const int64_t splits = std::max<int64_t>(1, std::min<int64_t>({ceil_div(4 * launch.multiprocessors(), out_tiles),
                                                                    ceil_div(q.columns, 8 * kStep), 65535}));
    const int64_t per_split = ceil_div(ceil_div(q.columns, splits), kStep) * kStep;
    const int64_t used_splits = ceil_div(q.columns, per_split);
    const int64_t size = weight.numel();
    at::Tensor partial_w = at::empty({used_splits * size}, float_options);
    launch(weight_grad_kernel<V>, tiles(n_chunks * K, ceil_div(q.out_per_group, kTile), used_splits),
           dim3(kBlockThreads), s, q, chunk_ptr, per_split, x.data_ptr<V>(), bytes_as<SamplePlan>(plan),
           grad_output.data_ptr<V>(), partial_w.data_ptr<float>());
    at::Tensor summed = at::empty({size}, float_options);
    launch(sum_splits_kernel, dim3(grid_for(size)), dim3(kThreads), partial_w.data_ptr<float>(), used_splits, size,
           summed.data_ptr<float>());
    grad_weight.copy_(summed.view({weight.size(0), K, q.in_per_group}).permute({0, 2, 1}).reshape(weight.sizes()));
  });
  return {grad_input, grad_weight, grad_offset, grad_mask, grad_bias};
}

}  // namespace
}  // namespace aecr
