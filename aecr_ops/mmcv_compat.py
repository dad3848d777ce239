"""mmcv's deformable-convolution names, backed by aecr_ops: change
``from mmcv.ops import ModulatedDeformConv2dPack`` to ``from aecr_ops.mmcv_compat import ModulatedDeformConv2dPack``
(likewise ``ModulatedDeformConv2d`` and ``modulated_deform_conv2d``).

- ``ModulatedDeformConv2dPack``: mmcv's "DCNv2" layer; state dict ``weight``, ``bias``, ``conv_offset.weight``,
  ``conv_offset.bias`` (mmcv's version-1 keys are converted on loading, as mmcv does).
- ``ModulatedDeformConv2d``: mmcv's module with ``forward(x, offset, mask)`` (aecr_ops.MMCVModulatedDeformConv2d;
  ``aecr_ops.ModulatedDeformConv2d`` is this project's own, different module).
- ``modulated_deform_conv2d(input, offset, mask, weight, bias, stride, padding, dilation, groups,
  deform_groups)``: mmcv's functional form and argument order.
"""
from .modules import MMCVModulatedDeformConv2d as ModulatedDeformConv2d
from .modules import ModulatedDeformConv2dPack
from .modules import mmcv_modulated_deform_conv2d as modulated_deform_conv2d

__all__ = ["ModulatedDeformConv2d", "ModulatedDeformConv2dPack", "modulated_deform_conv2d"]
