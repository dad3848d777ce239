"""aecr_ops: the custom operators of AECR-Net, with CPU and CUDA kernels.

- :func:`deform_conv2d`, :class:`ModulatedDeformConv2d`, :class:`DCN`: modulated deformable convolution
  (DCNv2), a drop-in for torchvision.ops.deform_conv2d and CharlesShang/DCNv2's DCN.
- :class:`DeformConv2d`: a drop-in for torchvision.ops.DeformConv2d (same state dict, initialisation, repr).
- :class:`ModulatedDeformConv2dPack`, :class:`MMCVModulatedDeformConv2d`: drop-ins for mmcv.ops'
  ModulatedDeformConv2dPack ("DCNv2") and ModulatedDeformConv2d; :mod:`aecr_ops.mmcv_compat` gives them (and
  mmcv's functional ``modulated_deform_conv2d``) under mmcv's names.
- :class:`FastDeconv`, :func:`patch_statistics`, :func:`isqrt_newton_schulz`: network deconvolution
  (FastDeconv whitening), exact to the original layer of yechengxi/deconvolution.
- :func:`workspace_bytes`, :func:`release_workspaces`: the CPU column workspaces kept between calls.
- :mod:`aecr_ops.reference`: pure-PyTorch references (no compiled code needed).
- :mod:`aecr_ops.flops`: the ops' FLOP formulas, registered with ``torch.utils.flop_counter`` on import.

The ops are registered with PyTorch's dispatcher as ``torch.ops.aecr_ops.*``, with fake kernels and autograd,
so they work with torch.compile, torch.library.opcheck, autocast and torch.use_deterministic_algorithms.
"""
from . import reference
from ._checks import ArgumentError, ArgumentTypeError
from ._extension import cuda_kernels_built, extension_loaded
from .deform_conv import deform_conv2d, deform_conv2d_path, release_workspaces, workspace_bytes
from .fastdeconv import FastDeconv, isqrt_newton_schulz, patch_statistics
from .modules import (DCN, DeformConv2d, MMCVModulatedDeformConv2d, ModulatedDeformConv2d,
                      ModulatedDeformConv2dPack)

if extension_loaded():
    from . import _registrations  # noqa: F401
from . import flops  # noqa: F401, E402  (registers the ops' FLOP formulas with torch.utils.flop_counter)

__all__ = [
    "deform_conv2d", "deform_conv2d_path", "release_workspaces", "workspace_bytes", "ModulatedDeformConv2d", "DCN",
    "DeformConv2d", "ModulatedDeformConv2dPack", "MMCVModulatedDeformConv2d", "FastDeconv", "patch_statistics",
    "isqrt_newton_schulz", "reference", "ArgumentError", "ArgumentTypeError", "extension_loaded",
    "cuda_kernels_built",
]
__version__ = "0.1.0"
