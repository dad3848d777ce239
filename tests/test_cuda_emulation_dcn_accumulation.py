"""Review R1: the fp16 / bf16 input gradient of the CUDA paths is summed in float32 across the pixel chunks of an
image and rounded to the dtype once, from one accumulator per backward (not a fresh whole-image buffer for every
chunk, added into the low-precision gradient chunk by chunk).

The problem is built so that every term is exact: integer weights and grad_output (the column gradient is a small
integer), offsets in quarter pixels and a mask in quarters (bilinear weights in sixteenths). Each cell's sum is
then exact in float32, and summed in float32 the gradient is exactly the float64 reference rounded once; a sum
rounded to the dtype after each chunk is not.
"""
import pytest
import torch

from aecr_ops import reference
from dcn_cases import Case

pytestmark = pytest.mark.slow

CASE = Case(3, 6, 3, (9, 11), (3, 3), (1, 1), (1, 1), (1, 1), 1, 2, True, False)
ALL_GRADS = (True, True, True, True, True)


def exact_problem(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, c, (h, w), k = CASE.batch, CASE.in_channels, CASE.size, 9
    og = CASE.offset_groups
    x = torch.randn(b, c, h, w, generator=g)
    weight = torch.randint(-7, 8, (CASE.out_channels, c, 3, 3), generator=g).double()
    offset = torch.randint(-8, 9, (b, 2 * og * k, h, w), generator=g).double() / 4
    mask = torch.randint(0, 5, (b, og * k, h, w), generator=g).double() / 4
    grad = torch.randint(-7, 8, (b, CASE.out_channels, h, w), generator=g).double()
    return [t.to(dtype) for t in (x, offset, weight, mask, grad)]


def chunk_budget(pieces):
    """A column budget that cuts each image into `pieces` pixel chunks."""
    h, w = CASE.size
    return CASE.in_channels * 9 * ((h * w + pieces - 1) // pieces)


def reference_input_grad(x, offset, weight, mask, grad):
    xd = x.double().requires_grad_(True)
    out = reference.deform_conv2d(xd, offset.double(), weight.double(), None, mask=mask.double(), **CASE.kwargs())
    (gx,) = torch.autograd.grad((out * grad.double()).sum(), [xd])
    return gx


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path,deterministic", [("simple", False), ("simple", True), ("implicit", False),
                                                ("implicit", True)])
def test_pixel_chunked_input_gradient_is_summed_in_float32_and_rounded_once(emulated, dtype, path, deterministic):
    x, offset, weight, mask, grad = exact_problem(dtype)
    geometry = [list(CASE.stride), list(CASE.padding), list(CASE.dilation), 1, CASE.offset_groups]
    expected = reference_input_grad(x, offset, weight, mask, grad)
    rounded = expected.to(dtype)
    assert not torch.equal(rounded.double(), expected), "the problem must need a rounding at the end"
    for pieces in (1, 4):
        gi = emulated.dcn_backward(grad, x, weight, offset, mask, *geometry, path, deterministic, chunk_budget(pieces),
                                   ALL_GRADS)[0]
        assert gi.dtype == dtype
        wrong = (gi != rounded).sum().item()
        assert wrong == 0, f"{wrong} of {gi.numel()} elements differ from the exact sum rounded once ({pieces} chunks)"


