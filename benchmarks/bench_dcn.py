"""The deformable-convolution benchmarks' problems and implementations, used by test_dcn.py (forward and
forward+backward groups, gradient subsets) and test_dcn_scaling.py (sweeps of batch, channels and image size).

Every problem is a 3x3 modulated deformable convolution, padding 1, C -> C channels, with bias and mask, offsets
of a few pixels. Implementations share one signature, fn(x, offset, weight, bias, mask):

- aecr: aecr_ops.deform_conv2d (on CUDA once per path and backward: aecr-simple, aecr-simple-deterministic,
  aecr-implicit, aecr-implicit-deterministic);
- torchvision: torchvision.ops.deform_conv2d, the baseline;
- conv2d: F.conv2d of the same shape (offset and mask unused), the floor a deformable convolution cannot beat;
- onnxruntime: ONNX Runtime's DeformConv (opset 19, bench_onnxruntime.py), in the CPU forward groups only (it has
  no backward); its session and numpy inputs are made once per problem (implementation_for), and its output is
  checked against aecr's before it is timed (max_abs_diff_vs_aecr).

    python benchmarks/bench_dcn.py [pytest options]        # this part of the suite (pytest --benchmark-only)
"""
import dataclasses
import sys

import torch
import torch.nn.functional as F

import aecr_ops
from bench_runtime import aecr_variants

BASELINES = ("torchvision", "conv2d")  # in every group
ONNXRUNTIME = "onnxruntime"  # in the CPU forward groups
PASSES = ("forward", "forward+backward")
TENSORS = ("input", "offset", "weight", "bias", "mask")


@dataclasses.dataclass(frozen=True)
class Shape:
    """A DCN problem: batch x channels (in = out) x height x width, with a mask or not, in offset groups."""
    batch: int
    channels: int
    height: int
    width: int
    mask: bool = True
    offset_groups: int = 1

    def __str__(self):
        extra = ("" if self.mask else "-nomask") + ("" if self.offset_groups == 1 else f"-og{self.offset_groups}")
        return f"{self.batch}x{self.channels}x{self.height}x{self.width}{extra}"


# The forward and forward+backward groups: on the CPU the shapes of the DCN issue, on CUDA AECR-Net's DCN layer
# (B16, 256 channels, a 256 x 256 crop at quarter resolution).
SHAPES = {
    ("tiny", "cpu"): [Shape(1, 8, 8, 8)],
    ("tiny", "cuda"): [Shape(1, 8, 8, 8)],
    ("full", "cpu"): [Shape(2, 64, 64, 64), Shape(1, 256, 64, 64)],
    ("full", "cuda"): [Shape(16, 256, 64, 64)],
}
GRADIENT_SHAPES = {
    ("tiny", "cpu"): Shape(1, 8, 8, 8),
    ("tiny", "cuda"): Shape(1, 8, 8, 8),
    ("full", "cpu"): Shape(1, 256, 64, 64),
    ("full", "cuda"): Shape(16, 256, 64, 64),
}
# The forward of the shapes a user of AECR-Net or of a detection neck runs, against ONNX Runtime, conv2d and
# torchvision: 32 to 512 channels, 32 x 32 to a 1080p image at quarter resolution, without a mask, in offset groups.
USER_SHAPES = {
    "full": [Shape(1, 32, 32, 32), Shape(1, 32, 270, 480), Shape(1, 512, 32, 32), Shape(1, 512, 64, 64),
             Shape(1, 64, 64, 64, mask=False), Shape(1, 256, 64, 64, mask=False),
             Shape(1, 256, 64, 64, offset_groups=4), Shape(2, 128, 100, 152, offset_groups=2), Shape(4, 256, 32, 32)],
    "tiny": [Shape(1, 8, 8, 8, mask=False), Shape(1, 8, 8, 8, offset_groups=2)],
}
# name -> which of (input, offset, weight, bias, mask) require grad. autograd asks the backward op for exactly
# those gradients, and the kernels skip the others' work.
GRADIENT_SUBSETS = {
    "all": (True, True, True, True, True),
    "input": (True, False, False, False, False),
    "weight": (False, False, True, False, False),
    "weight+bias": (False, False, True, True, False),
    "offset+mask": (False, True, False, False, True),
    "all-but-input": (False, True, True, True, True),
}
# The scaling sweeps: each varies one axis from B1 C64 64x64; the last size is a 1080p image at AECR-Net's quarter
# resolution (1920 x 1080 / 4 = 480 x 270).
SWEEPS = {
    "full": {
        "batch": [Shape(b, 64, 64, 64) for b in (1, 2, 4, 8, 16)],
        "channels": [Shape(1, c, 64, 64) for c in (64, 128, 192, 256)],
        "size": [Shape(1, 64, h, w) for h, w in ((64, 64), (128, 128), (135, 240), (270, 480))],
    },
    "tiny": {
        "batch": [Shape(1, 8, 8, 8), Shape(2, 8, 8, 8)],
        "channels": [Shape(1, 8, 8, 8), Shape(1, 16, 8, 8)],
        "size": [Shape(1, 8, 8, 8), Shape(1, 8, 12, 16)],
    },
}


