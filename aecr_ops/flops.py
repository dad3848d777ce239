"""FLOP formulas of the aecr ops for :class:`torch.utils.flop_counter.FlopCounterMode`.

``FlopCounterMode`` counts only the operators it has a formula for; a custom operator without one counts zero,
so AECR-Net's two deformable convolutions (4.8 GFLOPs each at 256x256) would silently disappear from its count.
Importing this module registers a formula for each of

- ``aecr_ops::deform_conv2d`` and ``aecr_ops::deform_conv2d_backward`` (the latter honouring ``output_mask``:
  only the gradients asked for are counted, as only they are computed),
- ``aecr_ops::patch_statistics`` and ``aecr_ops::patch_statistics_backward`` (FastDeconv's patch covariance),
- ``aecr_ops::isqrt_newton_schulz`` and ``aecr_ops::isqrt_newton_schulz_backward`` (its inverse square root),

following flop_counter's convention: **2 FLOPs per multiply-accumulate**, shape-based (independent of values and
dtype), dense conv and matmul work as ``2 * m * n * k`` exactly as flop_counter's own ``aten.convolution`` and
``aten.mm`` formulas count it. The formulas are plain functions of shapes (:func:`deform_conv2d_flops`,
:func:`deform_conv2d_backward_flops`, :func:`patch_statistics_flops`, ...), usable without the compiled
extension; the registration needs the extension (without it there is nothing to count) and is idempotent:
importing this module again, or calling :func:`register_flop_formulas` twice, replaces this module's formulas
and leaves formulas registered by anyone else alone.

Example::

    >>> from torch.utils.flop_counter import FlopCounterMode
    >>> import aecr_ops, aecr_ops.flops
    >>> x, w = torch.randn(1, 8, 16, 16), torch.randn(4, 8, 3, 3)
    >>> offset, mask = torch.randn(1, 18, 16, 16), torch.rand(1, 9, 16, 16)
    >>> with FlopCounterMode(display=False) as counter:
    ...     aecr_ops.deform_conv2d(x, offset, w, padding=1, mask=mask)
    >>> counter.get_total_flops() == aecr_ops.flops.deform_conv2d_flops(
    ...     (1, 8, 16, 16), (4, 8, 3, 3), (1, 18, 16, 16), True, False, (1, 1), (1, 1), (1, 1), 1, 1)
    True
"""
from typing import Dict, Optional, Sequence, Tuple

import torch

__all__ = [
    "deform_conv2d_flops", "deform_conv2d_flop_breakdown", "deform_conv2d_backward_flops",
    "deform_conv2d_backward_flop_breakdown", "patch_statistics_flops", "patch_statistics_backward_flops",
    "isqrt_newton_schulz_flops", "isqrt_newton_schulz_backward_flops", "register_flop_formulas",
    "BILINEAR_FLOPS", "POINT_FLOPS",
]

Shape = Sequence[int]

#: FLOPs of one bilinear interpolation once its four corner weights are known: 4 multiplies + 3 adds.
BILINEAR_FLOPS = 7
#: FLOPs per sampling point (image, offset group, tap, output pixel) to get its four corner weights, shared by
#: the channels of the offset group: y = grid_y + dy and x = grid_x + dx (2 adds), the fractional parts
#: ly = y - floor(y), lx = x - floor(x) (2 subtractions), hy = 1 - ly, hx = 1 - lx (2 subtractions) and the
#: weights hy*hx, hy*lx, ly*hx, ly*lx (4 multiplies). Integer index arithmetic and bounds tests are not counted.
POINT_FLOPS = 10


def _pair(value, name: str) -> Tuple[int, int]:
    if isinstance(value, int):
        return value, value
    values = tuple(int(v) for v in value)
    if len(values) != 2:
        raise ValueError(f"deform_conv2d_flops: `{name}` must be an int or a pair, got {value!r}")
    return values


def _output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - (dilation * (kernel - 1) + 1)) // stride + 1