def allocations(fn):
    """Sizes in bytes of every CPU allocation fn makes (the emulated kernels' tensors are CPU tensors)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0]


def test_pixel_chunked_bf16_backward_allocates_one_float32_accumulator(emulated):
    x, offset, weight, mask, grad = exact_problem(torch.bfloat16)
    geometry = [list(CASE.stride), list(CASE.padding), list(CASE.dilation), 1, CASE.offset_groups]
    pieces = 6
    budget = chunk_budget(pieces)

    def backward():
        emulated.dcn_backward(grad, x, weight, offset, mask, *geometry, "simple", False, budget, ALL_GRADS)

    sizes = allocations(backward)
    image_fp32 = CASE.in_channels * CASE.size[0] * CASE.size[1] * 4
    assert sizes.count(image_fp32) == 1, f"{sizes.count(image_fp32)} float32 image buffers for {pieces} chunks"
    # Everything else the backward allocates: its outputs, the geometry and its gradients in float32 (R5), one
    # column buffer within the budget, and small tensors.
    outputs = sum(t.numel() * t.element_size() for t in (x, weight, offset, mask)) + 4 * weight.numel()
    geometry_fp32 = 2 * 4 * (offset.numel() + mask.numel())
    assert sum(sizes) <= outputs + geometry_fp32 + 2 * budget * 2 + image_fp32 + 64 * 1024, sizes


def gather_blocks(emulated, fn):
    before = emulated.launched_blocks().get("gather_entries_kernel<float>", 0)
    fn()
    return emulated.launched_blocks().get("gather_entries_kernel<float>", 0) - before


def test_deterministic_gather_work_grows_with_the_chunk_not_the_image(emulated):
    # Review R2: each pixel chunk's gather ran one thread per cell of the chunk's whole images, so cutting an image
    # into n chunks cost n times the image. Now it runs over the chunk's sorted entries: the blocks of all chunks
    # together stay about those of one whole-image chunk.
    case = Case(1, 32, 8, (40, 40), (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, True, False)
    x, o, w, _, m = case.tensors(dtype=torch.float32, seed=2)
    grad = torch.randn(1, 8, 40, 40, generator=torch.Generator().manual_seed(3))
    geometry = [list(case.stride), list(case.padding), list(case.dilation), 1, 1]
    only_input = (True, False, False, False, False)

    def run(pieces):
        budget = 32 * 9 * ((40 * 40 + pieces - 1) // pieces)
        result = []
        blocks = gather_blocks(emulated, lambda: result.append(
            emulated.dcn_backward(grad, x, w, o, m, *geometry, "simple", True, budget, only_input)[0]))
        return blocks, result[0]

    whole_blocks, whole = run(1)
    chunked_blocks, chunked = run(16)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    assert chunked_blocks <= whole_blocks + 16, (chunked_blocks, whole_blocks)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forward_with_bias_is_rounded_once(emulated, dtype):
    # Review R6: the GEMMs write each image's output with the bias as their C operand (one rounding), rather than
    # a product rounded to the dtype, copied out of a multi-image buffer, and the bias added in a second rounding.
    # Integer features and weights, quarter-pixel offsets: every column and product is exact in float32.
    g = torch.Generator().manual_seed(9)
    b, c, (h, w), og = CASE.batch, CASE.in_channels, CASE.size, CASE.offset_groups
    x = torch.randint(-3, 4, (b, c, h, w), generator=g).to(dtype)
    weight = torch.randint(-3, 4, (CASE.out_channels, c, 3, 3), generator=g).to(dtype)
    offset = (torch.randint(-8, 9, (b, 2 * og * 9, h, w), generator=g) / 4).float()
    bias = (torch.rand(CASE.out_channels, generator=g) - 0.5).to(dtype)
    geometry = [list(CASE.stride), list(CASE.padding), list(CASE.dilation), 1, og]
    expected = reference.deform_conv2d(x.double(), offset.double(), weight.double(), bias.double(), mask=None,
                                       **CASE.kwargs())
    rounded = expected.to(dtype)
    for budget in (1 << 28, chunk_budget(4)):  # several images a chunk; pixel chunks of one image
        out = emulated.dcn_forward(x, weight, offset, None, bias, *geometry, "simple", budget)
        wrong = (out != rounded).sum().item()
        assert wrong == 0, f"{wrong} of {out.numel()} outputs are not the exact result rounded once (budget {budget})"


def exact_weight_problem(dtype, seed=4):
    """Features in 64ths, integer offsets (bilinear weights 0 or 1), a mask of halves and an integer grad_output:
    every column is exact in the dtype and every product and partial sum of the weight gradient exact in float32."""
    g = torch.Generator().manual_seed(seed)
    b, c, (h, w), og = CASE.batch, CASE.in_channels, CASE.size, CASE.offset_groups
    x = torch.randint(-127, 128, (b, c, h, w), generator=g).double() / 64
    weight = torch.randint(-3, 4, (CASE.out_channels, c, 3, 3), generator=g).double()
    offset = torch.randint(-2, 3, (b, 2 * og * 9, h, w), generator=g).double()
    mask = torch.randint(0, 3, (b, og * 9, h, w), generator=g).double() / 2
    grad = torch.randint(-7, 8, (b, CASE.out_channels, h, w), generator=g).double()
    return [t.to(dtype) for t in (x, offset, weight, mask, grad)]


def per_image_rounded(x, offset, weight, mask, grad, dtype):
    """The weight gradient summed image by image with each image's product rounded to `dtype` (what a GEMM whose
    output is in the dtype, added into a float32 sum, gives): the defect the test must tell apart."""
    total = torch.zeros(weight.shape, dtype=torch.float64)
    for i in range(x.shape[0]):
        wd = weight.double().requires_grad_(True)
        out = reference.deform_conv2d(x[i:i + 1].double(), offset[i:i + 1].double(), wd, None,
                                      mask=mask[i:i + 1].double(), **CASE.kwargs())
        (gw,) = torch.autograd.grad((out * grad[i:i + 1].double()).sum(), [wd])
        total += gw.to(dtype).double()
    return total.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", ["simple", "implicit"])
def test_chunked_weight_gradient_is_summed_in_float32_and_rounded_once(emulated, dtype, path):
    # Review R6: the simple path's fp16 / bf16 weight-gradient GEMM of each image rounded its product to the dtype
    # before the float32 sum across images and chunks. Every term here is exact, so a float32 sum rounded once is
    # exactly the float64 gradient rounded once.
    x, offset, weight, mask, grad = exact_weight_problem(dtype)
    geometry = [list(CASE.stride), list(CASE.padding), list(CASE.dilation), 1, CASE.offset_groups]
    wd = weight.double().requires_grad_(True)
    out = reference.deform_conv2d(x.double(), offset.double(), wd, None, mask=mask.double(), **CASE.kwargs())
    (expected,) = torch.autograd.grad((out * grad.double()).sum(), [wd])
    rounded = expected.to(dtype)
    assert not torch.equal(per_image_rounded(x, offset, weight, mask, grad, dtype), rounded), \
        "the problem must tell one rounding from one per image"
    only_weight = (False, True, False, False, False)
    for pieces in (1, 4):  # one chunk of every image; pixel chunks of one image
        for needed in (only_weight, ALL_GRADS):
            gw = emulated.dcn_backward(grad, x, weight, offset, mask, *geometry, path, False, chunk_budget(pieces),
                                       needed)[1]
            assert gw.dtype == dtype
            wrong = (gw != rounded).sum().item()
            assert wrong == 0, (f"{wrong} of {gw.numel()} weight-gradient elements differ from the exact sum rounded "
                                f"once ({pieces} chunks, needed {needed})")
