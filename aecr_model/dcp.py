"""The Dark Channel Prior (He, Sun and Tang, CVPR 2009 / TPAMI 2011): dehazing that needs no training.

dark(I) = min over a 15x15 patch and the channels; the airlight A is, per channel, the brightest input pixel
among the 0.1% of pixels with the brightest dark channel; t = 1 - omega * dark(I / A) (omega = 0.95), refined
with a guided filter on the grey image (He et al., ECCV 2010; radius 60, eps 1e-3) in place of soft matting;
J = (I - A) / max(t, 0.1) + A.
"""
import torch
import torch.nn.functional as F
from torch import Tensor


def dark_channel(image: Tensor, patch: int = 15) -> Tensor:
    """[B, C, H, W] -> [B, 1, H, W]: min over channels, then over a patch x patch window (edges replicated)."""
    m = image.min(dim=1, keepdim=True).values
    pad = patch // 2
    m = F.pad(m, (pad, pad, pad, pad), mode="replicate")
    return -F.max_pool2d(-m, patch, stride=1)


def airlight(image: Tensor, dark: Tensor, fraction: float = 0.001) -> Tensor:
    """[B, C, 1, 1]: per channel, the brightest input value among the brightest `fraction` of the dark channel."""
    b, c, h, w = image.shape
    k = max(1, int(round(h * w * fraction)))
    index = dark.reshape(b, -1).topk(k, dim=1).indices  # [B, k]
    candidates = image.reshape(b, c, -1).gather(2, index[:, None, :].expand(b, c, k))
    intensity = candidates.sum(dim=1)  # brightest pixel by total intensity, as in He et al.
    best = intensity.argmax(dim=1)
    return candidates.gather(2, best[:, None, None].expand(b, c, 1)).unsqueeze(-1)


def box_filter(x: Tensor, radius: int) -> Tensor:
    """Mean over a (2r+1)^2 window, clipped at the image border (the guided filter's O(1) box)."""
    size = 2 * radius + 1
    ones = torch.ones_like(x[:, :1])
    total = F.avg_pool2d(F.pad(x, (radius,) * 4), size, stride=1, divisor_override=1)
    count = F.avg_pool2d(F.pad(ones, (radius,) * 4), size, stride=1, divisor_override=1)
    return total / count


def guided_filter(guide: Tensor, src: Tensor, radius: int, eps: float) -> Tensor:
    """He et al.'s guided filter with a grey guide [B, 1, H, W]."""
    radius = max(1, min(radius, (min(guide.shape[-2:]) - 1) // 2))
    mean_i, mean_p = box_filter(guide, radius), box_filter(src, radius)
    cov_ip = box_filter(guide * src, radius) - mean_i * mean_p
    var_i = box_filter(guide * guide, radius) - mean_i * mean_i
    a = cov_ip / (var_i + eps)
    b = mean_p - a * mean_i
    return box_filter(a, radius) * guide + box_filter(b, radius)


@torch.no_grad()
def dehaze_dcp(image: Tensor, patch: int = 15, omega: float = 0.95, t0: float = 0.1, radius: int = 60,
               eps: float = 1e-3) -> Tensor:
    """Dehazes [B, 3, H, W] images in [0, 1]; returns [B, 3, H, W] in [0, 1]."""
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"dehaze_dcp: expected [B, 3, H, W] images, got {list(image.shape)}")
    image = image.float().clamp(0, 1)
    a = airlight(image, dark_channel(image, patch)).clamp_min(1e-3)
    t = 1 - omega * dark_channel(image / a, patch)
    grey = (0.299 * image[:, 0:1] + 0.587 * image[:, 1:2] + 0.114 * image[:, 2:3])
    t = guided_filter(grey, t, radius, eps)
    return ((image - a) / t.clamp_min(t0) + a).clamp(0, 1)
