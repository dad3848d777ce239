"""Evaluation with the paper's protocol: whole images, batch 1, PSNR and SSIM averaged over the images."""
from typing import Callable, Dict, Optional

import torch
from torch import Tensor, nn

from . import host_memory
from .data import PairedImages
from .dcp import dehaze_dcp
from .inference import dehaze_tensor
from .metrics import psnr, ssim

METHODS = ("model", "dcp", "hazy")


def method_fn(method: str, model: Optional[nn.Module] = None,
              autocast_dtype: Optional[torch.dtype] = None) -> Callable[[Tensor], Tensor]:
    """The dehazing function of a method: the model, the Dark Channel Prior, or the hazy input unchanged."""
    if method == "model":
        if model is None:
            raise ValueError("evaluating a model needs a model (a checkpoint)")
        return lambda hazy: dehaze_tensor(model, hazy, autocast_dtype)
    if method == "dcp":
        return dehaze_dcp
    if method == "hazy":
        return lambda hazy: hazy.clamp(0, 1)
    raise ValueError(f"unknown method {method!r}; one of {METHODS}")


@torch.no_grad()
def evaluate(fn: Callable[[Tensor], Tensor], images: PairedImages, device: str = "cpu",
             progress: bool = False) -> Dict[str, float]:
    """{"psnr": mean dB, "ssim": mean, "n": images} of fn(hazy) against the clear images."""
    psnrs, ssims = [], []
    indices = range(len(images))
    if progress:
        from tqdm import tqdm
        indices = tqdm(indices, desc="evaluate", unit="image")
    # One scope for all the images: each forward reuses the memory the one before freed (dehaze_tensor's own
    # scope, nested in it, then keeps it too).
    with host_memory.retain_freed_memory(torch.device(device).type == "cpu"):
        for i in indices:
            hazy, clear, _ = images[i]
            out = fn(hazy[None].to(device)).float().cpu()
            psnrs.append(psnr(out, clear[None]))
            ssims.append(ssim(out, clear[None]))
    if not psnrs:
        raise ValueError(f"no images to evaluate in {images.root}")
    return {"psnr": sum(psnrs) / len(psnrs), "ssim": sum(ssims) / len(ssims), "n": len(psnrs)}
