"""nn.Modules around the ops.

- :class:`ModulatedDeformConv2d`: our module (weight and bias; offset and mask are inputs).
- :class:`DCN`: the CharlesShang/DCNv2 layer that AECR-Net uses (offsets and mask from ``conv_offset_mask``).
- :class:`DeformConv2d`: a drop-in for ``torchvision.ops.DeformConv2d`` (same constructor, attributes, state
  dict, initialisation and repr).
- :class:`MMCVModulatedDeformConv2d` and :class:`ModulatedDeformConv2dPack`: drop-ins for mmcv's
  ``mmcv.ops.ModulatedDeformConv2d`` and ``ModulatedDeformConv2dPack`` (mmcv's "DCNv2"); the Pack's state dict
  is ``weight``, ``bias``, ``conv_offset.weight``, ``conv_offset.bias``. :mod:`aecr_ops.mmcv_compat` has them
  under mmcv's names.
"""
import math
import warnings
from typing import Optional, Union

import torch
from torch import Tensor, nn

from . import _checks
from .deform_conv import deform_conv2d


def _conv_parameters(module: nn.Module, name: str, in_channels: int, out_channels: int, kernel_size, stride,
                     padding, dilation, groups: int, bias: bool) -> None:
    """The attributes every module here shares (channel counts, (h, w) pairs, groups) and its uninitialised
    parameters: ``weight`` [out, in/groups, kh, kw] and ``bias`` [out] (registered as None without a bias)."""
    module.in_channels = in_channels
    module.out_channels = out_channels
    module.kernel_size = _checks.pair(kernel_size, "kernel_size", 1, name)
    module.stride = _checks.pair(stride, "stride", 1, name)
    module.padding = _checks.pair(padding, "padding", 0, name)
    module.dilation = _checks.pair(dilation, "dilation", 1, name)
    module.groups = groups
    module.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *module.kernel_size))
    if bias:
        module.bias = nn.Parameter(torch.empty(out_channels))
    else:
        module.register_parameter("bias", None)


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
        _conv_parameters(self, name, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self.deformable_groups = deformable_groups
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


def _check_counts(name: str, **counts) -> None:
    for label, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _checks.ArgumentError(f"{name}: `{label}` must be a positive int, got {value!r}")


def _check_groups(name: str, in_channels: int, out_channels: int, groups: int) -> None:
    if in_channels % groups or out_channels % groups:
        raise _checks.ArgumentError(
            f"{name}: `groups`={groups} must divide in_channels={in_channels} and out_channels={out_channels}")


class DeformConv2d(nn.Module):
    """A drop-in for :class:`torchvision.ops.DeformConv2d`: deformable convolution (DCNv1, or DCNv2 with a mask)
    whose offset and mask are inputs.

    Same constructor, attributes (``kernel_size``, ``stride``, ``padding``, ``dilation`` are pairs), parameters
    (``weight`` ``[out, in/groups, kh, kw]``, ``bias`` ``[out]`` or None), initialisation (``reset_parameters``
    draws the same numbers from the same generator, so the same seed gives the same parameters) and repr as
    torchvision's, so its state dicts load either way with ``strict=True``. Changing
    ``from torchvision.ops import DeformConv2d`` to ``from aecr_ops import DeformConv2d`` is the whole port.

    Args:
        in_channels, out_channels: channel counts.
        kernel_size, stride, padding, dilation: an int or a pair (h, w).
        groups: weight groups (divide both channel counts).
        bias: whether to learn a bias.

    Shapes: ``forward(input [B, C_in, H, W], offset [B, 2*og*kh*kw, Ho, Wo], mask [B, og*kh*kw, Ho, Wo] or None)
    -> [B, C_out, Ho, Wo]``; the offset groups ``og`` are read from offset's channels, as in torchvision.

    Bad constructor arguments raise :class:`aecr_ops.ArgumentError` (a ``ValueError``, as torchvision raises for
    groups that do not divide the channels) naming the argument.

    Example::

        >>> layer = aecr_ops.DeformConv2d(8, 4, kernel_size=3, padding=1)
        >>> x = torch.randn(1, 8, 16, 16)
        >>> layer(x, torch.zeros(1, 2 * 9, 16, 16)).shape
        torch.Size([1, 4, 16, 16])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True):
        super().__init__()
        name = type(self).__name__
        _check_counts(name, in_channels=in_channels, out_channels=out_channels, groups=groups)
        _check_groups(name, in_channels, out_channels, groups)
        _conv_parameters(self, name, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # torchvision's order and formulas: the weight as nn.Conv2d's (kaiming uniform, a = sqrt(5)), then the
        # bias uniform in +-1/sqrt(fan_in), fan_in = in/groups * kh * kw.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.kernel_size[0] * self.kernel_size[1]
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input: Tensor, offset: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return deform_conv2d(input, offset, self.weight, self.bias, stride=self.stride, padding=self.padding,
                             dilation=self.dilation, mask=mask)

    def __repr__(self) -> str:
        s = f"{type(self).__name__}({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, " \
            f"stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s + ")"


def mmcv_modulated_deform_conv2d(input: Tensor, offset: Tensor, mask: Optional[Tensor], weight: Tensor,
                                 bias: Optional[Tensor] = None, stride=1, padding=0, dilation=1, groups: int = 1,
                                 deform_groups: int = 1) -> Tensor:
    """mmcv's ``modulated_deform_conv2d``: mmcv's argument order, with ``groups`` and ``deform_groups`` given
    (and checked against the tensors' shapes) rather than inferred.

    As mmcv does (for fp16 and amp), ``input`` is cast to the dtype of ``offset``, and ``weight``, ``bias`` and
    ``mask`` to that of ``input``. ``mask=None`` computes DCNv1 (mmcv requires a mask).
    """
    op = "modulated_deform_conv2d"
    _check_counts(op, groups=groups, deform_groups=deform_groups)
    for t, label in ((input, "input"), (offset, "offset"), (weight, "weight")):
        _checks.tensor(t, label, 4, op)
    _checks.tensor(mask, "mask", 4, op, optional=True)
    _checks.tensor(bias, "bias", 1, op, optional=True)
    input = input.type_as(offset)
    weight = weight.type_as(input)
    bias = None if bias is None else bias.type_as(input)
    mask = None if mask is None else mask.type_as(input)
    if weight.shape[1] * groups != input.shape[1]:
        raise _checks.ArgumentError(
            f"{op}: `groups`={groups} times weight.shape[1]={weight.shape[1]} must equal the {input.shape[1]} "
            f"channels of `input` (weight shape {list(weight.shape)})")
    taps = weight.shape[2] * weight.shape[3]
    if offset.shape[1] != 2 * deform_groups * taps:
        raise _checks.ArgumentError(
            f"{op}: `offset` must have 2*deform_groups*kh*kw = {2 * deform_groups * taps} channels, got shape "
            f"{list(offset.shape)}")
    if mask is not None and mask.shape[1] != deform_groups * taps:
        raise _checks.ArgumentError(
            f"{op}: `mask` must have deform_groups*kh*kw = {deform_groups * taps} channels, got shape "
            f"{list(mask.shape)}")
    return deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)


class MMCVModulatedDeformConv2d(nn.Module):
    """A drop-in for mmcv's ``mmcv.ops.ModulatedDeformConv2d``: offset and mask are inputs,
    ``forward(x, offset, mask)``.

    Same constructor as mmcv's (``deform_groups``, default 1; the deprecated ``deformable_groups=`` keyword is
    accepted with mmcv's warning; ``bias`` a bool or mmcv's ``"auto"``, which is true here as in mmcv), the same
    attributes (pairs for kernel_size, stride, padding, dilation; ``transposed`` False and ``output_padding``
    (0,) for nn.Conv2d compatibility), state dict ``weight``, ``bias`` and mmcv's ``init_weights``: weight
    uniform in +-1/sqrt(in_channels*kh*kw), bias zero. As in mmcv, ``input`` is cast to ``offset``'s dtype, and
    weight, bias and mask to ``input``'s (see :func:`mmcv_modulated_deform_conv2d`).

    This differs from :class:`ModulatedDeformConv2d`, this project's own module (``deformable_groups``, DCNv2's
    weight bound 1/sqrt(in/groups*kh*kw), optional mask).

    Shapes: ``forward(x [B, C_in, H, W], offset [B, 2*dg*kh*kw, Ho, Wo], mask [B, dg*kh*kw, Ho, Wo])
    -> [B, C_out, Ho, Wo]``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, deform_groups: Optional[int] = None, bias: Union[bool, str] = True, *,
                 deformable_groups: Optional[int] = None):
        super().__init__()
        name = type(self).__name__
        if deformable_groups is not None:
            if deform_groups is not None:
                raise _checks.ArgumentError(
                    f"{name}: give `deform_groups` or its deprecated name `deformable_groups`, not both")
            warnings.warn(f'"deformable_groups" is deprecated in `{name}.__init__`, please use "deform_groups" '
                          'instead', stacklevel=2)
            deform_groups = deformable_groups
        if deform_groups is None:
            deform_groups = 1
        _check_counts(name, in_channels=in_channels, out_channels=out_channels, groups=groups,
                      deform_groups=deform_groups)
        _check_groups(name, in_channels, out_channels, groups)
        if in_channels % deform_groups:
            raise _checks.ArgumentError(
                f"{name}: `deform_groups`={deform_groups} must divide in_channels={in_channels}")
        if isinstance(bias, str) and bias != "auto":
            raise _checks.ArgumentError(f"{name}: `bias` must be a bool or 'auto', got {bias!r}")
        _conv_parameters(self, name, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bool(bias))
        self.deform_groups = deform_groups
        self.transposed = False
        self.output_padding = (0,)
        self.init_weights()

    def init_weights(self) -> None:
        # mmcv's bound counts all in_channels, not in_channels / groups.
        stdv = 1.0 / math.sqrt(self.in_channels * self.kernel_size[0] * self.kernel_size[1])
        with torch.no_grad():
            self.weight.uniform_(-stdv, stdv)
            if self.bias is not None:
                self.bias.zero_()

    def _deform(self, x: Tensor, offset: Tensor, mask: Optional[Tensor]) -> Tensor:
        return mmcv_modulated_deform_conv2d(x, offset, mask, self.weight, self.bias, self.stride, self.padding,
                                            self.dilation, self.groups, self.deform_groups)

    def forward(self, x: Tensor, offset: Tensor, mask: Optional[Tensor]) -> Tensor:
        return self._deform(x, offset, mask)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"deform_groups={self.deform_groups}, bias={self.bias is not None}")


