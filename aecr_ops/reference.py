"""Pure-PyTorch references of the aecr ops, written for clarity, not speed. They need no compiled code.

Run them in float64 to check the kernels: autograd through them gives the reference gradients.
"""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from ._checks import IntPair, pair

__all__ = ["deform_conv2d", "bilinear_sample", "FastDeconv", "isqrt_newton_schulz", "fastdeconv_patches",
           "fastdeconv_statistics", "fastdeconv_fold", "fastdeconv_block", "fastdeconv_initial_buffers"]


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


# ---- FastDeconv (network deconvolution, Ye et al., ICLR 2020) ------------------------------------------------


def isqrt_newton_schulz(a: Tensor, n_iter: int) -> Tensor:
    """Inverse square root of symmetric positive-definite matrices by the coupled Newton-Schulz iteration.

    ``a``: [..., F, F]. Y = A/||A||_F, Z = I; repeat n_iter times: T = (3I - ZY)/2, Y = YT, Z = TZ;
    returns Z / sqrt(||A||_F) (each matrix normalised by its own Frobenius norm).
    """
    norm = a.flatten(-2).norm(dim=-1)[..., None, None]
    y = a / norm
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)
    z = eye
    for _ in range(n_iter):
        t = 0.5 * (3.0 * eye - z @ y)
        y = y @ t
        z = t @ z
    return z / torch.sqrt(norm)


def fastdeconv_patches(x: Tensor, kernel_size: Tuple[int, int], dilation, padding, sampling_stride: int) -> Tensor:
    """The patch rows whose statistics FastDeconv whitens: [R, C*kh*kw], columns in unfold order (c*kh*kw + tap).

    k x k patches taken every ``sampling_stride`` pixels (zero padding); for a 1x1 kernel every
    ``sampling_stride**2``-th pixel of the flattened N*H*W grid, as the original does.
    """
    if kernel_size[0] > 1 or kernel_size[1] > 1:
        cols = torch.nn.functional.unfold(x, kernel_size, dilation, padding, sampling_stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])[::sampling_stride ** 2]


def fastdeconv_statistics(patches: Tensor, num_features: int, groups: int, eps: float) -> Tuple[Tensor, Tensor]:
    """Mean [groups*F] and covariance [groups, F, F] (+ eps*I) of patch rows [R, C*kh*kw].

    groups == 1: the C/block blocks share one F x F covariance, feature f of block j being column f*G + j;
    their rows are stacked (M = R*G). groups > 1: group g owns columns g*F .. g*F + F - 1.
    """
    if groups == 1:
        sub = patches.shape[1] // num_features
        rows = patches.reshape(-1, num_features, sub).transpose(1, 2).reshape(-1, num_features)
        mean = rows.mean(0)
        centred = (rows - mean)[None]
    else:
        mean = patches.mean(0)
        centred = (patches - mean).reshape(-1, groups, num_features).transpose(0, 1)
    eye = torch.eye(num_features, dtype=patches.dtype, device=patches.device)
    cov = centred.transpose(1, 2) @ centred / centred.shape[1] + eps * eye
    return mean, cov


def fastdeconv_fold(weight: Tensor, bias: Optional[Tensor], mean: Tensor, deconv: Tensor, groups: int,
                    num_features: int) -> Tuple[Tensor, Tensor]:
    """The whitened convolution's weight and bias: w = W' D, b = bias - sum over blocks of (w mean)."""
    out_channels = weight.shape[0]
    if groups == 1:
        sub = weight[0].numel() // num_features
        w = weight.reshape(out_channels, num_features, sub).transpose(1, 2).reshape(-1, num_features) @ deconv
        shift = (w @ mean[:, None]).reshape(out_channels, -1).sum(1)
        w = w.reshape(out_channels, sub, num_features).transpose(1, 2)
    else:
        w = weight.reshape(groups, -1, num_features) @ deconv
        shift = (w @ mean.reshape(groups, num_features, 1)).reshape(out_channels)
    b = -shift if bias is None else bias - shift
    return w.reshape(weight.shape), b


