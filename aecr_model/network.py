"""AECR-Net (Wu et al., CVPR 2021): the compact dehazing autoencoder, as in the official code.

State-dict keys and shapes are the official ones, so official weights load unchanged (see checkpoint.py).
"""
from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import aecr_ops


class PALayer(nn.Module):
    """Pixel attention: x * sigmoid(conv(relu(conv(x)))), one weight per pixel."""

    def __init__(self, channels: int):
        super().__init__()
        self.pa = nn.Sequential(
            nn.Conv2d(channels, channels // 8, 1, padding=0, bias=True), nn.ReLU(inplace=True),
            nn.Conv2d(channels // 8, 1, 1, padding=0, bias=True), nn.Sigmoid())

    def attention(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> the weights [B, 1, H, W]."""
        return self.pa(x)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.attention(x)


class CALayer(nn.Module):
    """Channel attention: x * sigmoid(conv(relu(conv(global average of x)))), one weight per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.ca = nn.Sequential(
            nn.Conv2d(channels, channels // 8, 1, padding=0, bias=True), nn.ReLU(inplace=True),
            nn.Conv2d(channels // 8, channels, 1, padding=0, bias=True), nn.Sigmoid())

    def attention(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> the weights [B, C, 1, 1]."""
        return self.ca(self.avg_pool(x))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.attention(x)


class FABlock(nn.Module):
    """The feature-attention block of FFA-Net: r = relu(conv1(x)) + x; r = PA(CA(conv2(r))); return r + x."""

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, bias=True)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, bias=True)
        self.calayer = CALayer(channels)
        self.palayer = PALayer(channels)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return self._forward_in_place(x)
        res = self.act1(self.conv1(x)) + x
        res = self.palayer(self.calayer(self.conv2(res)))
        return res + x

    def _forward_in_place(self, x: Tensor) -> Tensor:
        """forward's values without autograd, the additions and attention products done in the block's own
        intermediates (x [B, C, H, W] is left as it is): four fewer full-size tensors per call."""
        res = _add_(self.act1(self.conv1(x)), x)
        res = self.conv2(res)
        res = _mul_(res, self.calayer.attention(res))
        res = _mul_(res, self.palayer.attention(res))
        return _add_(res, x)


def _add_(a: Tensor, b: Tensor) -> Tensor:
    """a + b, in a's memory unless that would change the result's dtype (b wider, as under autocast)."""
    return a.add_(b) if torch.promote_types(a.dtype, b.dtype) == a.dtype else a + b


def _mul_(a: Tensor, b: Tensor) -> Tensor:
    """a * b, in a's memory unless that would change the result's dtype (b wider, as under autocast)."""
    return a.mul_(b) if torch.promote_types(a.dtype, b.dtype) == a.dtype else a * b


class ConvTranspose2d(nn.ConvTranspose2d):
    """nn.ConvTranspose2d (same parameters and state dict) with a faster CPU path without autograd.

    On the CPU PyTorch computes a transposed convolution in channels-last (oneDNN) and converts a default-layout
    result back with a strided copy that costs up to a third of the layer (up2 at 720 x 1280: 0.2 s of 0.6 s).
    Here the weight is handed over channels-last, so that PyTorch keeps the result channels-last, and a blocked
    2-D transpose per image converts it: the same values, up1 + up2 in 0.63 s instead of 0.76 s at 720 x 1280. With
    ``channels_last_out`` the result stays channels-last, for a next layer that runs faster so (AECR-Net's up2,
    whose map goes to the 64 -> 3 output convolution). Autograd, other devices, other layouts and compilers
    (ONNX export) take nn.ConvTranspose2d's path.

    Shapes: ``forward(x [B, C_in, H, W]) -> [B, C_out, Ho, Wo]`` as nn.ConvTranspose2d.
    """

    def __init__(self, *args, channels_last_out: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.channels_last_out = channels_last_out

    def forward(self, x: Tensor, output_size=None) -> Tensor:
        if (output_size is not None or torch.is_grad_enabled() or x.device.type != "cpu" or x.dim() != 4
                or not x.is_contiguous() or self.padding_mode != "zeros" or torch.compiler.is_compiling()):
            return super().forward(x, output_size)
        weight = self.weight.contiguous(memory_format=torch.channels_last)
        y = F.conv_transpose2d(x, weight, self.bias, self.stride, self.padding, self.output_padding, self.groups,
                               self.dilation)
        return y if self.channels_last_out else channels_last_to_contiguous(y)


def channels_last_to_contiguous(y: Tensor) -> Tensor:
    """y [B, C, H, W] in the default layout; from channels-last by a [H*W, C] -> [C, H*W] transpose per image
    (PyTorch's blocked 2-D transpose copy), from any other layout by y.contiguous()."""
    if y.is_contiguous() or not y.is_contiguous(memory_format=torch.channels_last):
        return y.contiguous()
    batch, channels, height, width = y.shape
    out = torch.empty((batch, channels, height, width), dtype=y.dtype, device=y.device)
    for image, source in zip(out, y):
        image.view(channels, height * width).copy_(source.permute(1, 2, 0).reshape(height * width, channels).t())
    return out


class DCNBlock(nn.Module):
    """The dynamic feature-enhancement layer: a 3x3 DCNv2 (aecr_ops.DCN)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.dcn = aecr_ops.DCN(in_channels, out_channels, kernel_size=(3, 3), stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.dcn(x)


class Mix(nn.Module):
    """Adaptive mixup of a skip connection: f * a + (1 - f) * b with f = sigmoid(w), w learned."""

    def __init__(self, m: float = -0.80):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([m], dtype=torch.float32))

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        f = torch.sigmoid(self.w)
        return a * f + b * (1 - f)


class SkipAdd(nn.Module):
    """The plain skip connection that adaptive mixup replaces (ablation): a + b."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a + b


class AECRNet(nn.Module):
    """AECR-Net: FastDeconv whitening, a 4x down-sampling encoder, six FA blocks, two DCN layers, two adaptive
    mixups with the encoder and a 4x up-sampling decoder ending in tanh.

    Args:
        in_channels, out_channels: image channels (3).
        ngf: base width (64).
        share_weights: True (the official network, 2,614,229 parameters): ONE FA block applied six times and ONE
            DCN applied twice. False: six FA blocks and two DCNs of their own (9,291,989 parameters), the reading
            of the paper's text.
        fastdeconv, dcn, mixup: the parts the paper's ablation removes, all True in AECR-Net. fastdeconv=False
            feeds the image straight to the encoder (no `deconv.*` weights); dcn=False drops the DCN layers (the
            FA blocks feed the decoder); mixup=False replaces both adaptive mixups by plain additions a + b (no
            `mix1.w`, `mix2.w`).

    Shapes: ``forward(x [B, C_in, H, W]) -> [B, C_out, H, W]`` with H and W multiples of 4; x in [0, 1]; the
    output is in [-1, 1] (tanh) and is clamped to [0, 1] for metrics and saving (see aecr_model.inference,
    which also pads other sizes).
    """

    size_multiple = 4  # the encoder halves the image twice

    def __init__(self, in_channels: int = 3, out_channels: int = 3, ngf: int = 64, share_weights: bool = True,
                 fastdeconv: bool = True, dcn: bool = True, mixup: bool = True):
        super().__init__()
        for value, name in ((in_channels, "in_channels"), (out_channels, "out_channels"), (ngf, "ngf")):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"AECRNet: `{name}` must be a positive int, got {value!r}")
        if ngf % 2:
            raise ValueError(f"AECRNet: `ngf` must be even (attention layers use ngf*4/8 channels), got {ngf}")
        for value, name in ((share_weights, "share_weights"), (fastdeconv, "fastdeconv"), (dcn, "dcn"),
                            (mixup, "mixup")):
            if not isinstance(value, bool):
                raise ValueError(f"AECRNet: `{name}` must be True or False, got {value!r}")
        self.config = dict(in_channels=in_channels, out_channels=out_channels, ngf=ngf, share_weights=share_weights,
                           fastdeconv=fastdeconv, dcn=dcn, mixup=mixup)
        width = ngf * 4
        self.down1 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(in_channels, ngf, kernel_size=7, padding=0),
                                   nn.ReLU(True))
        self.down2 = nn.Sequential(nn.Conv2d(ngf, ngf * 2, kernel_size=3, stride=2, padding=1), nn.ReLU(True))
        self.down3 = nn.Sequential(nn.Conv2d(ngf * 2, width, kernel_size=3, stride=2, padding=1), nn.ReLU(True))
        if share_weights:
            self.block = FABlock(width, 3)
            if dcn:
                self.dcn_block = DCNBlock(width, width)
        else:
            self.blocks = nn.ModuleList(FABlock(width, 3) for _ in range(6))
            if dcn:
                self.dcn_blocks = nn.ModuleList(DCNBlock(width, width) for _ in range(2))
        self.up1 = nn.Sequential(
            ConvTranspose2d(width, ngf * 2, kernel_size=3, stride=2, padding=1, output_padding=1), nn.ReLU(True))
        self.up2 = nn.Sequential(
            ConvTranspose2d(ngf * 2, ngf, kernel_size=3, stride=2, padding=1, output_padding=1,
                            channels_last_out=True), nn.ReLU(True))
        self.up3 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_channels, kernel_size=7, padding=0),
                                 nn.Tanh())
        self.deconv = (aecr_ops.FastDeconv(in_channels, in_channels, kernel_size=3, stride=1, padding=1)
                       if fastdeconv else nn.Identity())
        self.mix1 = Mix(m=-1) if mixup else SkipAdd()
        self.mix2 = Mix(m=-0.6) if mixup else SkipAdd()

    @property
    def share_weights(self) -> bool:
        return self.config["share_weights"]

    def fa_blocks(self):
        return [self.block] * 6 if self.share_weights else list(self.blocks)

    def dcn_layers(self):
        if not self.config["dcn"]:
            return []
        return [self.dcn_block] * 2 if self.share_weights else list(self.dcn_blocks)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.config["in_channels"]:
            shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"AECRNet: input must be [B, {self.config['in_channels']}, H, W], got {shape}")
        if x.shape[2] % 4 or x.shape[3] % 4:
            raise ValueError(f"AECRNet: input height and width must be multiples of 4, got {x.shape[2]}x"
                             f"{x.shape[3]} (aecr_model.dehaze pads any size)")
        # No name holds a feature map longer than the network needs it (the full-resolution ones are 236 MB at
        # 720 x 1280): without autograd, each is freed as soon as its last use is done.
        x_down2 = self.down2(self.down1(self.deconv(x)))
        x_down3 = self.down3(x_down2)
        h = x_down3
        for block in self.fa_blocks():
            h = block(h)
        for dcn in self.dcn_layers():
            h = dcn(h)
        h = self.mix1(x_down3, h)
        del x_down3
        h = self.mix2(x_down2, self.up1(h))
        del x_down2
        h = self.up2(h)
        # Without autograd on the CPU, up2 hands up3 its map channels-last (see ConvTranspose2d): oneDNN runs the
        # 64 -> 3 convolution 1.4x faster so (0.65 s -> 0.46 s at 720 x 1280), its sums in another order
        # (outputs within 1e-6), and no transposing copy is made in between.
        out = self.up3(h)
        return out.contiguous() if x.is_contiguous() else out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def config_from_state_dict(state: Dict[str, Tensor]) -> dict:
    """The AECRNet constructor arguments that a (normalised) state dict was made with (the ablated parts are
    the ones whose weights are absent)."""
    try:
        down1 = state["down1.1.weight"]
        up3 = state["up3.1.weight"]
    except KeyError as missing:
        raise ValueError(f"not an AECR-Net state dict: no {missing} key") from None
    return dict(in_channels=down1.shape[1], out_channels=up3.shape[0], ngf=down1.shape[0],
                share_weights="block.conv1.weight" in state, fastdeconv="deconv.weight" in state,
                dcn=any(".dcn." in key for key in state), mixup="mix1.w" in state)
