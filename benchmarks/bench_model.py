"""The AECR-Net benchmarks' networks and calls, used by test_model.py: a training step and inference of the
network on aecr's ops against the same network and weights on the operators users had before (baseline_of:
torchvision.ops.deform_conv2d for the DCN layer, the original FastDeconv), and inference by ONNX Runtime of the
exported network (CPU).

Configurations: on the CPU a training step of one 256 x 256 crop (L1, Adam) and inference of 512 x 512,
720 x 1280 and 1920 x 1080 images; on CUDA a step of 16 crops of 240 x 240 with L1 + contrastive regularisation
(VGG19 with random weights: the cost of the real one) and 1080p inference; tiny: 16 x 16 (and 16 x 24 and 20 x 24
timed in one call each, as 720p and 1080p are on the CPU), L1 + CR, so that every path runs. Inference is image in,
dehazed image out for every row: aecr_model.dehaze_tensor for aecr and the baseline (padding, the forward without
autograd, cropping, clamping), OnnxDehazer for ONNX Runtime (the same steps).

    python benchmarks/bench_model.py [pytest options]        # this part of the suite (pytest --benchmark-only)
"""
import copy
import dataclasses
import sys
from typing import Optional

import torch
import torch.nn.functional as F

import aecr_ops
from aecr_model import AECRNet
from aecr_ops import reference
from aecr_ops.deform_conv import output_size
from bench_dcn import dcn_path_that_runs
from bench_runtime import dcn_variant


@dataclasses.dataclass(frozen=True)
class Training:
    batch: int
    crop: int
    cr: bool

    def __str__(self):
        return f"{self.batch}x3x{self.crop}x{self.crop}-{'l1+cr' if self.cr else 'l1'}"


@dataclasses.dataclass(frozen=True)
class ImageSize:
    """An inference problem; rounds: exactly that many timed calls (bench_runtime.measure) after one untimed warm-up
    call, for 720p and 1080p on the CPU (10 to 40 s a call); None: pytest-benchmark's calibrated rounds, at least
    3 (the calibration is the warm-up)."""
    height: int
    width: int
    rounds: Optional[int] = None

    @property
    def warmup_rounds(self) -> int:
        return 0 if self.rounds is None else 1

    def __str__(self):
        return f"1x3x{self.height}x{self.width}"


TRAINING = {("full", "cpu"): Training(1, 256, False), ("full", "cuda"): Training(16, 240, True),
            ("tiny", "cpu"): Training(1, 16, True), ("tiny", "cuda"): Training(1, 16, True)}
INFERENCE = {("full", "cpu"): [ImageSize(512, 512), ImageSize(720, 1280, rounds=1), ImageSize(1080, 1920, rounds=1)],
             ("full", "cuda"): [ImageSize(1080, 1920)],
             ("tiny", "cpu"): [ImageSize(16, 16), ImageSize(16, 24, rounds=1), ImageSize(20, 24, rounds=1)],
             ("tiny", "cuda"): [ImageSize(16, 16)]}
# aecr's variants in the network: name -> AECR_DCN_CUDA_PATH (None: the CPU's one implementation).
VARIANTS = {"cpu": {"aecr": None}, "cuda": {"aecr-simple": "simple", "aecr-implicit": "implicit"}}


class TorchvisionDCN(aecr_ops.DCN):
    """aecr_ops.DCN with its convolution done by torchvision.ops.deform_conv2d."""

    def forward(self, input):
        import torchvision
        out = self.conv_offset_mask(input)
        o1, o2, mask = torch.chunk(out, 3, dim=1)
        offset = torch.cat((o1, o2), dim=1)
        mask = torch.sigmoid(mask)
        if input.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # torchvision has no fp16/bf16 CPU kernel (nor autocast on the CPU): the baseline runs this layer in fp32.
            with torch.autocast("cpu", enabled=False):
                return torchvision.ops.deform_conv2d(input.float(), offset.float(), self.weight.float(),
                                                     self.bias.float(), self.stride, self.padding, self.dilation,
                                                     mask.float())
        return torchvision.ops.deform_conv2d(input, offset, self.weight, self.bias, self.stride, self.padding,
                                             self.dilation, mask)


