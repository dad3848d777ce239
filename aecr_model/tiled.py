"""Tiled inference: dehazing images too large to run whole, one tile at a time.

Why AECR-Net is not simply run on each tile: its channel attention (CALayer) takes the mean of a feature map over
the WHOLE image, six times, so a tile run alone attends with its own means. Tiles run alone and cross-faded
(tiles of 128, an overlap of 32, random He-scaled weights) came within only 25 to 63 dB PSNR of the whole-image
result, depending on the weights: visible. So for an AECRNet the network runs stage by stage over the tiles (the
encoder; each feature-attention block, in two passes; each DCN layer; the decoder), with the quarter-resolution
feature map of the whole image kept in CPU memory between stages:

- the channel-attention means are summed over all tiles' cores before any tile uses them, as in one whole-image
  pass;
- each stage reads its tile with a context margin (the overlap) from the whole map of the stage before, and
  writes only its core, where it is exact: no stage looks more than 11 px (full resolution) beyond a core (the
  decoder, which also recomputes the encoder's skip connections), hence an overlap of at least 12;
- a DCN layer whose offsets reach beyond the margin reads a wider window for that tile (as wide as they reach).

The result equals dehaze_tensor's whole-image result to float rounding, whatever the weights (above 100 dB PSNR
in tests/test_model_tiled.py; run in float64, equal at float32 resolution); no seam can show, there is nothing to blend.

Other image-to-image models (anything that is not an AECRNet) run whole on each tile, and the tiles are
cross-faded over the 2 * overlap pixels neighbours share, with a cosine window normalised by the summed weights.

Only tiles go to the model's device; whole-image buffers stay on the CPU: the input and the float32 output, plus
for an AECRNet two feature maps of 4 * ngf channels at quarter resolution (official ngf=64: 2 x 64 bytes per
input pixel in float32, 0.27 GB at 1920x1080, 1.06 GB at 3840x2160). It costs about (tile / (tile - 2 *
overlap))^2 times the arithmetic of the whole image at once in the inner tiles (1.27x for 1920x1080 with tiles
of 512 and an overlap of 32).
"""
import contextlib
import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .network import AECRNet

ALIGN = 4               # AECRNet downsamples by 4: tiles start and end on multiples of 4
MIN_AECR_OVERLAP = 12   # AECRNet's stages look up to 11 px beyond a tile's core (module docstring)
DEFAULT_OVERLAP = 32


