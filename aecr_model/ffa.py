"""FFA-Net (Qin et al., *FFA-Net: Feature Fusion Attention Network for Single Image Dehazing*, AAAI 2020), as in
the official code (zhilin007/FFA-Net, net/models/FFA.py), with its state-dict keys and shapes, so the released
weights (`its_train_ffa_3_19.pk`, `ots_train_ffa_3_19.pk`: {"model": the state dict of an nn.DataParallel, ...})
load once their `module.` prefixes are stripped (see checkpoint.py).

The official training and test scripts feed the network images normalised with OFFICIAL_INPUT_MEAN and
OFFICIAL_INPUT_STD (torchvision's Normalize), and the global residual adds that normalised input back; the
target is the clear image in [0, 1]. So the released weights expect normalised inputs: FFANet normalises its
[0, 1] input itself (`normalize_input=True`, the default), so that it takes images like every network here.
"""
import re
from typing import Dict, List, Mapping, NoReturn, Set

import torch
from torch import Tensor, nn

from .network import FABlock, PALayer

# The normalisation of the official data loader (net/data_utils.py) and test script (net/test.py).
OFFICIAL_INPUT_MEAN = (0.64, 0.6, 0.58)
OFFICIAL_INPUT_STD = (0.14, 0.15, 0.152)

_KERNEL_SIZE = 3


