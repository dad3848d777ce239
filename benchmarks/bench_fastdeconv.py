"""The FastDeconv benchmarks' layers and calls, used by test_fastdeconv.py: aecr's ops and layer against the
original algorithm (aecr_ops.reference: the yechengxi/deconvolution layer re-implemented in plain PyTorch).

- patch statistics (mean and covariance of the layer's patches) forward+backward: aecr_ops.patch_statistics,
  straight from the image, against unfold + matmul;
- inverse square root of that covariance, forward+backward: aecr_ops.isqrt_newton_schulz against the iteration
  in autograd (above 48 features aecr evaluates it on the eigenvalues);
- the layer's training step (forward, mean of squares, backward; the input's gradient only where the shape
  says so): aecr_ops.FastDeconv against reference.FastDeconv, from the same weights.

    python benchmarks/bench_fastdeconv.py [pytest options]   # this part of the suite (pytest --benchmark-only)
"""
import dataclasses
import sys

import torch

import aecr_ops
from aecr_ops import reference

IMPLS = {"aecr": aecr_ops.FastDeconv, "original": reference.FastDeconv}


@dataclasses.dataclass(frozen=True)
class Layer:
    """A FastDeconv layer (3x3, padding 1) and its input: name, input shape, out channels, block, whether the
    input requires grad (AECR-Net's first layer: no)."""
    name: str
    input: tuple
    out_channels: int
    block: int
    input_grad: bool

    def __str__(self):
        return f"{self.name}-{'x'.join(str(v) for v in self.input)}"


# AECR-Net's layer (3 -> 3 on a batch of 16 crops of 256 x 256) and a 64-channel layer; tiny: batch 2 of 12 x 12.
LAYERS = {
    "full": [Layer("aecrnet", (16, 3, 256, 256), 3, 64, False), Layer("c64", (8, 64, 64, 64), 64, 64, True)],
    "tiny": [Layer("aecrnet", (2, 3, 12, 12), 3, 64, False), Layer("c64", (2, 64, 12, 12), 64, 64, True)],
}


def make_layer(impl, layer, device):
    """(module, input): the layer of this implementation from seed 0 (both implementations get the same weights),
    and a uniform input."""
    torch.manual_seed(0)
    module = IMPLS[impl](layer.input[1], layer.out_channels, 3, stride=1, padding=1, block=layer.block).to(device)
    x = torch.rand(layer.input, device=device).requires_grad_(layer.input_grad)
    return module, x


def training_step(module, x):
    """forward, mean of squares, backward."""
    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).square().mean().backward()
    return step


def statistics(impl, module, x):
    """(mean, cov) of the layer's patches of x, by aecr's op or by the original's unfold and matmul."""
    if impl == "aecr":
        return aecr_ops.patch_statistics(x, module.kernel_size, module.dilation, module.padding,
                                         module.sampling_stride, module.block, module.groups, module.eps)
    patches = reference.fastdeconv_patches(x, module.kernel_size, module.dilation, module.padding,
                                           module.sampling_stride)
    return reference.fastdeconv_statistics(patches, module.num_features, module.groups, module.eps)


def statistics_step(impl, module, x):
    """The patch statistics' forward and backward (x requires grad)."""
    x = x.detach().requires_grad_(True)

    def step():
        x.grad = None
        mean, cov = statistics(impl, module, x)
        (mean.sum() + cov.sum()).backward()
    return step


def isqrt_step(impl, module, x):
    """The inverse square root of the layer's covariance of x, forward and backward."""
    with torch.no_grad():
        _, cov = statistics("aecr", module, x)
    cov = cov.detach().requires_grad_(True)
    isqrt = aecr_ops.isqrt_newton_schulz if impl == "aecr" else reference.isqrt_newton_schulz

    def step():
        cov.grad = None
        isqrt(cov, module.n_iter).sum().backward()
    return step


STEPS = {"patch statistics": statistics_step, "inverse square root": isqrt_step}


if __name__ == "__main__":
    from bench_common import run_suite
    sys.exit(run_suite(["test_fastdeconv.py"], sys.argv[1:]))
