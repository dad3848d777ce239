"""Dehazing images of any size with a trained network (AECR-Net, FFA-Net, ...)."""
import contextlib
import os
from typing import Iterable, Iterator, List, Optional

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


@contextlib.contextmanager
def channels_last_weights(model: nn.Module) -> Iterator[None]:
    """While inside, the model's 4-D parameters are held channels-last (the same values; each parameter object and
    the state dict keep theirs); on leaving, their own memory comes back. Not for a model that another thread
    updates meanwhile: an update made inside would be lost on leaving."""
    swapped = []
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 4 and not p.is_contiguous(memory_format=torch.channels_last):
                swapped.append((p, p.data))
                p.data = p.data.contiguous(memory_format=torch.channels_last)
    try:
        yield
    finally:
        for p, data in swapped:
            p.data = data


def memory_format_of(x: Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor laid out so (and not also contiguous), else contiguous_format."""
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


@torch.no_grad()
def dehaze_tensor(model: nn.Module, hazy: Tensor, autocast_dtype: Optional[torch.dtype] = None,
                  retain_memory: bool = True, memory_format: Optional[torch.memory_format] = None) -> Tensor:
    """Dehazes [B, 3, H, W] (any H, W) in [0, 1]; returns [B, 3, H, W] clamped to [0, 1], in hazy's memory format.

    For CPU inputs with ``retain_memory`` the forward runs inside host_memory.retain_freed_memory: its large
    intermediates reuse the pages of those freed before them instead of being faulted in afresh (on glibc;
    elsewhere nothing changes). A loop over many images gains more from one such scope around the whole loop (as
    dehaze_files has): then only the first image faults its memory in.

    memory_format: the layout the network runs in, torch.channels_last or torch.contiguous_format; None: hazy's.
    Channels-last runs the input and, for the call only, the weights so (channels_last_weights); the values are
    those of the default layout up to the order of the sums.

    torch.no_grad rather than torch.inference_mode: the result stays a normal tensor that a caller may go on using
    with autograd, and inference_mode did not measurably speed up a 720 x 1280 forward."""
    h, w = hazy.shape[-2:]
    if memory_format is None:
        memory_format = memory_format_of(hazy)
    if memory_format not in (torch.channels_last, torch.contiguous_format):
        raise ValueError(f"memory_format must be torch.channels_last or torch.contiguous_format, got {memory_format}")
    channels_last = memory_format == torch.channels_last and hazy.dim() == 4
    layout = contextlib.nullcontext() if not channels_last else channels_last_weights(model)
    with host_memory.retain_freed_memory(retain_memory and hazy.device.type == "cpu"), layout:
        x = pad_to_multiple(hazy, getattr(model, "size_multiple", 1))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if autocast_dtype is not None:
            with torch.autocast(x.device.type, dtype=autocast_dtype):
                out = model(x)
        else:
            out = model(x)
        out = out[..., :h, :w].float().clamp(0, 1)
        return out.contiguous(memory_format=memory_format_of(hazy))


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