def baseline_of(model: AECRNet) -> AECRNet:
    """The same network and weights on torchvision's deform_conv2d and the original FastDeconv."""
    base = copy.deepcopy(model)
    for module in base.modules():
        if type(module) is aecr_ops.DCN:
            module.__class__ = TorchvisionDCN
    deconv = reference.FastDeconv(3, 3, 3, stride=1, padding=1).to(next(model.parameters()).device)
    deconv.load_state_dict(model.deconv.state_dict())
    base.deconv = deconv
    return base


class Networks:
    """The networks of one device: ``ours``, the official AECR-Net from seed 0 with small non-zero DCN offsets (as
    after training); ``base``, baseline_of it; ``cr``, the contrastive regularisation (built on first use)."""

    def __init__(self, device):
        self.device = device
        torch.manual_seed(0)
        self.ours = AECRNet().to(device)
        with torch.no_grad():
            self.ours.dcn_block.dcn.conv_offset_mask.weight.normal_(0, 1e-3)
        self.base = baseline_of(self.ours)
        self._cr = None

    @property
    def cr(self):
        if self._cr is None:
            from aecr_model.losses import ContrastiveRegularization
            self._cr = ContrastiveRegularization("random").to(self.device)
        return self._cr

    def of(self, impl):
        return self.base if impl == "baseline" else self.ours


def dcn_path(model, run_dtype, path):
    """The path the model's first DCN layer would run with AECR_DCN_CUDA_PATH=path on run_dtype inputs now."""
    dcn = next(m for m in model.modules() if isinstance(m, aecr_ops.DCN))
    device = dcn.weight.device
    size = 8
    kh, kw = dcn.kernel_size
    ho = output_size(size, kh, dcn.stride[0], dcn.padding[0], dcn.dilation[0])
    wo = output_size(size, kw, dcn.stride[1], dcn.padding[1], dcn.dilation[1])
    taps = dcn.deformable_groups * kh * kw
    x = torch.zeros(1, dcn.in_channels, size, size, device=device, dtype=run_dtype)
    offset = torch.zeros(1, 2 * taps, ho, wo, device=device, dtype=run_dtype)
    mask = torch.zeros(1, taps, ho, wo, device=device, dtype=run_dtype)
    with dcn_variant(path):
        return dcn_path_that_runs(x, offset, dcn.weight.detach().to(run_dtype), mask=mask, stride=dcn.stride,
                                  padding=dcn.padding, dilation=dcn.dilation)


def loss_of(model, hazy, clear, cr, autocast_dtype, cr_weight=0.1):
    """L1 (+ cr_weight x CR) of the model's output, under autocast when autocast_dtype is given."""
    with torch.autocast(hazy.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = model(hazy)
        loss = F.l1_loss(out.float(), clear)
        if cr is not None:
            loss = loss + cr_weight * cr(out.float(), clear, hazy)
    return loss


def training_step(model, optimizer, hazy, clear, cr, autocast_dtype):
    """One training step: loss, backward, Adam."""
    def step():
        loss = loss_of(model, hazy, clear, cr, autocast_dtype)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def dehaze(model, image, autocast_dtype, memory_format=None):
    """One call of aecr_model.dehaze_tensor: the model in eval mode on image [1, 3, H, W] in [0, 1]."""
    from aecr_model.inference import dehaze_tensor

    def run():
        return dehaze_tensor(model, image, autocast_dtype, memory_format=memory_format)
    return run


def inference(model, image, autocast_dtype):
    """One forward of the model in eval mode, without autograd (what the work is counted on)."""
    def run():
        with torch.no_grad(), torch.autocast(image.device.type, dtype=autocast_dtype or torch.bfloat16,
                                             enabled=autocast_dtype is not None):
            return model(image)
    return run


if __name__ == "__main__":
    from bench_common import run_suite
    sys.exit(run_suite(["test_model.py"], sys.argv[1:]))
