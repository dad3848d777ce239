"""Modulated deformable convolution (DCNv2): the functional API."""
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _checks
from ._checks import ArgumentError, IntPair
from ._extension import require_extension

_OP = "deform_conv2d"


def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - (dilation * (kernel - 1) + 1)) // stride + 1


def check_deform_conv2d_args(input, offset, weight, bias, mask, stride, padding, dilation) -> Tuple[int, int]:
    """Checks the arguments of deform_conv2d; returns (groups, offset_groups)."""
    _checks.tensor(input, "input", 4, _OP)
    # Under autocast the op's autocast kernel casts the tensors to one dtype first.
    try:
        autocast = torch.is_autocast_enabled(input.device.type)
    except RuntimeError:  # a device type without autocast (meta)
        autocast = False
    if not autocast:
        _checks.floating_dtype(input, "input", _OP)
    _checks.tensor(offset, "offset", 4, _OP)
    _checks.tensor(weight, "weight", 4, _OP)
    _checks.tensor(mask, "mask", 4, _OP, optional=True)
    _checks.tensor(bias, "bias", 1, _OP, optional=True)
    # offset and mask (the sampling geometry) may be float32 beside float16 / bfloat16 features, as torchvision
    # takes them and autocast keeps them.
    low = input.dtype in (torch.float16, torch.bfloat16)
    for t, name in ((offset, "offset"), (weight, "weight"), (mask, "mask"), (bias, "bias")):
        geometry_fp32 = name in ("offset", "mask") and low and t is not None and t.dtype == torch.float32
        _checks.same_dtype_and_device(t, name, input, _OP, check_dtype=not autocast and not geometry_fp32)

    batch, channels, height, width = input.shape
    out_channels, channels_per_group, kh, kw = weight.shape
    if kh == 0 or kw == 0 or channels_per_group == 0:
        raise ArgumentError(f"{_OP}: `weight` [C_out, C_in/groups, kh, kw] must have a non-empty kernel and "
                            f"C_in/groups > 0, got shape {list(weight.shape)}")
    if channels % channels_per_group != 0:
        raise ArgumentError(f"{_OP}: `weight` has {channels_per_group} input channels per group, which does not "
                            f"divide the {channels} channels of `input` (weight shape {list(weight.shape)})")
    groups = channels // channels_per_group
    if out_channels % groups != 0:
        raise ArgumentError(f"{_OP}: {groups} weight groups (C_in / weight.shape[1]) must divide the "
                            f"{out_channels} output channels of `weight`")
    out_h = output_size(height, kh, stride[0], padding[0], dilation[0])
    out_w = output_size(width, kw, stride[1], padding[1], dilation[1])
    if out_h <= 0 or out_w <= 0:
        raise ArgumentError(f"{_OP}: the output would be empty: `input` {height}x{width} with a {kh}x{kw} kernel, "
                            f"stride {stride}, padding {padding}, dilation {dilation}")

    taps = kh * kw
    offset_channels = offset.shape[1]
    if offset_channels == 0 or offset_channels % (2 * taps) != 0 or channels % (offset_channels // (2 * taps)) != 0:
        raise ArgumentError(
            f"{_OP}: `offset` must have 2*offset_groups*kh*kw channels with offset_groups dividing the {channels} "
            f"input channels (kh*kw = {taps}), got shape {list(offset.shape)}")
    offset_groups = offset_channels // (2 * taps)
    expected = [batch, offset_channels, out_h, out_w]
    if list(offset.shape) != expected:
        raise ArgumentError(f"{_OP}: `offset` must have shape [B, 2*offset_groups*kh*kw, Ho, Wo] = {expected}, "
                            f"got {list(offset.shape)}")
    if mask is not None:
        expected = [batch, offset_groups * taps, out_h, out_w]
        if list(mask.shape) != expected:
            raise ArgumentError(f"{_OP}: `mask` must have shape [B, offset_groups*kh*kw, Ho, Wo] = {expected}, "
                                f"got {list(mask.shape)}")
    if bias is not None and bias.shape[0] != out_channels:
        raise ArgumentError(f"{_OP}: `bias` must have shape [{out_channels}] (C_out), got {list(bias.shape)}")
    return groups, offset_groups


def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    mask: Optional[Tensor] = None,
) -> Tensor:
    r"""Modulated deformable convolution (DCNv2, Zhu et al., CVPR 2019; DCNv1 without a mask).

    A drop-in for :func:`torchvision.ops.deform_conv2d`: same arguments in the same order, same results (under
    CUDA autocast it computes the features in the autocast dtype and keeps ``offset`` and ``mask`` in float32,
    where torchvision's computes everything in float32). ``offset`` and ``mask`` may be float32 beside float16 /
    bfloat16 ``input``; their gradients come back in their own dtype.

    .. math::
        out[b,o,y,x] = bias[o] + \sum_{c \in G(o)} \sum_{i,j} W[o,c,i,j]\, m_{b,g(c),k}(y,x)\,
        \mathrm{bilinear}(input[b,c],\ y s_h - p_h + i d_h + \Delta y,\ x s_w - p_w + j d_w + \Delta x)

    Args:
        input: ``[B, C_in, H, W]``.
        offset: ``[B, 2*offset_groups*kh*kw, Ho, Wo]``; for offset group g and tap k = i*kw + j, channel
            ``2*(g*kh*kw + k)`` holds the y displacement and the next one the x displacement.
        weight: ``[C_out, C_in/groups, kh, kw]``; the weight groups are ``C_in // weight.shape[1]``.
        bias: ``[C_out]`` or None.
        stride, padding, dilation: an int or a pair (h, w).
        mask: ``[B, offset_groups*kh*kw, Ho, Wo]`` modulation scalars, or None (all ones).

    Returns:
        ``[B, C_out, Ho, Wo]`` with ``Ho = (H + 2*pad_h - (dil_h*(kh-1) + 1)) // stride_h + 1`` (``Wo`` alike).

    float32 and float64 on the CPU and CUDA, float16 and bfloat16 on CUDA (coordinates and sums in float32).
    Samples outside the image read zeros (a NaN or Inf pixel reaches only the samples whose bilinear corners
    include it, as in torchvision); a non-finite offset samples zero. On CUDA the environment variable
    ``AECR_DCN_CUDA_PATH=implicit`` selects the implicit-GEMM tensor-core path (fp16, bf16, fp32 with TF32
    matmuls allowed; opt-in until verified on a GPU); the default ``simple`` path is the reference.

    Example::

        >>> x = torch.randn(1, 8, 16, 16)
        >>> w = torch.randn(4, 8, 3, 3)
        >>> offset = torch.randn(1, 2 * 9, 16, 16)
        >>> mask = torch.rand(1, 9, 16, 16)
        >>> aecr_ops.deform_conv2d(x, offset, w, padding=1, mask=mask).shape
        torch.Size([1, 4, 16, 16])
    """
    stride = _checks.pair(stride, "stride", 1, _OP)
    padding = _checks.pair(padding, "padding", 0, _OP)
    dilation = _checks.pair(dilation, "dilation", 1, _OP)
    groups, offset_groups = check_deform_conv2d_args(input, offset, weight, bias, mask, stride, padding, dilation)
    require_extension()
    return torch.ops.aecr_ops.deform_conv2d(
        input, weight, offset, mask, bias, list(stride), list(padding), list(dilation), groups, offset_groups)


