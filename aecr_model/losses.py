"""Contrastive regularisation (CR) of AECR-Net, on frozen VGG19 features.

Anchor a = the restored image, positive p = the clear image, negatives n = hazy images (p and n carry no
gradient). With VGG19's relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 features and weights 1/32 ... 1:

    CR = sum_i w_i * L1(a_i, p_i) / (mean over negatives of L1(a_i, n_i) + 1e-7)

L1 is the mean absolute difference over the batch. One negative (the default) is each sample's own hazy input,
as in the released code; with k > 1 negatives the batch is rolled by 0 .. k-1 samples, so sample i is also
contrasted with the hazy inputs of the next samples (the paper's "negatives from the same batch"). The
ablation form is the positive-only perceptual loss sum_i w_i * L1(a_i, p_i). Images are fed in [0, 1] with
no ImageNet normalisation, as the official code does.

VGG19 ImageNet weights are never downloaded here: they come from a file the user names, or from torchvision's
cache (torch.hub's checkpoints folder) when present; otherwise the loss refuses, unless the user asks for a
randomly initialised, fixed VGG19 ("random"), which is then logged.
"""
import logging
import os
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger("aecr_model")

# features[a:b] ends after relu1_1 (index 1), relu2_1 (6), relu3_1 (11), relu4_1 (20) and relu5_1 (29).
VGG_SLICES = ((0, 2), (2, 7), (7, 12), (12, 21), (21, 30))
CR_WEIGHTS = (1.0 / 32, 1.0 / 16, 1.0 / 8, 1.0 / 4, 1.0)


class VGGWeightsError(RuntimeError):
    """No VGG19 ImageNet weights available, and random ones were not asked for."""


def vgg19_cache_path() -> str:
    """Where torchvision keeps VGG19's ImageNet weights once downloaded."""
    from torchvision.models import VGG19_Weights
    filename = os.path.basename(VGG19_Weights.IMAGENET1K_V1.url)
    return os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def vgg19_features(weights: Optional[str] = None, seed: int = 0) -> nn.Sequential:
    """VGG19's `features` up to relu5_1, frozen and in eval mode.

    weights: a path to torchvision's VGG19 state dict (whole model or its `features`), None to take it from
    torchvision's cache, or "random" for a randomly initialised (seeded) network.
    """
    from torchvision.models import vgg19
    if weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            features = vgg19(weights=None).features[:30]
        log.warning("contrastive regularisation uses a RANDOMLY INITIALISED VGG19 (seed %d), not ImageNet weights",
                    seed)
    else:
        path = weights if weights is not None else vgg19_cache_path()
        if not os.path.isfile(path):
            where = f"the file {weights} does not exist" if weights is not None else (
                f"they are not in torchvision's cache ({path})")
            raise VGGWeightsError(
                f"contrastive regularisation needs VGG19 ImageNet weights and {where}. Name the file with "
                f"--vgg-weights PATH (torchvision's vgg19-dcbb9e9d.pth), copy it to {vgg19_cache_path()}, use "
                f"--vgg-weights random for a fixed random VGG19, or turn CR off with --cr-weight 0")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        model = vgg19(weights=None)
        if any(k.startswith("features.") for k in state):
            state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        missing, _ = model.features.load_state_dict(state, strict=False)
        if any(int(k.split(".")[0]) < 30 for k in missing):
            raise VGGWeightsError(f"{path} is not a VGG19 state dict: missing {missing[:4]}")
        features = model.features[:30]
        log.info("contrastive regularisation uses VGG19 weights from %s", path)
    for p in features.parameters():
        p.requires_grad_(False)
    return features.eval()


class ContrastiveRegularization(nn.Module):
    """CR loss; ``forward(restored, clear, hazy)`` with images [B, 3, H, W] in [0, 1] returns a scalar."""

    def __init__(self, vgg_weights: Optional[str] = None, num_negatives: int = 1, ablation: bool = False,
                 weights: Sequence[float] = CR_WEIGHTS, seed: int = 0):
        super().__init__()
        if num_negatives < 1:
            raise ValueError(f"ContrastiveRegularization: `num_negatives` must be >= 1, got {num_negatives}")
        self.vgg = vgg19_features(vgg_weights, seed)
        self.num_negatives = num_negatives
        self.ablation = ablation
        self.weights = tuple(float(w) for w in weights)

    def train(self, mode: bool = True):
        super().train(mode)
        self.vgg.eval()  # always frozen
        return self

    def features(self, x: Tensor) -> List[Tensor]:
        out = []
        for start, end in VGG_SLICES:
            x = self.vgg[start:end](x)
            out.append(x)
        return out

    def forward(self, restored: Tensor, clear: Tensor, hazy: Tensor) -> Tensor:
        a = self.features(restored)
        with torch.no_grad():
            p = self.features(clear)
            n = None if self.ablation else self.features(hazy)
        negatives = min(self.num_negatives, restored.shape[0])
        loss = restored.new_zeros(())
        for i, w in enumerate(self.weights):
            d_ap = F.l1_loss(a[i], p[i])
            if self.ablation:
                loss = loss + w * d_ap
                continue
            d_an = sum(F.l1_loss(a[i], torch.roll(n[i], shifts=s, dims=0)) for s in range(negatives)) / negatives
            loss = loss + w * d_ap / (d_an + 1e-7)
        return loss
