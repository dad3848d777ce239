"""Synthetic hazy/clear pairs: procedural outdoor-like scenes hazed with the atmospheric scattering model.

    I(x) = J(x) t(x) + A (1 - t(x)),   t(x) = exp(-beta d(x))

J is the clear scene, d its distance map (0 near, 1 at the horizon and in the sky), beta the scattering
coefficient and A the airlight. Scenes have a sky, a ground plane receding to the horizon, and textured
objects standing on it at various distances (drawn far to near). The sets are written in RESIDE's layout
(clear/<id>.png, hazy/<id>_<k>_<beta>.png), so every loader of aecr_model.data reads them.
"""
import math
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from .data import save_image


def _rand(g: torch.Generator, low: float = 0.0, high: float = 1.0, *shape) -> Tensor:
    return low + (high - low) * torch.rand(shape or (1,), generator=g)


def _smooth_noise(g: torch.Generator, h: int, w: int, cells: int) -> Tensor:
    """Value noise in [0, 1] with about `cells` cells across: a coarse grid upsampled bilinearly."""
    grid = torch.rand(1, 1, cells + 1, cells + 1, generator=g)
    return torch.nn.functional.interpolate(grid, size=(h, w), mode="bilinear", align_corners=True)[0, 0]


def make_scene(size: Tuple[int, int], generator: torch.Generator) -> Tuple[Tensor, Tensor]:
    """A clear scene [3, H, W] in [0, 1] and its distance map [H, W] in [0, 1]."""
    h, w = size
    g = generator
    ys = torch.linspace(0, 1, h)[:, None].expand(h, w)
    xs = torch.linspace(0, 1, w)[None, :].expand(h, w)
    horizon = float(_rand(g, 0.25, 0.55))

    sky_top = torch.tensor([0.25, 0.45, 0.85]) + 0.15 * (torch.rand(3, generator=g) - 0.5)
    sky_low = torch.tensor([0.75, 0.82, 0.92]) + 0.1 * (torch.rand(3, generator=g) - 0.5)
    frac = (ys / max(horizon, 1e-3)).clamp(0, 1)
    image = sky_top[:, None, None] * (1 - frac) + sky_low[:, None, None] * frac
    clouds = _smooth_noise(g, h, w, 6)
    image = image + 0.12 * (clouds - 0.5)
    depth = torch.ones(h, w)

    ground = ys >= horizon
    ground_colour = torch.tensor([0.35, 0.45, 0.2]) + 0.25 * (torch.rand(3, generator=g) - 0.5)
    texture = 0.6 * _smooth_noise(g, h, w, 16) + 0.4 * _smooth_noise(g, h, w, 6)
    ground_image = ground_colour[:, None, None] * (0.7 + 0.6 * texture)
    # Perspective: distance grows from 0.05 at the bottom edge to 1 at the horizon.
    ground_depth = 0.05 + 0.95 * ((1 - ys) / max(1 - horizon, 1e-3)).clamp(0, 1) ** 2
    image = torch.where(ground, ground_image, image)
    depth = torch.where(ground, ground_depth, depth)

    n_objects = int(_rand(g, 4, 12))
    bases = sorted((float(_rand(g, horizon + 0.02, 1.0)) for _ in range(n_objects)))  # far (high) to near (low)
    for base in bases:
        distance = 0.05 + 0.95 * ((1 - base) / max(1 - horizon, 1e-3)) ** 2
        scale = 1.2 - distance
        height = float(_rand(g, 0.1, 0.6)) * scale
        width = float(_rand(g, 0.05, 0.3)) * scale
        left = float(_rand(g, -0.1, 1.0))
        colour = torch.rand(3, generator=g) * 0.9 + 0.05
        if float(_rand(g)) < 0.5:  # a building: a rectangle with rows of windows
            inside = (xs >= left) & (xs <= left + width) & (ys <= base) & (ys >= base - height)
            rows = torch.sin(ys * math.pi * float(_rand(g, 20, 60))) > 0.6
            cols = torch.sin(xs * math.pi * float(_rand(g, 20, 60))) > 0.6
            shade = torch.where(rows & cols, 0.55, 1.0)
        else:  # a tree or a rock: an ellipse with a mottled texture
            cy, cx = base - height / 2, left + width / 2
            inside = ((ys - cy) / (height / 2 + 1e-6)) ** 2 + ((xs - cx) / (width / 2 + 1e-6)) ** 2 <= 1
            shade = 0.75 + 0.5 * _smooth_noise(g, h, w, 12)
        image = torch.where(inside, colour[:, None, None] * shade, image)
        depth = torch.where(inside, torch.full_like(depth, distance), depth)

    return image.clamp(0, 1), depth.clamp(0, 1)


def add_haze(clear: Tensor, depth: Tensor, beta: float, airlight) -> Tensor:
    """The atmospheric scattering model: clear [3, H, W] in [0, 1], depth [H, W]; airlight a float or [3]."""
    a = torch.as_tensor(airlight, dtype=clear.dtype).reshape(-1, 1, 1)
    t = torch.exp(-beta * depth)[None]
    return (clear * t + a * (1 - t)).clamp(0, 1)


def make_synthetic_dataset(root: str, scenes: int, size: Tuple[int, int] = (96, 128), hazes_per_scene: int = 2,
                           beta_range: Tuple[float, float] = (0.8, 2.5), seed: int = 0,
                           first_id: int = 1, airlight_range: Tuple[float, float] = (0.75, 1.0)) -> str:
    """Writes `scenes` clear images and `hazes_per_scene` hazy versions of each (random beta and a greyish
    airlight) to root/clear/<id>.png and root/hazy/<id>_<k>_<beta>.png. Returns root."""
    if scenes < 1 or hazes_per_scene < 1:
        raise ValueError("make_synthetic_dataset: `scenes` and `hazes_per_scene` must be >= 1")
    g = torch.Generator().manual_seed(seed)
    os.makedirs(os.path.join(root, "clear"), exist_ok=True)
    os.makedirs(os.path.join(root, "hazy"), exist_ok=True)
    for i in range(first_id, first_id + scenes):
        clear, depth = make_scene(size, g)
        save_image(clear, os.path.join(root, "clear", f"{i}.png"))
        for k in range(1, hazes_per_scene + 1):
            beta = float(_rand(g, *beta_range))
            level = float(_rand(g, *airlight_range))
            airlight = (level + 0.04 * (torch.rand(3, generator=g) - 0.5)).clamp(0, 1)
            hazy = add_haze(clear, depth, beta, airlight)
            save_image(hazy, os.path.join(root, "hazy", f"{i}_{k}_{beta:.2f}.png"))
    return root


def make_pair(size: Tuple[int, int] = (64, 64), beta: float = 1.5, airlight: float = 0.9,
              seed: Optional[int] = 0) -> Tuple[Tensor, Tensor]:
    """One (hazy, clear) pair in memory, [3, H, W] each."""
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
    clear, depth = make_scene(size, g)
    return add_haze(clear, depth, beta, airlight), clear
