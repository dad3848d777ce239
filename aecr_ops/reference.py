"""Pure-PyTorch references of the aecr ops, written for clarity, not speed. They need no compiled code.

Run them in float64 to check the kernels: autograd through them gives the reference gradients.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from ._checks import IntPair, pair

__all__ = ["deform_conv2d", "bilinear_sample"]


def bilinear_sample(image: Tensor, h: Tensor, w: Tensor) -> Tensor:
    """Samples ``image`` [N, C, H, W] at positions ``h``, ``w`` [N, S] with zero padding; returns [N, C, S].

    A sample at h <= -1, h >= H, w <= -1 or w >= W, or at a non-finite position, is 0 (and so are its
    derivatives). Derivatives with respect to h and w are those of the floor-based bilinear formula.
    """
    n, c, height, width = image.shape
    inside = (h > -1) & (h < height) & (w > -1) & (w < width)
    h = torch.where(inside, h, torch.zeros_like(h))  # keeps floor() and the index below finite
    w = torch.where(inside, w, torch.zeros_like(w))
    h0 = torch.floor(h).detach()
    w0 = torch.floor(w).detach()
    lh, lw = h - h0, w - w0
    flat = image.reshape(n, c, height * width)
    out = image.new_zeros(n, c, h.shape[1])
    for dy, wy in ((0, 1 - lh), (1, lh)):
        for dx, wx in ((0, 1 - lw), (1, lw)):
            hy, wxi = (h0 + dy).long(), (w0 + dx).long()
            valid = inside & (hy >= 0) & (hy < height) & (wxi >= 0) & (wxi < width)
            index = torch.where(valid, hy * width + wxi, torch.zeros_like(hy))
            values = torch.gather(flat, 2, index.unsqueeze(1).expand(n, c, index.shape[1]))
            weight = torch.where(valid, wy * wx, torch.zeros_like(wy))
            out = out + weight.unsqueeze(1) * values
    return out


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
    """Reference of :func:`aecr_ops.deform_conv2d` (same arguments, same layout), in the input's dtype.

    Shapes: input [B, C, H, W], offset [B, 2*OG*kh*kw, Ho, Wo], weight [C_out, C/groups, kh, kw],
    mask [B, OG*kh*kw, Ho, Wo] or None, bias [C_out] or None; returns [B, C_out, Ho, Wo].
    """
    (sh, sw) = pair(stride, "stride", 1, "reference.deform_conv2d")
    (ph, pw) = pair(padding, "padding", 0, "reference.deform_conv2d")
    (dh, dw) = pair(dilation, "dilation", 1, "reference.deform_conv2d")
    b, c, height, width = input.shape
    c_out, c_per_group, kh, kw = weight.shape
    groups = c // c_per_group
    taps = kh * kw
    offset_groups = offset.shape[1] // (2 * taps)
    out_h, out_w = offset.shape[2], offset.shape[3]
    pixels = out_h * out_w

    # Regular grid positions of every (tap, output pixel): [K, Ho*Wo].
    ys = torch.arange(out_h, dtype=input.dtype, device=input.device) * sh - ph
    xs = torch.arange(out_w, dtype=input.dtype, device=input.device) * sw - pw
    ki = torch.arange(kh, dtype=input.dtype, device=input.device) * dh
    kj = torch.arange(kw, dtype=input.dtype, device=input.device) * dw
    grid_h = (ki[:, None, None, None] + ys[None, None, :, None]).expand(kh, kw, out_h, out_w).reshape(taps, pixels)
    grid_w = (kj[None, :, None, None] + xs[None, None, None, :]).expand(kh, kw, out_h, out_w).reshape(taps, pixels)

    off = offset.reshape(b, offset_groups, taps, 2, pixels)
    pos_h = grid_h + off[:, :, :, 0]  # [B, OG, K, P]
    pos_w = grid_w + off[:, :, :, 1]
    images = input.reshape(b * offset_groups, c // offset_groups, height, width)
    samples = bilinear_sample(images, pos_h.reshape(b * offset_groups, taps * pixels),
                              pos_w.reshape(b * offset_groups, taps * pixels))
    samples = samples.reshape(b, offset_groups, c // offset_groups, taps, pixels)
    if mask is not None:
        samples = samples * mask.reshape(b, offset_groups, 1, taps, pixels)

    columns = samples.reshape(b, groups, c_per_group * taps, pixels)
    w = weight.reshape(groups, c_out // groups, c_per_group * taps)
    out = torch.einsum("gok,bgkp->bgop", w, columns).reshape(b, c_out, out_h, out_w)
    if bias is not None:
        out = out + bias.reshape(1, c_out, 1, 1)
    return out
