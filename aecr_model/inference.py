"""Dehazing images of any size with a trained network (AECR-Net, FFA-Net, ...)."""
import os
from typing import Iterable, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import host_memory
from .data import IMAGE_EXTENSIONS, DataError, load_image, save_image
from .tiled import DEFAULT_OVERLAP, check_tiling, dehaze_tiled


def pad_to_multiple(x: Tensor, multiple: int = 4) -> Tensor:
    """Pads [B, C, H, W] at the bottom and right to multiples of `multiple` (reflection; replication where the
    image is too small to reflect)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if h > ph and w > pw else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


@torch.no_grad()
def dehaze_tensor(model: nn.Module, hazy: Tensor, autocast_dtype: Optional[torch.dtype] = None,
                  retain_memory: bool = True) -> Tensor:
    """Dehazes [B, 3, H, W] (any H, W) in [0, 1]; returns [B, 3, H, W] clamped to [0, 1].

    For CPU inputs with ``retain_memory`` the forward runs inside host_memory.retain_freed_memory: its large
    intermediates reuse the pages of those freed before them instead of being faulted in afresh (on glibc;
    elsewhere nothing changes). A loop over many images gains more from one such scope around the whole loop (as
    dehaze_files has): then only the first image faults its memory in.

    torch.no_grad rather than torch.inference_mode: the result stays a normal tensor that a caller may go on using
    with autograd, and inference_mode did not measurably speed up a 720 x 1280 forward."""
    h, w = hazy.shape[-2:]
    with host_memory.retain_freed_memory(retain_memory and hazy.device.type == "cpu"):
        x = pad_to_multiple(hazy, getattr(model, "size_multiple", 1))
        if autocast_dtype is not None:
            with torch.autocast(x.device.type, dtype=autocast_dtype):
                out = model(x)
        else:
            out = model(x)
        return out[..., :h, :w].float().clamp(0, 1)


def expand_inputs(inputs: Iterable[str]) -> List[str]:
    """Image files named directly or found (sorted) in the folders named."""
    files = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item)
                           if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS)
            if not found:
                raise DataError(f"no images in folder {item}")
            files += found
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise DataError(f"input not found: {item}")
    return files


def dehaze_files(model: nn.Module, inputs: Iterable[str], out_dir: str, device: str = "cpu",
                 autocast_dtype: Optional[torch.dtype] = None, progress: bool = False, tile: int = 0,
                 overlap: int = DEFAULT_OVERLAP) -> List[str]:
    """Dehazes image files (or folders of them) into out_dir/<input name>.png; returns the paths written.

    tile > 0: tile by tile (aecr_model.tiled.dehaze_tiled; overlap in pixels), the image staying on the CPU."""
    tiled = check_tiling(tile, overlap, model)
    files = expand_inputs(inputs)
    names = [os.path.splitext(os.path.basename(f))[0] + ".png" for f in files]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise DataError(f"several inputs would be written to the same file: {sorted(duplicates)[:4]}")
    model = model.to(device).eval()
    written = []
    iterator = files
    if progress:
        from tqdm import tqdm
        iterator = tqdm(files, desc="dehaze", unit="image")
    # One scope for all the images: the memory one image's forward freed serves the next one's.
    with host_memory.retain_freed_memory(torch.device(device).type == "cpu" and not tiled):
        for path, name in zip(iterator, names):
            if tiled:
                out = dehaze_tiled(model, load_image(path)[None], tile, overlap, autocast_dtype)
            else:
                out = dehaze_tensor(model, load_image(path)[None].to(device), autocast_dtype)
            target = os.path.join(out_dir, name)
            save_image(out[0].cpu(), target)
            written.append(target)
    return written