def _conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    """The official default_conv with kernel 3: 'same' zero padding, with bias."""
    return nn.Conv2d(in_channels, out_channels, _KERNEL_SIZE, padding=_KERNEL_SIZE // 2, bias=True)


class Group(nn.Module):
    """`blocks` FA blocks and a 3x3 conv (gp.0 .. gp.<blocks-1>, gp.<blocks>), with a residual connection:
    ``forward(x [B, dim, H, W]) -> gp(x) + x [B, dim, H, W]``."""

    def __init__(self, dim: int, blocks: int):
        super().__init__()
        self.gp = nn.Sequential(*[FABlock(dim, _KERNEL_SIZE) for _ in range(blocks)], _conv(dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.gp(x) + x


class FFANet(nn.Module):
    """FFA-Net: a 3x3 conv to `dim` channels, `groups` residual groups of `blocks` FA blocks in a chain, a
    channel attention over all the groups' outputs that weighs them into one feature map, pixel attention, two
    3x3 convs back to RGB, and the input added back (global residual).

        x0 = pre(x);  r_1 = g1(x0);  r_k = g_k(r_(k-1))
        w = sigmoid(conv(relu(conv(avgpool(cat(r_1 .. r_G)))))),  [B, G*dim, 1, 1] read as [B, G, dim]
        out = post(PA(sum_k w[:, k] * r_k)) + x     (x normalised first, see normalize_input)

    Args:
        groups: number of residual groups (3 in the official network, whose code allows no other; any positive
            number works here, as attributes g1, g2, ...).
        blocks: FA blocks per group (19 in the released weights; the official option.py defaults to 20).
        dim: feature channels (64, fixed in the official code); a multiple of 16, since the fusion attention
            squeezes to dim // 16 channels (and the FA blocks' attention to dim // 8).
        normalize_input: True (the official pipeline): x is first normalised, x = (x - OFFICIAL_INPUT_MEAN) /
            OFFICIAL_INPUT_STD, per channel, and the global residual adds that normalised x. False: the raw
            input goes in and is added back.

    The official network (3, 19, 64) has 4,455,913 parameters: a 3x3 conv 64->64 has 36,928 (36,864 + 64), an
    FA block 75,481 (two such convs, 1,096 in CA: 64->8->64 1x1, 529 in PA: 64->8->1 1x1), a group 1,471,067
    (19 blocks and a conv), the three groups 4,413,201; with the fusion attention (192->4->192 1x1: 1,732), the
    pixel attention (529), pre (3->64: 1,792) and post (64->64, 64->3: 36,928 + 1,731).

    Shapes: ``forward(x [B, 3, H, W]) -> [B, 3, H, W]`` for any H, W (no resampling). The output is not
    clamped (clamp it to [0, 1] for metrics and saving).
    """

    size_multiple = 1  # no down-sampling: any image size

    def __init__(self, groups: int = 3, blocks: int = 19, dim: int = 64, normalize_input: bool = True):
        super().__init__()
        for value, name in ((groups, "groups"), (blocks, "blocks"), (dim, "dim")):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"FFANet: `{name}` must be a positive int, got {value!r}")
        if not isinstance(normalize_input, bool):
            raise ValueError(f"FFANet: `normalize_input` must be True or False, got {normalize_input!r}")
        if dim % 16:
            raise ValueError(f"FFANet: `dim` must be a multiple of 16 (the fusion attention uses dim // 16 "
                             f"channels), got {dim}")
        self.config = dict(groups=groups, blocks=blocks, dim=dim, normalize_input=normalize_input)
        # Not in the state dict (persistent=False), whose keys stay the official ones; float64, and cast to the
        # input's dtype when used, so that a float64 model normalises with the exact constants.
        for name, values in (("input_mean", OFFICIAL_INPUT_MEAN), ("input_std", OFFICIAL_INPUT_STD)):
            self.register_buffer(name, torch.tensor(values, dtype=torch.float64).view(1, 3, 1, 1), persistent=False)
        self.pre = nn.Sequential(_conv(3, dim))
        for i in range(1, groups + 1):
            self.add_module(f"g{i}", Group(dim, blocks))
        self.ca = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(dim * groups, dim // 16, 1, padding=0, bias=True), nn.ReLU(inplace=True),
            nn.Conv2d(dim // 16, dim * groups, 1, padding=0, bias=True), nn.Sigmoid())
        self.palayer = PALayer(dim)
        self.post = nn.Sequential(_conv(dim, dim), _conv(dim, 3))

    def group_modules(self) -> List[Group]:
        """The residual groups g1, g2, ... in order."""
        return [getattr(self, f"g{i}") for i in range(1, self.config["groups"] + 1)]

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != 3:
            shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"FFANet: input must be [B, 3, H, W], got {shape}")
        groups, dim = self.config["groups"], self.config["dim"]
        if self.config["normalize_input"]:
            x = (x - self.input_mean.to(x.dtype)) / self.input_std.to(x.dtype)
        h = self.pre(x)
        res = []
        for group in self.group_modules():
            h = group(h)
            res.append(h)
        w = self.ca(torch.cat(res, dim=1)).view(-1, groups, dim)[:, :, :, None, None]
        out = w[:, 0] * res[0]
        for k in range(1, groups):  # left to right, as the official w0*r1 + w1*r2 + w2*r3
            out = out + w[:, k] * res[k]
        return self.post(self.palayer(out)) + x


_GROUP_LAYER = re.compile(r"g([1-9][0-9]*)\.gp\.([0-9]+)\.")


def is_ffa_state_dict(state: Mapping[str, object]) -> bool:
    """Whether a normalised (no `module.` prefix) state dict has FFA-Net's keys (g1.gp.0.conv1.weight and
    pre.0.weight)."""
    return "g1.gp.0.conv1.weight" in state and "pre.0.weight" in state


def config_from_state_dict(state: Mapping[str, Tensor]) -> Dict[str, int]:
    """The FFANet constructor arguments (groups, blocks, dim, normalize_input) a normalised (no `module.` prefix) FFA-Net state
    dict was made with. ValueError("not an FFA-Net state dict: ...") when its keys do not fit FFA-Net's layout
    (the other keys are left to load_state_dict to check)."""
    def fail(why: str) -> NoReturn:
        raise ValueError(f"not an FFA-Net state dict: {why}")

    if not is_ffa_state_dict(state):
        fail(f"no 'g1.gp.0.conv1.weight' or 'pre.0.weight' key (keys: {sorted(state)[:6]})")
    pre = state["pre.0.weight"]
    if not isinstance(pre, Tensor) or pre.dim() != 4 or pre.shape[1] != 3:
        shape = list(pre.shape) if isinstance(pre, Tensor) else type(pre).__name__
        fail(f"'pre.0.weight' is not a conv from 3 channels: {shape}")
    layers: Dict[int, Set[int]] = {}
    for key in state:
        match = _GROUP_LAYER.match(key)
        if match:
            layers.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    groups = len(layers)
    if sorted(layers) != list(range(1, groups + 1)):
        fail(f"its groups are g{', g'.join(map(str, sorted(layers)))}, not g1 .. g{groups}")
    blocks = sum(f"g1.gp.{j}.conv1.weight" in state for j in layers[1])
    for i in range(1, groups + 1):
        if layers[i] != set(range(blocks + 1)) or f"g{i}.gp.{blocks}.weight" not in state:
            fail(f"g{i}.gp holds layers {sorted(layers[i])}, not {blocks} FA blocks (0 .. {blocks - 1}) and a "
                 f"conv ({blocks}) as g1")
    # The weights do not say how their inputs were normalised; released ones expect the official normalisation.
    return dict(groups=groups, blocks=blocks, dim=int(pre.shape[0]), normalize_input=True)
