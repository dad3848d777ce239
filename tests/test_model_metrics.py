"""PSNR and SSIM against an independent computation; the Dark Channel Prior on a known haze."""
import math

import numpy as np
import pytest
import torch

from aecr_model.dcp import airlight, dark_channel, dehaze_dcp
from aecr_model.metrics import psnr, ssim
from aecr_model.synthetic import add_haze, make_scene


def numpy_ssim(a, b, size=11, sigma=1.5):
    """SSIM written out with explicit loops over a zero-padded image (the official protocol)."""
    x = np.arange(size) - size // 2
    g = np.exp(-x ** 2 / (2 * sigma ** 2))
    g /= g.sum()
    window = np.outer(g, g)
    pad = size // 2

    def blur(img):
        padded = np.pad(img, pad)
        out = np.zeros_like(img)
        for i in range(img.shape[0]):
            for j in range(img.shape[1]):
                out[i, j] = (padded[i:i + size, j:j + size] * window).sum()
        return out

    maps = []
    for c in range(a.shape[0]):
        p, q = a[c], b[c]
        mu_p, mu_q = blur(p), blur(q)
        var_p, var_q = blur(p * p) - mu_p ** 2, blur(q * q) - mu_q ** 2
        cov = blur(p * q) - mu_p * mu_q
        c1, c2 = 0.01 ** 2, 0.03 ** 2
        maps.append((2 * mu_p * mu_q + c1) * (2 * cov + c2) / ((mu_p ** 2 + mu_q ** 2 + c1) * (var_p + var_q + c2)))
    return float(np.mean(maps))


def test_psnr_against_numpy():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(1, 3, 17, 23, generator=g), torch.rand(1, 3, 17, 23, generator=g)
    mse = np.mean((a.numpy().astype(np.float64) - b.numpy()) ** 2)
    assert psnr(a, b) == pytest.approx(10 * math.log10(1 / mse), rel=1e-9)
    assert psnr(a, a) == 100.0
    assert psnr(a * 3 - 1, b) == pytest.approx(psnr((a * 3 - 1).clamp(0, 1), b))  # inputs are clamped


def test_ssim_against_an_independent_implementation():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(1, 3, 19, 21, generator=g)
    b = (a + 0.1 * torch.randn(1, 3, 19, 21, generator=g)).clamp(0, 1)
    expected = numpy_ssim(a[0].double().numpy(), b[0].double().numpy())
    assert ssim(a, b) == pytest.approx(expected, rel=1e-9)
    assert ssim(a, a) == pytest.approx(1.0)


def test_metrics_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match="psnr"):
        psnr(torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 5))
    with pytest.raises(ValueError, match="ssim"):
        ssim(torch.rand(3, 4, 4), torch.rand(3, 4, 4))


def test_dark_channel_and_airlight():
    image = torch.ones(1, 3, 20, 20) * 0.5
    image[0, 1, 5, 5] = 0.0
    dark = dark_channel(image, patch=3)
    assert dark[0, 0, 5, 5] == 0 and dark[0, 0, 4, 4] == 0 and dark[0, 0, 10, 10] == 0.5
    hazy = torch.rand(1, 3, 30, 30) * 0.3
    hazy[0, :, 2:6, 2:6] = torch.tensor([0.9, 0.85, 0.8])[:, None, None]  # a bright, dense haze patch
    a = airlight(hazy, dark_channel(hazy, 3))
    torch.testing.assert_close(a.flatten(), torch.tensor([0.9, 0.85, 0.8]))


def test_dcp_removes_synthetic_haze():
    clear, depth = make_scene((96, 128), torch.Generator().manual_seed(3))
    hazy = add_haze(clear, depth, beta=1.5, airlight=0.85)[None]
    restored = dehaze_dcp(hazy)
    assert restored.shape == hazy.shape and restored.min() >= 0 and restored.max() <= 1
    assert psnr(restored, clear[None]) > psnr(hazy, clear[None]) + 1.0
