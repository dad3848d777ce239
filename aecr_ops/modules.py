"""nn.Modules around the ops: ModulatedDeformConv2d and the CharlesShang/DCNv2 `DCN` layer."""
import math
from typing import Optional

import torch
from torch import Tensor, nn

from . import _checks
from .deform_conv import deform_conv2d


class ModulatedDeformConv2d(nn.Module):
    """Modulated deformable convolution with its own weight and bias; offset and mask are inputs.

    Args:
        in_channels, out_channels: channel counts.
        kernel_size, stride, padding, dilation: an int or a pair (h, w).
        groups: weight groups (divide both channel counts).
        deformable_groups: offset groups (divide in_channels); each has its own offsets and mask.
        bias: whether to learn a bias.

    Shapes: ``forward(input [B, C_in, H, W], offset [B, 2*dg*kh*kw, Ho, Wo], mask [B, dg*kh*kw, Ho, Wo] or
    None) -> [B, C_out, Ho, Wo]``.

    Parameters are initialised as in DCNv2: weight uniform in +-1/sqrt(C_in/groups*kh*kw), bias zero.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, deformable_groups: int = 1, bias: bool = True):
        super().__init__()
        name = type(self).__name__
        for value, label in ((in_channels, "in_channels"), (out_channels, "out_channels"), (groups, "groups"),
                             (deformable_groups, "deformable_groups")):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise _checks.ArgumentError(f"{name}: `{label}` must be a positive int, got {value!r}")
        if in_channels % groups or out_channels % groups:
            raise _checks.ArgumentError(
                f"{name}: `groups`={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        if in_channels % deformable_groups:
            raise _checks.ArgumentError(
                f"{name}: `deformable_groups`={deformable_groups} must divide in_channels={in_channels}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _checks.pair(kernel_size, "kernel_size", 1, name)
        self.stride = _checks.pair(stride, "stride", 1, name)
        self.padding = _checks.pair(padding, "padding", 0, name)
        self.dilation = _checks.pair(dilation, "dilation", 1, name)
        self.groups = groups
        self.deformable_groups = deformable_groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        fan_in = self.weight.shape[1] * self.kernel_size[0] * self.kernel_size[1]
        stdv = 1.0 / math.sqrt(fan_in)
        with torch.no_grad():
            self.weight.uniform_(-stdv, stdv)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, input: Tensor, offset: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        taps = self.kernel_size[0] * self.kernel_size[1]
        if isinstance(offset, Tensor) and offset.dim() == 4 and offset.shape[1] != 2 * self.deformable_groups * taps:
            raise _checks.ArgumentError(
                f"{type(self).__name__}: `offset` must have 2*deformable_groups*kh*kw = "
                f"{2 * self.deformable_groups * taps} channels, got shape {list(offset.shape)}")
        return deform_conv2d(input, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"deformable_groups={self.deformable_groups}, bias={self.bias is not None}")


class DCN(ModulatedDeformConv2d):
    """The DCNv2 layer of CharlesShang/DCNv2 (as used by AECR-Net): offsets and mask predicted from the input.

    ``conv_offset_mask`` is a Conv2d(in_channels, 3*dg*kh*kw) initialised to zero; its output is split in three
    along channels (o1, o2, m), ``offset = cat(o1, o2)`` and ``mask = sigmoid(m)``. At initialisation the layer
    therefore computes ``0.5 * conv2d(x, weight) + bias``. The state dict is exactly ``weight``, ``bias``,
    ``conv_offset_mask.weight``, ``conv_offset_mask.bias``, so DCNv2 checkpoints load unchanged.

    Unlike the original, ``conv_offset_mask`` uses the layer's dilation too, so that its output matches the
    layer's output size when dilation > 1 (identical otherwise).

    Shapes: ``forward(input [B, C_in, H, W]) -> [B, C_out, Ho, Wo]``.

    Example::

        >>> layer = aecr_ops.DCN(64, 64, kernel_size=3, stride=1, padding=1)
        >>> layer(torch.randn(2, 64, 32, 32)).shape
        torch.Size([2, 64, 32, 32])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride, padding, dilation=1,
                 deformable_groups: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups=1,
                         deformable_groups=deformable_groups, bias=True)
        channels = self.deformable_groups * 3 * self.kernel_size[0] * self.kernel_size[1]
        self.conv_offset_mask = nn.Conv2d(in_channels, channels, kernel_size=self.kernel_size, stride=self.stride,
                                          padding=self.padding, dilation=self.dilation, bias=True)
        self.init_offset()

    def init_offset(self) -> None:
        with torch.no_grad():
            self.conv_offset_mask.weight.zero_()
            self.conv_offset_mask.bias.zero_()

    def forward(self, input: Tensor) -> Tensor:
        out = self.conv_offset_mask(input)
        o1, o2, mask = torch.chunk(out, 3, dim=1)
        offset = torch.cat((o1, o2), dim=1)
        mask = torch.sigmoid(mask)
        return deform_conv2d(input, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask)