def _dcn_shape(input_shape: Shape, weight_shape: Shape, offset_shape: Optional[Shape], stride, padding, dilation,
               groups: int, offset_groups: int):
    """(B, C_in, C_out, C_in/groups, taps, output pixels), checked against each other."""
    batch, channels, height, width = (int(v) for v in input_shape)
    out_channels, channels_per_group, kh, kw = (int(v) for v in weight_shape)
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    out_h = _output_size(height, kh, stride[0], padding[0], dilation[0])
    out_w = _output_size(width, kw, stride[1], padding[1], dilation[1])
    if groups < 1 or channels_per_group * groups != channels:
        raise ValueError(f"deform_conv2d_flops: {groups} groups of weight {list(weight_shape)} do not match the "
                         f"{channels} input channels")
    if offset_groups < 1 or channels % offset_groups:
        raise ValueError(f"deform_conv2d_flops: offset_groups={offset_groups} must divide the {channels} channels")
    if offset_shape is not None:
        expected = [batch, 2 * offset_groups * kh * kw, out_h, out_w]
        if [int(v) for v in offset_shape] != expected:
            raise ValueError(f"deform_conv2d_flops: offset shape {list(offset_shape)} does not match the input, "
                             f"weight and offset_groups (expected {expected})")
    return batch, channels, out_channels, channels_per_group, kh * kw, out_h * out_w


def deform_conv2d_flop_breakdown(input_shape: Shape, weight_shape: Shape, offset_shape: Optional[Shape],
                                 has_mask: bool, has_bias: bool, stride=1, padding=0, dilation=1, groups: int = 1,
                                 offset_groups: int = 1) -> Dict[str, int]:
    """The parts of :func:`deform_conv2d_flops`, by name (their sum is the total)."""
    b, c_in, c_out, c_group, taps, pixels = _dcn_shape(input_shape, weight_shape, offset_shape, stride, padding,
                                                       dilation, groups, offset_groups)
    samples = b * c_in * taps * pixels          # sampled values: one per (image, channel, tap, output pixel)
    points = b * offset_groups * taps * pixels  # sampling points: shared by the channels of an offset group
    return {
        "conv": 2 * b * c_out * c_group * taps * pixels,
        "bilinear": BILINEAR_FLOPS * samples,
        "sampling_points": POINT_FLOPS * points,
        "modulation": samples if has_mask else 0,
        "bias": b * c_out * pixels if has_bias else 0,
    }


def deform_conv2d_flops(input_shape: Shape, weight_shape: Shape, offset_shape: Optional[Shape], has_mask: bool,
                        has_bias: bool, stride=1, padding=0, dilation=1, groups: int = 1,
                        offset_groups: int = 1) -> int:
    """FLOPs of one forward of modulated deformable convolution (DCNv2; DCNv1 without a mask).

    With B images, C_in input and C_out output channels, K = kh*kw taps, P = Ho*Wo output pixels, the
    S = B*C_in*K*P sampled values and the Q = B*offset_groups*K*P sampling points (one per image, offset group,
    tap and output pixel; the channels of an offset group share its points):

    - ``conv``: the dense convolution of the sampled columns, ``2 * B * C_out * (C_in/groups) * K * P``: exactly
      what ``torch.utils.flop_counter`` counts for ``aten.convolution`` of the same shapes (2 FLOPs per
      multiply-accumulate; it counts no bias);
    - ``bilinear``: ``7 * S``, each sampled value being the bilinear interpolation of 4 input pixels with its
      point's 4 corner weights (4 multiplies + 3 adds). Corners outside the image read zero but are counted;
    - ``sampling_points``: ``10 * Q``, the corner weights of each point (:data:`POINT_FLOPS`: 2 adds of the offset
      to the grid position, 2 + 2 subtractions for the fractional parts and their complements, 4 multiplies);
    - ``modulation``: ``S`` with a mask (each sampled value times its point's mask scalar), 0 without;
    - ``bias``: ``B * C_out * P`` adds with a bias, 0 without.

    Not counted: integer index arithmetic, bounds tests, memory traffic, and the offset / mask predictor that
    usually precedes the layer (a separate convolution, counted as one). The sampling adds about
    (8*C_in + 10*offset_groups) / (2*C_out*C_in/groups) to the dense work: 1.6% for AECR-Net's 256-channel layer.

    Args:
        input_shape: ``[B, C_in, H, W]``; weight_shape: ``[C_out, C_in/groups, kh, kw]``;
        offset_shape: ``[B, 2*offset_groups*kh*kw, Ho, Wo]`` (checked against the others) or None.
        has_mask, has_bias: whether a mask / a bias is given.
        stride, padding, dilation: ints or pairs; groups, offset_groups: as in ``aecr_ops.deform_conv2d``.
    Returns:
        the FLOPs, an int.
    """
    return sum(deform_conv2d_flop_breakdown(input_shape, weight_shape, offset_shape, has_mask, has_bias, stride,
                                            padding, dilation, groups, offset_groups).values())


