"""Fake (meta) kernels and autograd of the aecr ops, registered on the ops defined in csrc/ops.cpp."""
import torch

from .deform_conv import output_size


def _result_format(input):
    """The memory format of deform_conv2d's output and input gradient: channels-last on the CPU when the input is
    (as F.conv2d decides, by at::Tensor::suggest_memory_format), contiguous otherwise (CUDA's kernels)."""
    if input.device.type == "cpu" and torch._prims_common.suggest_memory_format(input) == torch.channels_last:
        return torch.channels_last
    return torch.contiguous_format


@torch.library.register_fake("aecr_ops::deform_conv2d")
def _deform_conv2d_fake(input, weight, offset, mask, bias, stride, padding, dilation, groups, offset_groups):
    out_h = output_size(input.shape[2], weight.shape[2], stride[0], padding[0], dilation[0])
    out_w = output_size(input.shape[3], weight.shape[3], stride[1], padding[1], dilation[1])
    return input.new_empty((input.shape[0], weight.shape[0], out_h, out_w)).contiguous(
        memory_format=_result_format(input))


@torch.library.register_fake("aecr_ops::deform_conv2d_backward")
def _deform_conv2d_backward_fake(grad_output, input, weight, offset, mask, stride, padding, dilation, groups,
                                 offset_groups, output_mask=(True, True, True, True, True)):
    needs_input, needs_weight, needs_offset, needs_mask, needs_bias = output_mask
    def none():  # a new one for each: the outputs must not alias
        return input.new_empty((0,))

    return (input.new_empty(input.shape).contiguous(memory_format=_result_format(input)) if needs_input else none(),
            weight.new_empty(weight.shape) if needs_weight else none(),
            offset.new_empty(offset.shape) if needs_offset else none(),
            mask.new_empty(mask.shape) if mask is not None and needs_mask else none(),
            weight.new_empty((weight.shape[0],)) if needs_bias else none())


def _deform_conv2d_setup_context(ctx, inputs, output):
    input, weight, offset, mask, bias, stride, padding, dilation, groups, offset_groups = inputs
    ctx.save_for_backward(input, weight, offset, mask)
    ctx.config = (stride, padding, dilation, groups, offset_groups)
    ctx.has_mask = mask is not None
    ctx.has_bias = bias is not None


def _deform_conv2d_backward(ctx, grad_output):
    input, weight, offset, mask = ctx.saved_tensors
    needs = ctx.needs_input_grad
    # Only the gradients autograd needs are computed (a frozen weight, a first layer's input, a constant offset...).
    output_mask = [needs[0], needs[1], needs[2], ctx.has_mask and needs[3], ctx.has_bias and needs[4]]
    grads = torch.ops.aecr_ops.deform_conv2d_backward(grad_output, input, weight, offset, mask, *ctx.config,
                                                      output_mask)
    return tuple(g if wanted else None for g, wanted in zip(grads, output_mask)) + (None,) * 5


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "aecr_ops.deform_conv2d does not support double backward (gradients of its gradients, e.g. "
        "torch.autograd.grad(..., create_graph=True) followed by another backward)")


torch.library.register_autograd(
    "aecr_ops::deform_conv2d", _deform_conv2d_backward, setup_context=_deform_conv2d_setup_context)
torch.library.register_autograd(
    "aecr_ops::deform_conv2d_backward", _no_double_backward, setup_context=lambda ctx, inputs, output: None)


# ---- FastDeconv ops --------------------------------------------------------------------------------------------

@torch.library.register_fake("aecr_ops::patch_statistics")
def _patch_statistics_fake(input, kernel_size, dilation, padding, sampling_stride, block, groups, eps):
    features = kernel_size[0] * kernel_size[1] * block
    return input.new_empty((groups, features)), input.new_empty((groups, features, features))


@torch.library.register_fake("aecr_ops::patch_statistics_backward")
def _patch_statistics_backward_fake(grad_mean, grad_cov, input, mean, kernel_size, dilation, padding,
                                    sampling_stride, block, groups):
    return input.new_empty(input.shape)


def _patch_statistics_setup_context(ctx, inputs, output):
    input, kernel_size, dilation, padding, sampling_stride, block, groups, eps = inputs
    ctx.save_for_backward(input, output[0])
    ctx.config = (kernel_size, dilation, padding, sampling_stride, block, groups)


def _patch_statistics_backward(ctx, grad_mean, grad_cov):
    if not ctx.needs_input_grad[0]:
        return (None,) * 8
    input, mean = ctx.saved_tensors
    grad_input = torch.ops.aecr_ops.patch_statistics_backward(grad_mean, grad_cov, input, mean, *ctx.config)
    return (grad_input,) + (None,) * 7


# Matrices up to this size run the iteration in matrix form (kNsFusedMaxFeatures in newton_schulz.h); larger
# ones, on the CPU, in spectral form, which returns their eigenbasis for the backward (on CUDA as batched GEMMs,
# which return nothing).
NS_FUSED_MAX_FEATURES = 48


def isqrt_saves_eigenbasis(a):
    """Whether isqrt_newton_schulz's second output for `a` is its eigenbasis [B, F + 1, F] (else [0])."""
    return a.shape[-1] > NS_FUSED_MAX_FEATURES and a.device.type == "cpu"


@torch.library.register_fake("aecr_ops::isqrt_newton_schulz")
def _isqrt_fake(a, n_iter):
    batch, f = a.shape[0], a.shape[-1]
    saved = a.new_empty((batch, f + 1, f)) if isqrt_saves_eigenbasis(a) else a.new_empty((0,))
    return a.new_empty(a.shape), saved


@torch.library.register_fake("aecr_ops::isqrt_newton_schulz_backward")
def _isqrt_backward_fake(grad, a, result, saved, n_iter):
    return a.new_empty(a.shape)


@torch.library.register_fake("aecr_ops::fastdeconv_update_running")
def _update_running_fake(running_mean, running_deconv, mean, deconv, momentum):
    return mean.new_empty((), dtype=torch.bool)


def _isqrt_setup_context(ctx, inputs, output):
    a, n_iter = inputs
    ctx.save_for_backward(a, *output)
    ctx.n_iter = n_iter


def _isqrt_backward(ctx, grad, grad_saved):
    a, result, saved = ctx.saved_tensors
    return torch.ops.aecr_ops.isqrt_newton_schulz_backward(grad, a, result, saved, ctx.n_iter), None


def _no_double_backward_of(name):
    def backward(ctx, *grads):
        raise RuntimeError(f"aecr_ops.{name} does not support double backward (gradients of its gradients)")
    return backward


torch.library.register_autograd("aecr_ops::patch_statistics", _patch_statistics_backward,
                                setup_context=_patch_statistics_setup_context)
torch.library.register_autograd("aecr_ops::isqrt_newton_schulz", _isqrt_backward, setup_context=_isqrt_setup_context)
for _name, _op in (("patch_statistics", "patch_statistics_backward"),
                   ("isqrt_newton_schulz", "isqrt_newton_schulz_backward")):
    torch.library.register_autograd(f"aecr_ops::{_op}", _no_double_backward_of(_name),
                                    setup_context=lambda ctx, inputs, output: None)
