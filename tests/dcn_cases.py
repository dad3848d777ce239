"""Random deform_conv2d problems shared by the DCN tests."""
import dataclasses
import random
from typing import Tuple

import torch
import torch.nn.functional as F


@dataclasses.dataclass
class Case:
    batch: int
    in_channels: int
    out_channels: int
    size: Tuple[int, int]
    kernel: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int
    offset_groups: int
    use_mask: bool
    use_bias: bool
    offset_scale: float = 2.0

    def out_size(self):
        return tuple((s + 2 * p - (d * (k - 1) + 1)) // st + 1
                     for s, p, d, k, st in zip(self.size, self.padding, self.dilation, self.kernel, self.stride))

    def tensors(self, dtype=torch.float64, device="cpu", seed=0):
        """(input, offset, weight, bias, mask) with offsets large enough to cross the borders."""
        g = torch.Generator().manual_seed(seed)
        kh, kw = self.kernel
        ho, wo = self.out_size()
        x = torch.randn(self.batch, self.in_channels, *self.size, generator=g, dtype=torch.float64)
        offset = self.offset_scale * torch.randn(self.batch, 2 * self.offset_groups * kh * kw, ho, wo, generator=g,
                                                 dtype=torch.float64)
        weight = torch.randn(self.out_channels, self.in_channels // self.groups, kh, kw, generator=g,
                             dtype=torch.float64)
        bias = torch.randn(self.out_channels, generator=g, dtype=torch.float64) if self.use_bias else None
        mask = torch.rand(self.batch, self.offset_groups * kh * kw, ho, wo, generator=g,
                          dtype=torch.float64) if self.use_mask else None
        cast = lambda t: None if t is None else t.to(dtype=dtype, device=device)  # noqa: E731
        return cast(x), cast(offset), cast(weight), cast(bias), cast(mask)

    def kwargs(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation)


def random_case(rng: random.Random, max_batch: int = 3) -> Case:
    groups = rng.choice([1, 1, 2])
    offset_groups = rng.choice([1, 1, 2, 3])
    base = groups * offset_groups
    in_channels = base * rng.choice([1, 2])
    out_channels = groups * rng.choice([1, 2, 3])
    kernel = (rng.choice([1, 2, 3]), rng.choice([1, 2, 3]))
    dilation = (rng.choice([1, 2]), rng.choice([1, 2]))
    padding = (rng.choice([0, 1, 2]), rng.choice([0, 1, 2]))
    stride = (rng.choice([1, 2]), rng.choice([1, 2]))
    while True:
        size = (rng.randint(3, 9), rng.randint(3, 9))
        case = Case(rng.randint(1, max_batch), in_channels, out_channels, size, kernel, stride, padding, dilation,
                    groups, offset_groups, rng.random() < 0.7, rng.random() < 0.7)
        if min(case.out_size()) > 0:
            return case


def random_cases(n: int, seed: int = 1234, max_batch: int = 3):
    rng = random.Random(seed)
    return [random_case(rng, max_batch) for _ in range(n)]


# The AECR-Net layer in miniature, and cases that single out one feature each.
NAMED_CASES = {
    "3x3_pad1_mask": Case(2, 4, 5, (7, 8), (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, True, True),
    "no_mask_no_bias": Case(2, 4, 3, (6, 6), (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, False, False),
    "weight_groups": Case(2, 6, 4, (6, 7), (3, 3), (1, 1), (1, 1), (1, 1), 2, 1, True, True),
    "offset_groups": Case(1, 6, 4, (6, 6), (3, 3), (1, 1), (1, 1), (1, 1), 1, 3, True, True),
    "both_groups": Case(2, 8, 4, (5, 6), (3, 3), (1, 1), (1, 1), (1, 1), 2, 4, True, False),
    "stride2": Case(2, 3, 4, (9, 8), (3, 3), (2, 2), (1, 1), (1, 1), 1, 1, True, True),
    "dilation2": Case(1, 3, 4, (9, 9), (3, 3), (1, 1), (2, 2), (2, 2), 1, 1, True, True),
    "non_square": Case(2, 3, 2, (7, 9), (2, 3), (1, 2), (0, 1), (2, 1), 1, 1, True, True),
    "1x1": Case(2, 4, 3, (5, 5), (1, 1), (1, 1), (0, 0), (1, 1), 1, 1, True, True),
    "huge_offsets": Case(2, 3, 2, (6, 6), (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, True, True, offset_scale=50.0),
}


def fit_to_a_target(layer, target, steps=60):
    """Trains `layer` (Adam, lr 1e-2, MSE) towards the outputs of `target` on a fixed 4 x 3 x 10 x 10 batch;
    returns (first loss, last loss)."""
    x = torch.randn(4, 3, 10, 10)
    y = target(x).detach()
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    first = None
    for _ in range(steps):
        loss = F.mse_loss(layer(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return first, loss.item()