def deform_conv2d_path(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    mask: Optional[Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
) -> str:
    """Which implementation :func:`deform_conv2d` runs for these arguments now.

    ``"cpu"`` for CPU tensors; on CUDA ``"simple"`` or ``"implicit"``, which depends on ``AECR_DCN_CUDA_PATH``,
    the dtype, ``torch.backends.cuda.matmul.allow_tf32`` and the GPU (the implicit path silently falls back to the
    simple one where it does not apply). Benchmarks label their measurements with it. Same arguments as
    :func:`deform_conv2d` (bias aside). A query for eager code: it has no fake kernel, so not inside
    ``torch.compile``.
    """
    stride = _checks.pair(stride, "stride", 1, _OP)
    padding = _checks.pair(padding, "padding", 0, _OP)
    dilation = _checks.pair(dilation, "dilation", 1, _OP)
    groups, offset_groups = check_deform_conv2d_args(input, offset, weight, None, mask, stride, padding, dilation)
    require_extension()
    return torch.ops.aecr_ops.deform_conv2d_path(
        input, weight, offset, mask, list(stride), list(padding), list(dilation), groups, offset_groups)


def workspace_bytes() -> int:
    """Bytes of the CPU column workspaces that :func:`deform_conv2d` keeps between calls.

    At most one buffer per dtype is kept, and only within the column budget (64 MB): the column work is cut into
    chunks of images, or of the pixels of one image, that fit it, so no buffer grows with the image size. (CUDA
    buffers come from PyTorch's caching allocator: ``torch.cuda.memory_reserved``.)
    """
    require_extension()
    return torch.ops.aecr_ops.workspace_bytes()


def release_workspaces() -> int:
    """Frees the CPU column workspaces kept between calls (see :func:`workspace_bytes`); returns the bytes freed.

    The next call allocates afresh. A workspace in use by a call running in another thread is freed when that
    call ends. For CUDA, ``torch.cuda.empty_cache()`` returns the caching allocator's memory.
    """
    require_extension()
    return torch.ops.aecr_ops.release_workspaces()
