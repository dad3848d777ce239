"""The evaluation protocol of AECR-Net's paper (its metrics.py): PSNR and SSIM on images clamped to [0, 1].

PSNR = 10 log10(1 / MSE) over all pixels and channels (100 when the images are equal). SSIM: an 11x11
Gaussian window (sigma 1.5) applied per channel as a zero-padded convolution, C1 = 0.01^2, C2 = 0.03^2, the
SSIM map averaged over channels and pixels. Both are computed per image and averaged over images.
"""
import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_pair(pred: Tensor, target: Tensor, name: str) -> None:
    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(f"{name}: `pred` and `target` must both be [B, C, H, W] of one shape, got "
                         f"{list(pred.shape)} and {list(target.shape)}")


def psnr(pred: Tensor, target: Tensor) -> float:
    """PSNR in dB of one image pair [1, C, H, W] (or the pooled pixels of a batch)."""
    _check_pair(pred, target, "psnr")
    mse = (pred.clamp(0, 1).double() - target.clamp(0, 1).double()).square().mean().item()
    return 100.0 if mse == 0 else 10.0 * math.log10(1.0 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-x.square() / (2 * sigma * sigma))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(pred: Tensor, target: Tensor, window_size: int = 11) -> float:
    """SSIM of one image pair [1, C, H, W] (the mean of the SSIM map over channels and pixels)."""
    _check_pair(pred, target, "ssim")
    a = pred.clamp(0, 1).double()
    b = target.clamp(0, 1).double()
    channels = a.shape[1]
    window = gaussian_window(window_size).to(a.device).expand(channels, 1, window_size, window_size)

    def blur(x: Tensor) -> Tensor:
        return F.conv2d(x, window, padding=window_size // 2, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a.square()
    var_b = blur(b * b) - mu_b.square()
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a.square() + mu_b.square() + c1) * (var_a + var_b + c2))
    return ssim_map.mean().item()
