"""AECR-Net (Wu et al., CVPR 2021): the compact dehazing autoencoder, as in the official code.

State-dict keys and shapes are the official ones, so official weights load unchanged (see checkpoint.py).
"""
from typing import Dict

import torch
from torch import Tensor, nn

import aecr_ops


class PALayer(nn.Module):
    """Pixel attention: x * sigmoid(conv(relu(conv(x)))), one weight per pixel."""

    def __init__(self, channels: int):
        super().__init__()
        self.pa = nn.Sequential(
            nn.Conv2d(channels, channels // 8, 1, padding=0, bias=True), nn.ReLU(inplace=True),
            nn.Conv2d(channels // 8, 1, 1, padding=0, bias=True), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.pa(x)


class CALayer(nn.Module):
    """Channel attention: x * sigmoid(conv(relu(conv(global average of x)))), one weight per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.ca = nn.Sequential(
            nn.Conv2d(channels, channels // 8, 1, padding=0, bias=True), nn.ReLU(inplace=True),
            nn.Conv2d(channels // 8, channels, 1, padding=0, bias=True), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.ca(self.avg_pool(x))


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
        res = self.act1(self.conv1(x)) + x
        res = self.palayer(self.calayer(self.conv2(res)))
        return res + x


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
            nn.ConvTranspose2d(width, ngf * 2, kernel_size=3, stride=2, padding=1, output_padding=1), nn.ReLU(True))
        self.up2 = nn.Sequential(
            nn.ConvTranspose2d(ngf * 2, ngf, kernel_size=3, stride=2, padding=1, output_padding=1), nn.ReLU(True))
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
        x_deconv = self.deconv(x)
        x_down1 = self.down1(x_deconv)
        x_down2 = self.down2(x_down1)
        x_down3 = self.down3(x_down2)
        h = x_down3
        for block in self.fa_blocks():
            h = block(h)
        for dcn in self.dcn_layers():
            h = dcn(h)
        x_up1 = self.up1(self.mix1(x_down3, h))
        x_up2 = self.up2(self.mix2(x_down2, x_up1))
        return self.up3(x_up2)


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