class Window(NamedTuple):
    """A tile in the (padded) image: the rows and columns the model sees, [y0, y1) x [x0, x1), and its core
    [cy0, cy1) x [cx0, cx1), the part it writes. Cores partition the image; every bound is a multiple of 4."""
    y0: int
    y1: int
    x0: int
    x1: int
    cy0: int
    cy1: int
    cx0: int
    cx1: int


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _round_up(value: int, multiple: int = ALIGN) -> int:
    return -(-value // multiple) * multiple


def check_tiling(tile, overlap, model: Optional[nn.Module] = None,
                 names: Sequence[str] = ("tile", "overlap")) -> bool:
    """Checks tiling arguments; returns True when tiling is asked for (tile > 0), False for tile 0 or None.

    Raises ValueError with a message naming the argument (``names``: how the caller calls them, e.g.
    ("--tile", "--tile-overlap") on the command line).
    """
    tile_name, overlap_name = names
    if tile is None:
        return False
    if not _is_int(tile) or tile < 0:
        raise ValueError(f"{tile_name} must be a non-negative int (0: whole image), got {tile!r}")
    if not _is_int(overlap) or overlap < 0:
        raise ValueError(f"{overlap_name} must be a non-negative int, got {overlap!r}")
    if tile == 0:
        return False
    if tile <= 2 * overlap:
        raise ValueError(f"{tile_name} ({tile}) must be larger than 2 * {overlap_name} (2 * {overlap} = "
                         f"{2 * overlap}): each tile has an overlap on both sides")
    used_tile, used_overlap = tile - tile % ALIGN, _round_up(overlap)
    if used_tile - 2 * used_overlap < ALIGN:
        raise ValueError(
            f"{tile_name} {tile} is too small for {overlap_name} {overlap}: tiles start and end on multiples of "
            f"{ALIGN} (the network downsamples by {ALIGN}), so they are used as {used_tile} px with an overlap of "
            f"{used_overlap} px, which leaves less than {ALIGN} px between the overlaps; use {tile_name} >= "
            f"{2 * used_overlap + ALIGN}")
    if isinstance(model, AECRNet) and overlap < MIN_AECR_OVERLAP:
        raise ValueError(
            f"{overlap_name} {overlap} is too small for AECR-Net: its stages see up to 11 px beyond a tile, so the "
            f"overlap must be at least {MIN_AECR_OVERLAP} px (the default is {DEFAULT_OVERLAP})")
    return True


def _axis_windows(length: int, tile: int, margin: int) -> List[Tuple[int, int, int, int]]:
    """(w0, w1, c0, c1) along one axis of `length` (a multiple of 4): cores c that partition [0, length), each
    window = its core plus `margin` on the sides that have a neighbour, at most `tile` long."""
    if length <= tile:
        return [(0, length, 0, length)]
    edge, inner = tile - margin, tile - 2 * margin      # the largest cores of end and inner windows
    count = 2 + max(0, -(-(length - 2 * edge) // inner))
    capacities = [edge] + [inner] * (count - 2) + [edge]
    total = sum(capacities)
    bounds, cumulative = [0], 0
    for capacity in capacities[:-1]:     # cores in proportion to their capacity, on multiples of 4
        cumulative += capacity
        bounds.append(cumulative * length // (total * ALIGN) * ALIGN)
    bounds.append(length)
    return [(max(0, c0 - margin), min(length, c1 + margin), c0, c1)
            for c0, c1 in zip(bounds, bounds[1:]) if c1 > c0]


def tile_windows(height: int, width: int, tile: int, overlap: int) -> List[Window]:
    """The tiles of a height x width image (padded to multiples of 4 first) for `tile` and `overlap` in pixels:
    tile rounded down and overlap rounded up to multiples of 4; windows at most tile x tile."""
    check_tiling(tile, overlap)
    used_tile, margin = tile - tile % ALIGN, _round_up(overlap)
    rows = _axis_windows(_round_up(height), used_tile, margin)
    cols = _axis_windows(_round_up(width), used_tile, margin)
    return [Window(y0, y1, x0, x1, cy0, cy1, cx0, cx1)
            for y0, y1, cy0, cy1 in rows for x0, x1, cx0, cx1 in cols]


def _padding_mode(height: int, width: int) -> str:
    """What pad_to_multiple uses for the whole image: reflection, replication where it is too small to reflect."""
    ph, pw = (-height) % ALIGN, (-width) % ALIGN
    return "reflect" if height > ph and width > pw else "replicate"


def _padded_crop(x: Tensor, y0: int, y1: int, x0: int, x1: int, mode: str) -> Tensor:
    """x padded at the bottom and right to multiples of 4 (as inference.pad_to_multiple does), cropped to
    [y0, y1) x [x0, x1), without padding the whole image. A few rows and columns before the crop are read too, so
    that reflection has the rows it needs."""
    h, w = x.shape[-2:]
    ry0, rx0 = max(0, min(y0, h - ALIGN)), max(0, min(x0, w - ALIGN))
    part = x[..., ry0:min(y1, h), rx0:min(x1, w)]
    pad_h, pad_w = max(0, y1 - h), max(0, x1 - w)
    if pad_h or pad_w:
        part = F.pad(part, (0, pad_w, 0, pad_h), mode=mode)
    return part[..., y0 - ry0:y1 - ry0, x0 - rx0:x1 - rx0]


def _core(t: Tensor, win: Window, scale: int) -> Tensor:
    """The core of a window's result at 1/scale resolution."""
    return t[..., (win.cy0 - win.y0) // scale:(win.cy1 - win.y0) // scale,
             (win.cx0 - win.x0) // scale:(win.cx1 - win.x0) // scale]


def _window_of(buffer: Tensor, win: Window, scale: int) -> Tensor:
    return buffer[..., win.y0 // scale:win.y1 // scale, win.x0 // scale:win.x1 // scale]


def _core_of(buffer: Tensor, win: Window, scale: int) -> Tensor:
    return buffer[..., win.cy0 // scale:win.cy1 // scale, win.cx0 // scale:win.cx1 // scale]


class _FeatureMap:
    """A whole-image feature map at 1/scale resolution on the CPU, written core by core (allocated at the first
    write, with that result's channels and dtype)."""

    def __init__(self, batch: int, height: int, width: int, scale: int):
        self.shape, self.scale, self.data = (batch, height // scale, width // scale), scale, None

    def write_core(self, result: Tensor, win: Window) -> Tensor:
        """Writes the core of `result` (a whole window, on any device); returns that core (on its device)."""
        core = _core(result, win, self.scale)
        if self.data is None:
            b, h, w = self.shape
            self.data = torch.empty(b, result.shape[1], h, w, dtype=result.dtype)
        _core_of(self.data, win, self.scale).copy_(core)
        return core

    def window(self, win: Window, device) -> Tensor:
        return _window_of(self.data, win, self.scale).to(device)

    def core(self, win: Window, device) -> Tensor:
        return _core_of(self.data, win, self.scale).to(device)


def _model_device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def dehaze_tiled(model: nn.Module, hazy: Tensor, tile: int, overlap: int = DEFAULT_OVERLAP,
                 autocast_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Dehazes [B, 3, H, W] in [0, 1] tile by tile; returns [B, 3, H, W] float32 clamped to [0, 1] (on hazy's
    device), equal to inference.dehaze_tensor(model, hazy) up to float rounding for an AECRNet. Only tiles
    go to the model's device; see the module docstring for how, and for the memory it takes.

    Args:
        model: an image-to-image network in eval mode, on the device it is to run on (the tiles go there; hazy,
            the output and the whole-image buffers stay where hazy is / on the CPU).
        hazy: [B, C, H, W], any H and W (padded at the bottom and right to multiples of 4 as dehaze_tensor does).
        tile: the side of a tile in pixels, its overlaps included (rounded down to a multiple of 4); 0 or None:
            the whole image at once (dehaze_tensor). An image no larger than a tile is also run whole.
        overlap: the context margin, in pixels, that a tile reaches beyond its core on each side that has a
            neighbour (rounded up to a multiple of 4); neighbouring tiles share 2 * overlap pixels. tile must be
            larger than 2 * overlap. An AECRNet needs overlap >= 12 (exact from there on; larger overlaps only
            save wider DCN windows where offsets are large); other models' tiles are more alike the larger it is.
            Cost: about (tile / (tile - 2 * overlap))^2 the arithmetic of the whole image.
        autocast_dtype: run under torch.autocast with this dtype (e.g. torch.bfloat16 on CUDA), or None.

    For an AECRNet the network runs stage by stage over all tiles, so that its channel-attention means are those
    of the whole image (see the module docstring); any other model runs on each tile and the tiles are cross-faded
    over the shared 2 * overlap pixels with a cosine window.

    Example::

        >>> model = AECRNet().eval()
        >>> dehaze_tiled(model, torch.rand(1, 3, 300, 500), tile=128, overlap=32).shape
        torch.Size([1, 3, 300, 500])
    """
    if not isinstance(hazy, Tensor) or hazy.dim() != 4:
        shape = list(hazy.shape) if isinstance(hazy, Tensor) else type(hazy).__name__
        raise ValueError(f"dehaze_tiled: hazy must be a [B, C, H, W] tensor, got {shape}")
    from .inference import dehaze_tensor
    device = _model_device(model)
    tiled = check_tiling(tile, overlap, model)
    height, width = hazy.shape[-2:]
    if not tiled or len(tile_windows(height, width, tile, overlap)) == 1:
        return dehaze_tensor(model, hazy.to(device), autocast_dtype).to(hazy.device)
    if model.training:
        raise ValueError("dehaze_tiled: the model is in training mode (FastDeconv would use each tile's own "
                         "statistics): call model.eval() first")
    windows = tile_windows(height, width, tile, overlap)

    def autocast():
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=autocast_dtype)

    mode = _padding_mode(height, width)

    def tile_input(win: Window) -> Tensor:
        return _padded_crop(hazy, win.y0, win.y1, win.x0, win.x1, mode).to(device)

    run = _run_aecr if isinstance(model, AECRNet) else _run_blended
    out = run(model, tile_input, windows, hazy.shape[0], height, width, _round_up(overlap), device, autocast)
    return out.clamp_(0, 1).to(hazy.device)


def _run_aecr(model: AECRNet, tile_input, windows: List[Window], batch: int, height: int, width: int, margin: int,
              device, autocast) -> Tensor:
    """AECRNet.forward, stage by stage over the tiles (keep in step with network.AECRNet and FABlock)."""
    hp, wp = _round_up(height), _round_up(width)

    def encode(win: Window):
        x_down2 = model.down2(model.down1(model.deconv(tile_input(win))))
        return x_down2, model.down3(x_down2)

    h = _FeatureMap(batch, hp, wp, 4)
    t = _FeatureMap(batch, hp, wp, 4)
    for win in windows:
        with autocast():
            h.write_core(encode(win)[1], win)
    for block in model.fa_blocks():
        # t = conv2(relu(conv1(h)) + h) on every tile; its mean over the whole image; then h = PA(t * CA) + h.
        sums = None
        for win in windows:
            x = h.window(win, device)
            with autocast():
                result = block.conv2(block.act1(block.conv1(x)) + x)
            core = t.write_core(result, win)
            part = core.sum(dim=(2, 3), dtype=torch.float64)
            sums = part if sums is None else sums + part
        mean = (sums / ((hp // 4) * (wp // 4)))[..., None, None]
        with autocast():
            attention = block.calayer.ca(mean.to(device=device, dtype=t.data.dtype))
        for win in windows:
            with autocast():
                result = block.palayer(t.core(win, device) * attention) + h.core(win, device)
            _core_of(h.data, win, 4).copy_(result)
    for dcn in model.dcn_layers():
        for win in windows:
            with autocast():
                wide = _dcn_window(dcn.dcn, h, win, hp, wp, device)
                t.write_core(dcn(h.window(wide, device)), wide)
        h, t = t, h
    t.data = None
    out = torch.empty(batch, model.config["out_channels"], height, width, dtype=torch.float32)
    for win in windows:
        with autocast():
            x_down2, x_down3 = encode(win)
            result = model.up3(model.up2(model.mix2(x_down2, model.up1(model.mix1(x_down3, h.window(win, device))))))
        cy1, cx1 = min(win.cy1, height), min(win.cx1, width)
        out[..., win.cy0:cy1, win.cx0:cx1] = _core(result, win, 1)[..., :cy1 - win.cy0, :cx1 - win.cx0].float().cpu()
    return out


def _dcn_window(dcn, h: "_FeatureMap", win: Window, hp: int, wp: int, device) -> Window:
    """The window a DCN layer needs for exact results on `win`'s core: `win` itself, or, where the offsets that
    its core predicts reach beyond win's margin, the core widened by that reach (clipped to the image)."""
    x = h.window(win, device)
    core = _core(dcn.conv_offset_mask(x), win, 4)
    offsets = core[:, :2 * core.shape[1] // 3]
    if offsets.numel() == 0:
        return win
    largest = offsets.abs().max().item()
    if not math.isfinite(largest):
        return win
    # A tap samples q + dilation * k + offset, bilinearly: rows up to dilation * (kernel // 2) + |offset| + 1 away.
    reach = max(d * (k // 2) for d, k in zip(dcn.dilation, dcn.kernel_size)) + math.floor(largest) + 1
    need = 4 * reach    # in full-resolution pixels
    if min(win.cy0 - win.y0 if win.y0 > 0 else need, win.cx0 - win.x0 if win.x0 > 0 else need,
           win.y1 - win.cy1 if win.y1 < hp else need, win.x1 - win.cx1 if win.x1 < wp else need) >= need:
        return win
    return Window(max(0, win.cy0 - need), min(hp, win.cy1 + need), max(0, win.cx0 - need), min(wp, win.cx1 + need),
                  win.cy0, win.cy1, win.cx0, win.cx1)


def _ramp(w0: int, w1: int, c0: int, c1: int, margin: int, device) -> Tensor:
    """A window's weight along one axis: 1 on its core, a cosine cross-fade over each shared band [c - margin,
    c + margin) so that neighbouring weights add up to 1."""
    weight = torch.ones(w1 - w0, dtype=torch.float32, device=device)
    if margin == 0:
        return weight
    position = torch.arange(w0, w1, dtype=torch.float32, device=device) + 0.5
    if c0 > w0:
        weight *= 0.5 - 0.5 * torch.cos(math.pi * ((position - (c0 - margin)) / (2 * margin)).clamp(0, 1))
    if c1 < w1:
        weight *= 0.5 - 0.5 * torch.cos(math.pi * (((c1 + margin) - position) / (2 * margin)).clamp(0, 1))
    return weight


def _run_blended(model: nn.Module, tile_input, windows: List[Window], batch: int, height: int, width: int,
                 margin: int, device, autocast) -> Tensor:
    """Any image-to-image model on each tile; the tiles cross-faded over their overlaps."""
    out = weights = None
    for win in windows:
        x = tile_input(win)
        with autocast():
            result = model(x)
        if result.dim() != 4 or result.shape[0] != x.shape[0] or result.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"dehaze_tiled: the model must keep the image size, it turned a {list(x.shape)} tile "
                             f"into {list(result.shape)}")
        weight = (_ramp(win.y0, win.y1, win.cy0, win.cy1, margin, device)[:, None]
                  * _ramp(win.x0, win.x1, win.cx0, win.cx1, margin, device)[None, :])
        y1, x1 = min(win.y1, height), min(win.x1, width)
        weight = weight[:y1 - win.y0, :x1 - win.x0]
        contribution = (result[..., :y1 - win.y0, :x1 - win.x0].float() * weight).cpu()
        if out is None:
            out = torch.zeros(batch, result.shape[1], height, width, dtype=torch.float32)
            weights = torch.zeros(height, width, dtype=torch.float32)
        out[..., win.y0:y1, win.x0:x1] += contribution
        weights[win.y0:y1, win.x0:x1] += weight.cpu()
    return out.div_(weights)