class FastDeconv(torch.nn.Module):
    """The original FastDeconv layer (yechengxi/deconvolution, as copied into AECR-Net), re-implemented in plain
    PyTorch for reference: same constructor, buffers, block rule, freeze counter and running updates.

    It reproduces the original also where the original is fragile: a non-finite batch makes the running buffers
    non-finite. Use :class:`aecr_ops.FastDeconv` for real work.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True,
                 eps=1e-5, n_iter=5, momentum=0.1, block=64, sampling_stride=3, freeze=False, freeze_iter=100):
        super().__init__()
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = pair(kernel_size, "kernel_size", 1, "FastDeconv")
        self.stride = pair(stride, "stride", 1, "FastDeconv")
        self.padding = pair(padding, "padding", 0, "FastDeconv")
        self.dilation = pair(dilation, "dilation", 1, "FastDeconv")
        self.eps, self.n_iter, self.momentum = eps, n_iter, momentum
        self.weight = torch.nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        self.bias = torch.nn.Parameter(torch.empty(out_channels)) if bias else None
        reset_conv_parameters(self.weight, self.bias)
        self.block = fastdeconv_block(in_channels, block, groups)
        self.num_features = self.kernel_size[0] * self.kernel_size[1] * self.block
        mean, deconv = fastdeconv_initial_buffers(in_channels, self.kernel_size, self.block, groups)
        self.register_buffer("running_mean", mean)
        self.register_buffer("running_deconv", deconv)
        self.sampling_stride = sampling_stride * self.stride[0]
        self.counter = 0
        self.freeze, self.freeze_iter = freeze, freeze_iter

    def forward(self, x: Tensor) -> Tensor:
        frozen = self.freeze and self.counter > self.freeze_iter
        if self.training:
            self.counter = (self.counter + 1) % (self.freeze_iter * 10)
        if self.training and not frozen:
            patches = fastdeconv_patches(x, self.kernel_size, self.dilation, self.padding, self.sampling_stride)
            mean, cov = fastdeconv_statistics(patches, self.num_features, self.groups, self.eps)
            deconv = isqrt_newton_schulz(cov, self.n_iter)
            if self.groups == 1:
                deconv = deconv[0]
            with torch.no_grad():
                self.running_mean.mul_(1 - self.momentum).add_(mean.detach() * self.momentum)
                self.running_deconv.mul_(1 - self.momentum).add_(deconv.detach() * self.momentum)
        else:
            mean, deconv = self.running_mean, self.running_deconv
        w, b = fastdeconv_fold(self.weight, self.bias, mean, deconv, self.groups, self.num_features)
        return torch.nn.functional.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)


def fastdeconv_block(in_channels: int, block: int, groups: int) -> int:
    """The original block rule: capped at in_channels, else gcd with it if it does not divide it;
    in_channels/groups for grouped layers."""
    if block > in_channels:
        block = in_channels
    elif in_channels % block != 0:
        block = math.gcd(block, in_channels)
    if groups > 1:
        block = in_channels // groups
    return block


def fastdeconv_initial_buffers(in_channels: int, kernel_size: Tuple[int, int], block: int,
                               groups: int) -> Tuple[Tensor, Tensor]:
    """running_mean and running_deconv as the original layer creates them: [F] and the identity [F, F]
    (F = kh*kw*block); with groups > 1, [kh*kw*in_channels] and one identity per group [groups, F, F]."""
    taps = kernel_size[0] * kernel_size[1]
    features = taps * block
    if groups == 1:
        return torch.zeros(features), torch.eye(features)
    return torch.zeros(taps * in_channels), torch.eye(features).repeat(groups, 1, 1)


def reset_conv_parameters(weight: Tensor, bias: Optional[Tensor]) -> None:
    """nn.Conv2d's default initialisation (the original FastDeconv inherits it from _ConvNd)."""
    torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in = weight[0].numel()
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        torch.nn.init.uniform_(bias, -bound, bound)