_GRADIENTS = ("input", "weight", "offset", "mask", "bias")


def deform_conv2d_backward_flop_breakdown(input_shape: Shape, weight_shape: Shape, offset_shape: Optional[Shape],
                                          has_mask: bool, stride=1, padding=0, dilation=1, groups: int = 1,
                                          offset_groups: int = 1,
                                          output_mask: Sequence[bool] = (True,) * 5) -> Dict[str, int]:
    """The parts of :func:`deform_conv2d_backward_flops`, by name (their sum is the total)."""
    b, c_in, c_out, c_group, taps, pixels = _dcn_shape(input_shape, weight_shape, offset_shape, stride, padding,
                                                       dilation, groups, offset_groups)
    if len(output_mask) != 5:
        raise ValueError(f"deform_conv2d_backward_flops: `output_mask` must have 5 entries "
                         f"{_GRADIENTS}, got {list(output_mask)}")
    needs = dict(zip(_GRADIENTS, (bool(v) for v in output_mask)))
    needs["mask"] = needs["mask"] and has_mask
    samples = b * c_in * taps * pixels
    points = b * offset_groups * taps * pixels
    gemm = 2 * b * c_out * c_group * taps * pixels
    scale = 1 if has_mask else 0  # the column gradient (or column) times the mask, per sampled value
    sampled = needs["input"] or needs["weight"] or needs["offset"] or needs["mask"]
    return {
        "column_grad": gemm if needs["input"] or needs["offset"] or needs["mask"] else 0,
        "sampling_points": POINT_FLOPS * points if sampled else 0,
        "grad_input": (scale + 8) * samples if needs["input"] else 0,
        "grad_offset": (scale + 14) * samples if needs["offset"] else 0,
        "grad_mask": (BILINEAR_FLOPS + 2) * samples if needs["mask"] else 0,
        "grad_weight": (BILINEAR_FLOPS + scale) * samples + gemm if needs["weight"] else 0,
        "grad_bias": b * c_out * pixels if needs["bias"] else 0,
    }


def deform_conv2d_backward_flops(input_shape: Shape, weight_shape: Shape, offset_shape: Optional[Shape],
                                 has_mask: bool, stride=1, padding=0, dilation=1, groups: int = 1,
                                 offset_groups: int = 1, output_mask: Sequence[bool] = (True,) * 5) -> int:
    """FLOPs of ``aecr_ops::deform_conv2d_backward`` for the gradients ``output_mask`` asks for, in the order
    (input, weight, offset, mask, bias); the mask gradient counts only with a mask. Same notation as
    :func:`deform_conv2d_flops` (S sampled values, Q sampling points, ``gemm`` = the forward's ``conv`` part):

    - ``column_grad``: ``gemm``, the column gradient W^T grad_out, once if the input, offset or mask gradient is
      asked for (they share it);
    - ``sampling_points``: ``10 * Q``, the corner weights, once if any gradient but the bias's is asked for;
    - ``grad_input``: ``8 * S`` (+ ``S`` with a mask: the column gradient times the mask): the column gradient
      scattered to the 4 corners (4 multiplies by the corner weights + 4 accumulations);
    - ``grad_offset``: ``14 * S`` (+ ``S`` with a mask): the derivatives of the bilinear value along y and x
      (2 subtractions + 2 multiplies + 1 add each) times the column gradient, accumulated over the channels
      (2 multiplies + 2 adds);
    - ``grad_mask``: ``9 * S``: the bilinear value (7) times the column gradient, accumulated (2);
    - ``grad_weight``: the (modulated) sampled columns, ``7 * S`` (+ ``S`` with a mask), and their product with
      grad_out, ``gemm``;
    - ``grad_bias``: ``B * C_out * Ho * Wo`` adds.

    Each gradient is counted as if computed on its own but for the two shared parts named above (the kernel also
    reuses, e.g., the columns of the offset / mask pass for the weight gradient; the difference is below 1% of
    the total for AECR-Net's layer).
    """
    return sum(deform_conv2d_backward_flop_breakdown(input_shape, weight_shape, offset_shape, has_mask, stride,
                                                     padding, dilation, groups, offset_groups, output_mask).values())