class ModulatedDeformConv2dPack(MMCVModulatedDeformConv2d):
    """A drop-in for mmcv's ``mmcv.ops.ModulatedDeformConv2dPack`` (registered in mmcv as "DCNv2"): DCNv2 used
    like a plain convolution, offsets and mask predicted from the input.

    ``conv_offset`` is a Conv2d(in_channels, 3*dg*kh*kw, kernel_size, stride, padding, dilation) initialised to
    zero; ``forward(x)`` splits its output in three along channels (o1, o2, m), ``offset = cat(o1, o2)``,
    ``mask = sigmoid(m)``, as mmcv does (and as CharlesShang/DCNv2's DCN does with ``conv_offset_mask``: the
    channel layout is the same, so :class:`DCN` weights load here once ``conv_offset_mask`` is renamed
    ``conv_offset``). The state dict is exactly ``weight``, ``bias``, ``conv_offset.weight``,
    ``conv_offset.bias``; state dicts of mmcv's version 1 (``<name>_offset.*`` beside the layer) are converted on
    loading, as mmcv does. The constructor draws random numbers in mmcv's order (weight, conv_offset's own
    initialisation, weight again), so a seed gives the same weight as mmcv's.

    Shapes: ``forward(x [B, C_in, H, W]) -> [B, C_out, Ho, Wo]``.

    Example::

        >>> layer = aecr_ops.ModulatedDeformConv2dPack(16, 16, kernel_size=3, padding=1, deform_groups=2)
        >>> layer(torch.randn(2, 16, 20, 20)).shape
        torch.Size([2, 16, 20, 20])
    """

    _version = 2

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, deform_groups: Optional[int] = None, bias: Union[bool, str] = True, *,
                 deformable_groups: Optional[int] = None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, deform_groups,
                         bias, deformable_groups=deformable_groups)
        self.conv_offset = nn.Conv2d(
            self.in_channels, self.deform_groups * 3 * self.kernel_size[0] * self.kernel_size[1],
            kernel_size=self.kernel_size, stride=self.stride, padding=self.padding, dilation=self.dilation,
            bias=True)
        self.init_weights()

    def init_weights(self) -> None:
        super().init_weights()
        if hasattr(self, "conv_offset"):
            with torch.no_grad():
                self.conv_offset.weight.zero_()
                self.conv_offset.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        out = self.conv_offset(x)
        o1, o2, mask = torch.chunk(out, 3, dim=1)
        offset = torch.cat((o1, o2), dim=1)
        mask = torch.sigmoid(mask)
        return self._deform(x, offset, mask)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        version = local_metadata.get("version", None)
        if version is None or version < 2:
            # mmcv's version 1 kept the offset conv beside the layer: "<prefix minus its dot>_offset.*".
            for param in ("weight", "bias"):
                new, old = f"{prefix}conv_offset.{param}", f"{prefix[:-1]}_offset.{param}"
                if new not in state_dict and old in state_dict:
                    state_dict[new] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