def make_problem(shape, dtype, device, seed=0):
    """(x, offset, weight, bias, mask), drawn on the CPU so that every device and dtype sees the same values; the
    mask is None for a shape without one."""
    g = torch.Generator().manual_seed(seed)
    b, c, h, w, og = shape.batch, shape.channels, shape.height, shape.width, shape.offset_groups
    x = torch.randn(b, c, h, w, generator=g)
    weight = torch.randn(c, c, 3, 3, generator=g) / (c * 9) ** 0.5
    bias = torch.randn(c, generator=g)
    offset = 2.0 * torch.randn(b, 18 * og, h, w, generator=g)
    mask = torch.rand(b, 9 * og, h, w, generator=g) if shape.mask else None
    return [None if t is None else t.to(device=device, dtype=dtype) for t in (x, offset, weight, bias, mask)]


def aecr(x, offset, weight, bias, mask):
    return aecr_ops.deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)


def torchvision_dcn(x, offset, weight, bias, mask):
    import torchvision
    return torchvision.ops.deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)


def conv2d(x, offset, weight, bias, mask):
    return F.conv2d(x, weight, bias, padding=1)


def implementation(name):
    """The function of an implementation name (any of aecr's variants is aecr_ops.deform_conv2d); onnxruntime's
    needs its problem: implementation_for."""
    if name.startswith("aecr"):
        return aecr
    return {"torchvision": torchvision_dcn, "conv2d": conv2d}[name]


def implementation_for(name, tensors):
    """The function of an implementation name, to be called on these tensors: for onnxruntime, a session and its
    numpy inputs made for them once (bench_onnxruntime), so that a call is session.run alone."""
    if name != ONNXRUNTIME:
        return implementation(name)
    from bench_onnxruntime import deform_conv2d_for
    offset_groups = tensors[1].shape[1] // (2 * tensors[2].shape[2] * tensors[2].shape[3])
    return deform_conv2d_for(tensors, padding=1, offset_groups=offset_groups)


def max_abs_diff_vs_aecr(name, fn, tensors):
    """max |fn - aecr| on these tensors, after asserting that they agree (fp32: within 1e-4 of aecr's output
    scale, rtol 1e-4); where they do not, an AssertionError names the implementation and says by how much."""
    with torch.no_grad():
        expected, actual = aecr(*tensors), fn(*tensors)
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * scale, msg=lambda details: (
        f"{name} disagrees with aecr_ops.deform_conv2d (output scale {scale:.3g}): {details}"))
    return (actual - expected).abs().max().item()


def baselines(direction=None, device=None):
    """The baselines timed in the groups of this pass and device: torchvision and conv2d, and in CPU forward
    groups onnxruntime (it has no backward, and the suite runs it on the CPU only). Without a pass and device:
    the baselines of every group."""
    if direction == "forward" and device == "cpu":
        return (*BASELINES, ONNXRUNTIME)
    return BASELINES


def implementations(device, direction=None):
    """aecr's variants on this device, then the baselines of this pass's groups."""
    return [*aecr_variants(device), *baselines(direction, device)]


def baselines_of(name, direction=None, device=None):
    """What an implementation is compared with in a group of this pass and device: aecr with the group's
    baselines, a deterministic variant also with its default; the baselines with nothing."""
    if not name.startswith("aecr"):
        return []
    if name.endswith("-deterministic"):
        return [*baselines(direction, device), name[:-len("-deterministic")]]
    return list(baselines(direction, device))


def dcn_path_that_runs(input, offset, weight, mask=None, stride=1, padding=0, dilation=1):
    """The path aecr_ops.deform_conv2d would run for these arguments now ("cpu", "simple" or "implicit")."""
    return aecr_ops.deform_conv2d_path(input, offset, weight, mask=mask, stride=stride, padding=padding,
                                       dilation=dilation)


def unsupported_dtype(error):
    """Whether an error says the library has no kernel for this dtype (torchvision and bf16, for instance)."""
    return isinstance(error, (NotImplementedError, aecr_ops.ArgumentTypeError)) or "not implemented for" in str(error)


def torchvision_tensors(tensors):
    """(tensors, note) for torchvision: the problem itself, or where torchvision has no kernel for its dtype
    (bfloat16), the same values in float32, with a note saying so."""
    try:
        with torch.no_grad():
            torchvision_dcn(*tensors)
        return tensors, None
    except (NotImplementedError, RuntimeError) as error:
        if not unsupported_dtype(error):
            raise
        return [t.float() for t in tensors], f"no {tensors[0].dtype} kernel: timed in float32"


def forward(fn, tensors):
    """One forward, without autograd."""
    def run():
        with torch.no_grad():
            return fn(*tensors)
    return run


def forward_backward(fn, tensors, requires=GRADIENT_SUBSETS["all"]):
    """One forward and backward; `requires` says which of (input, offset, weight, bias, mask) require grad."""
    leaves = [t.detach().clone().requires_grad_(r) for t, r in zip(tensors, requires)]
    x, weight = tensors[0], tensors[2]
    grad = torch.randn(x.shape[0], weight.shape[0], x.shape[2], x.shape[3], dtype=x.dtype, device=x.device)

    def run():
        for t in leaves:
            t.grad = None
        fn(*leaves).backward(grad)
    return run


def pass_of(name, fn, tensors, requires=GRADIENT_SUBSETS["all"]):
    return forward(fn, tensors) if name == "forward" else forward_backward(fn, tensors, requires)


if __name__ == "__main__":
    from bench_common import run_suite
    sys.exit(run_suite(["test_dcn.py", "test_dcn_scaling.py"], sys.argv[1:]))