# ---- FastDeconv ops ---------------------------------------------------------------------------------------------

def _patch_matrices(input_shape: Shape, kernel_size, dilation, padding, sampling_stride: int, block: int,
                    groups: int) -> Tuple[int, int, int]:
    """(matrices, rows M of each, features F) of patch_statistics, as in csrc/fastdeconv_driver.h."""
    n, c, h, w = (int(v) for v in input_shape)
    kh, kw = _pair(kernel_size, "kernel_size")
    dh, dw = _pair(dilation, "dilation")
    ph, pw = _pair(padding, "padding")
    if kh == 1 and kw == 1:  # every sampling_stride**2-th pixel of the flattened N*H*W grid
        step = sampling_stride * sampling_stride
        rows = (n * h * w + step - 1) // step
    else:
        rows = n * _output_size(h, kh, sampling_stride, ph, dh) * _output_size(w, kw, sampling_stride, pw, dw)
    interleave = c // block if groups == 1 else 1
    return groups, rows * interleave, kh * kw * block


def patch_statistics_flops(input_shape: Shape, kernel_size, dilation, padding, sampling_stride: int, block: int,
                           groups: int) -> int:
    """FLOPs of ``aecr_ops::patch_statistics``: for each of the G matrices of M patch rows and F features, the
    mean (``M*F`` adds), the centring (``M*F`` subtractions), the covariance X^T X (``2*M*F*F``, a GEMM as
    flop_counter counts ``aten.mm``) and its normalisation plus eps on the diagonal (``2*F*F``)."""
    g, m, f = _patch_matrices(input_shape, kernel_size, dilation, padding, sampling_stride, block, groups)
    return g * (2 * m * f + 2 * m * f * f + 2 * f * f)


def patch_statistics_backward_flops(input_shape: Shape, kernel_size, dilation, padding, sampling_stride: int,
                                    block: int, groups: int) -> int:
    """FLOPs of ``aecr_ops::patch_statistics_backward``: per matrix, (G + G^T)/M (``2*F*F``), the centred rows
    (``M*F``), each row's gradient grad_mean/M + x (G + G^T)/M (``2*M*F*F + M*F``) and its accumulation into the
    input elements the patch read (``M*F``)."""
    g, m, f = _patch_matrices(input_shape, kernel_size, dilation, padding, sampling_stride, block, groups)
    return g * (2 * f * f + 3 * m * f + 2 * m * f * f)


def isqrt_newton_schulz_flops(a_shape: Shape, n_iter: int) -> int:
    """FLOPs of ``aecr_ops::isqrt_newton_schulz`` on B matrices F x F, counted as the iteration is written:
    ``n_iter`` times three matrix products (Z Y, Y T, T Z: ``6*F^3``) and ``T = (3I - ZY)/2`` (``2*F*F``); plus
    the Frobenius norm (``2*F*F``) and the two scalings (``2*F*F``). Above 48 features the kernel evaluates the
    same polynomial through a symmetric eigendecomposition instead, whose cost is not a fixed FLOP count; the
    formula still counts the iteration."""
    b, f = int(a_shape[0]), int(a_shape[-1])
    return b * (n_iter * (6 * f ** 3 + 2 * f * f) + 4 * f * f)


def isqrt_newton_schulz_backward_flops(a_shape: Shape, n_iter: int) -> int:
    """FLOPs of ``aecr_ops::isqrt_newton_schulz_backward``: the iteration recomputed (it keeps no iterates,
    ``3`` products per step) and its reverse pass (two products per product: ``6`` per step), so ``18*F^3`` per
    step, plus ``4*F*F`` per step for T and its gradient and ``10*F*F`` for the normalisation's gradient."""
    b, f = int(a_shape[0]), int(a_shape[-1])
    return b * (n_iter * (18 * f ** 3 + 4 * f * f) + 10 * f * f)


# ---- Registration with torch.utils.flop_counter -----------------------------------------------------------------

def _dcn_forward_formula(input_shape, weight_shape, offset_shape, mask_shape, bias_shape, stride, padding,
                         dilation, groups, offset_groups, *args, out_shape=None, **kwargs) -> int:
    return deform_conv2d_flops(input_shape, weight_shape, offset_shape, mask_shape is not None,
                               bias_shape is not None, stride, padding, dilation, groups, offset_groups)


def _dcn_backward_formula(grad_output_shape, input_shape, weight_shape, offset_shape, mask_shape, stride, padding,
                          dilation, groups, offset_groups, output_mask=(True,) * 5, *args, out_shape=None,
                          **kwargs) -> int:
    return deform_conv2d_backward_flops(input_shape, weight_shape, offset_shape, mask_shape is not None, stride,
                                        padding, dilation, groups, offset_groups, output_mask)


def _patch_statistics_formula(input_shape, kernel_size, dilation, padding, sampling_stride, block, groups, *args,
                              out_shape=None, **kwargs) -> int:
    return patch_statistics_flops(input_shape, kernel_size, dilation, padding, sampling_stride, block, groups)


def _patch_statistics_backward_formula(grad_mean_shape, grad_cov_shape, input_shape, mean_shape, kernel_size,
                                       dilation, padding, sampling_stride, block, groups, *args, out_shape=None,
                                       **kwargs) -> int:
    return patch_statistics_backward_flops(input_shape, kernel_size, dilation, padding, sampling_stride, block,
                                           groups)


def _isqrt_formula(a_shape, n_iter, *args, out_shape=None, **kwargs) -> int:
    return isqrt_newton_schulz_flops(a_shape, n_iter)


def _isqrt_backward_formula(grad_shape, a_shape, result_shape, saved_shape, n_iter, *args, out_shape=None,
                            **kwargs) -> int:
    return isqrt_newton_schulz_backward_flops(a_shape, n_iter)


_FORMULAS = {
    "deform_conv2d": _dcn_forward_formula,
    "deform_conv2d_backward": _dcn_backward_formula,
    "patch_statistics": _patch_statistics_formula,
    "patch_statistics_backward": _patch_statistics_backward_formula,
    "isqrt_newton_schulz": _isqrt_formula,
    "isqrt_newton_schulz_backward": _isqrt_backward_formula,
}
for _formula in _FORMULAS.values():
    _formula._aecr_flops = True  # marks this module's formulas (functools.wraps carries it to the wrapper)


def register_flop_formulas() -> bool:
    """Registers the formulas with ``torch.utils.flop_counter`` (for FlopCounterModes constructed afterwards: each
    copies the registry when it is made). Idempotent: a formula of this module already registered is replaced; a
    formula someone else registered for the same op is left in place. Returns False, registering nothing, where
    the compiled extension is not loaded (the ops then do not exist)."""
    from torch.utils import flop_counter

    from ._extension import extension_loaded
    if not extension_loaded():
        return False
    for name, formula in _FORMULAS.items():
        packet = getattr(torch.ops.aecr_ops, name)
        existing = flop_counter.flop_registry.get(packet)
        if existing is not None:
            if not getattr(existing, "_aecr_flops", False):
                continue  # someone else's formula: theirs stays
            del flop_counter.flop_registry[packet]
        flop_counter.register_flop_formula(packet)(formula)
    return True


register_flop_formulas()
