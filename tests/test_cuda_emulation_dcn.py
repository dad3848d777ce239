"""deform_conv2d's CUDA kernels and drivers run on the CPU under the emulator (tests/cuda_emulation), against the
float64 reference and the CPU op: the default ("simple") path through deform_conv_driver.h, forward and backward
with the atomic and the deterministic (sort-and-gather) input gradient, in float64, float32, float16 and
bfloat16; the implicit-GEMM path in float32 (TF32), float16 and bfloat16. Every launch is checked for races,
accesses outside its tensors, reads of unwritten shared memory, divergent barriers and launch limits.

What the emulator cannot show (speed, memory ordering beyond barriers, the rounding inside a real MMA or
cuBLAS) needs a GPU: tests/test_deform_conv_cuda.py and tests/test_deform_conv_implicit_cuda.py.
"""
import pytest
import torch

import aecr_ops
from aecr_ops import reference
from dcn_cases import NAMED_CASES, Case, random_cases
from dcn_error_bounds import assert_within_rounding, magnitudes

pytestmark = pytest.mark.slow

# Unit roundoff of the data each path rounds to: the simple path stores columns and GEMM results in the dtype;
# the implicit path's tensor-core operands are TF32 for float32.
SIMPLE_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11,
                   torch.bfloat16: 2.0 ** -8}
IMPLICIT_ROUNDOFF = {torch.float32: 2.0 ** -11, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
BIG_BUDGET = 1 << 28
ALL_GRADS = (True, True, True, True, True)  # output_mask: input, weight, offset, mask, bias

SIMPLE_CASES = {
    **{name: NAMED_CASES[name] for name in sorted(NAMED_CASES)},
    **{f"random_{i}": case for i, case in enumerate(random_cases(6, seed=21))},
}

IMPLICIT_CASES = {
    "3x3_pad1_mask": NAMED_CASES["3x3_pad1_mask"],
    "no_mask_no_bias": NAMED_CASES["no_mask_no_bias"],
    "both_groups": NAMED_CASES["both_groups"],
    "stride2": NAMED_CASES["stride2"],
    "non_square_dilated": NAMED_CASES["non_square"],
    "1x1": NAMED_CASES["1x1"],
    "huge_offsets": NAMED_CASES["huge_offsets"],
    # More than one tile along every GEMM dimension, channel runs that are not multiples of 32 or 64, offset
    # groups that split a tile's channels.
    "wide": Case(2, 72, 70, (9, 10), (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, True, True),
    "wide_groups": Case(1, 96, 66, (7, 8), (3, 3), (1, 1), (1, 1), (1, 1), 2, 3, True, True),
}


def problem(case, dtype, seed=3):
    x, o, w, b, m = [t.to(dtype) if t is not None else None for t in case.tensors(seed=seed)]
    groups = x.shape[1] // w.shape[1]
    offset_groups = o.shape[1] // (2 * w.shape[2] * w.shape[3])
    geometry = [list(case.stride), list(case.padding), list(case.dilation), groups, offset_groups]
    return (x, o, w, b, m), geometry


def exact(case, tensors, seed=5):
    """Output and gradients (input, offset, weight, bias, mask) in float64 of the same (rounded) values."""
    leaves = [t.detach().double().clone().requires_grad_(True) if t is not None else None for t in tensors]
    x, o, w, b, m = leaves
    out = reference.deform_conv2d(x, o, w, b, mask=m, **case.kwargs())
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grads = torch.autograd.grad((out * grad).sum(), [t for t in leaves if t is not None])
    return out.detach(), grad, grads


def grad_names(b, m):
    return ["input", "offset", "weight"] + (["bias"] if b is not None else []) + (["mask"] if m is not None else [])


def emulated_grads(emulated, tensors, geometry, grad, dtype, path, deterministic, budget=BIG_BUDGET):
    x, o, w, b, m = tensors
    gi, gw, go, gm, gb = emulated.dcn_backward(grad.to(dtype), x, w, o, m, *geometry, path, deterministic, budget,
                                               ALL_GRADS)
    return [gi, go, gw] + ([gb] if b is not None else []) + ([gm] if m is not None else [])


# Rounding stages between the float64 result of the rounded inputs and a path's result: the output's gradient
# rounded to the dtype, the columns (or tensor-core operands) rounded, float32 sums, the result rounded once.
ROUNDING_STAGES = 4


def bounds(case, tensors, grad, dtype):
    """Per-element rounding bounds (dcn_error_bounds.magnitudes) of the output and of the gradients in
    grad_names' order: (terms, coordinates) lists; the kernels' coordinates are float32 but for float64 data."""
    return magnitudes(case, tensors, grad, 2.0 ** -53 if dtype == torch.float64 else 2.0 ** -24)


def assert_rounded(got, expected, bound, index, dtype, roundoff, label):
    """Element by element within ROUNDING_STAGES x (u x sum of |terms| + coordinate error) of float64."""
    terms, coordinates = bound
    assert_within_rounding(got, expected, terms[index], coordinates[index], dtype, roundoff[dtype], label,
                           ROUNDING_STAGES)


def one_image_budget(case):
    """A column budget of one image's columns: every chunk holds one image."""
    kh, kw = case.kernel
    ho, wo = case.out_size()
    return case.in_channels * kh * kw * ho * wo


def pixel_chunk_budget(case):
    """A column budget of about a third of one image's columns: each image is cut into three pixel chunks (the
    last one shorter), whose input gradients add up in the image's planes."""
    kh, kw = case.kernel
    ho, wo = case.out_size()
    return case.in_channels * kh * kw * (ho * wo // 3 + 1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(SIMPLE_CASES))
def test_emulated_simple_path_matches_float64_reference(emulated, name, dtype):
    case = SIMPLE_CASES[name]
    tensors, geometry = problem(case, dtype)
    x, o, w, b, m = tensors
    out_exact, grad, grads_exact = exact(case, tensors)
    bound = bounds(case, tensors, grad, dtype)
    # Columns of several images in one chunk (GEMM into a buffer, then transposed); and, in float32 and in float16
    # (whose input gradient is summed in a float32 buffer and then added), one image per chunk and pixel ranges of
    # one image per chunk. (The chunking does not depend on the dtype otherwise; fewer runs keep CI short.)
    chunked = dtype in (torch.float32, torch.float16)
    small_budgets = (one_image_budget(case), pixel_chunk_budget(case)) if chunked else ()
    for budget in (BIG_BUDGET,) + small_budgets:
        out = emulated.dcn_forward(x, w, o, m, b, *geometry, "simple", budget)
        assert_rounded(out, out_exact, bound, 0, dtype, SIMPLE_ROUNDOFF, f"output (budget {budget})")
        for deterministic in (False, True):
            got = emulated_grads(emulated, tensors, geometry, grad, dtype, "simple", deterministic, budget)
            for i, (label, g, e) in enumerate(zip(grad_names(b, m), got, grads_exact)):
                assert_rounded(g, e, bound, i + 1, dtype, SIMPLE_ROUNDOFF,
                               f"{label} (deterministic={deterministic}, budget {budget})")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ["3x3_pad1_mask", "both_groups", "huge_offsets", "random_3"])
def test_emulated_simple_path_equals_the_cpu_op(emulated, name, dtype):
    # The same per-element math (bilinear.h, deform_conv.h) as the CPU kernels, summed in another order: the CPU
    # samples channels-last rows with vectors (fused multiply-adds where the CPU has them), takes the offset
    # gradients from four corner dot products, and multiplies other GEMM layouts. Equal up to rounding, scaled
    # per tensor.
    case = SIMPLE_CASES[name]
    tensors, geometry = problem(case, dtype, seed=7)
    x, o, w, b, m = tensors
    expected = torch.ops.aecr_ops.deform_conv2d(x, w, o, m, b, *geometry)
    tol = (1e-12 if dtype == torch.float64 else 1e-5) * (expected.abs().max().item() + 1)
    torch.testing.assert_close(emulated.dcn_forward(x, w, o, m, b, *geometry, "simple", BIG_BUDGET), expected,
                               rtol=tol, atol=tol)
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    cpu = torch.ops.aecr_ops.deform_conv2d_backward(grad, x, w, o, m, *geometry)
    for deterministic in (False, True):
        got = emulated.dcn_backward(grad, x, w, o, m, *geometry, "simple", deterministic, BIG_BUDGET, ALL_GRADS)
        for a, e in zip(got, cpu):
            # Atomics add in another order than the CPU's per-channel-block sums: equal up to rounding.
            tol = (1e-12 if dtype == torch.float64 else 1e-5) * (e.abs().max().item() + 1)
            torch.testing.assert_close(a, e, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(IMPLICIT_CASES))
def test_emulated_implicit_path_matches_float64_reference(emulated, name, dtype):
    case = IMPLICIT_CASES[name]
    tensors, geometry = problem(case, dtype)
    x, o, w, b, m = tensors
    out_exact, grad, grads_exact = exact(case, tensors)
    bound = bounds(case, tensors, grad, dtype)
    out = emulated.dcn_forward(x, w, o, m, b, *geometry, "implicit", 0)
    assert_rounded(out, out_exact, bound, 0, dtype, IMPLICIT_ROUNDOFF, "output")
    # The deterministic input gradient goes through column-gradient chunks: of images, or of pixels (in float32
    # and not for the widest case only: the chunking depends neither on the dtype nor on the width, and fewer
    # runs keep CI short).
    runs = [(False, BIG_BUDGET), (True, BIG_BUDGET)]
    if dtype == torch.float32 and name != "wide":
        runs.append((True, pixel_chunk_budget(case)))
    for deterministic, budget in runs:
        got = emulated_grads(emulated, tensors, geometry, grad, dtype, "implicit", deterministic, budget)
        for i, (label, g, e) in enumerate(zip(grad_names(b, m), got, grads_exact)):
            assert_rounded(g, e, bound, i + 1, dtype, IMPLICIT_ROUNDOFF,
                           f"{label} (deterministic={deterministic}, budget {budget})")


@pytest.mark.parametrize("path", ["simple", "implicit"])
def test_emulated_deterministic_backward_does_not_depend_on_the_schedule(emulated, path):
    # Under one schedule the emulator repeats itself exactly, so two runs prove nothing. CUDA orders neither the
    # blocks of a grid nor the threads of a block: other schedule seeds run both in other orders. The
    # deterministic backward gives the same bits under every one; its twin, the atomic backward, adds its input
    # gradient in schedule order and does not (so the schedules do reach the order of the sums).
    case = IMPLICIT_CASES["wide_groups"]
    tensors, geometry = problem(case, torch.float32, seed=8)
    _, grad, _ = exact(case, tensors)
    runs = {}
    try:
        for seed in (0, 1, 2):
            emulated.set_schedule_seed(seed)
            runs[seed] = {deterministic: emulated_grads(emulated, tensors, geometry, grad, torch.float32, path,
                                                        deterministic) for deterministic in (False, True)}
    finally:
        emulated.set_schedule_seed(0)
    for seed in (1, 2):
        for label, a, b in zip(grad_names(tensors[3], tensors[4]), runs[0][True], runs[seed][True]):
            assert torch.equal(a, b), f"deterministic {label} gradient changed with schedule seed {seed}"
    assert any(not torch.equal(a, b) for seed in (1, 2) for a, b in zip(runs[0][False][:1], runs[seed][False][:1])), \
        "the atomic input gradient gave the same bits under every schedule: the schedules do not reorder its sums"


def test_emulated_deterministic_backward_is_split_independent(emulated):
    # The implicit path splits its weight gradient's pixels (split-K) by the SM count: 512 pixels make 1 split
    # with 1 SM and 2 with 40 (at least 8 K steps of 32 per split). Other bits, the same result up to rounding.
    case = Case(2, 96, 66, (16, 16), (3, 3), (1, 1), (1, 1), (1, 1), 2, 3, True, True)
    tensors, geometry = problem(case, torch.float32, seed=8)
    _, grad, grads_exact = exact(case, tensors)
    bound = bounds(case, tensors, grad, torch.float32)
    results = {}
    try:
        for sms in (1, 40):
            emulated.set_multiprocessors(sms)
            results[sms] = emulated_grads(emulated, tensors, geometry, grad, torch.float32, "implicit", True)
    finally:
        emulated.set_multiprocessors(3)
    for sms, got in results.items():
        for i, (label, g) in enumerate(zip(grad_names(tensors[3], tensors[4]), got)):
            assert_rounded(g, grads_exact[i], bound, i + 1, torch.float32, IMPLICIT_ROUNDOFF, f"{label}, {sms} SMs")
    assert not torch.equal(results[1][2], results[40][2]), \
        "the weight gradient has the same bits with 1 and 40 SMs: the split-K did not change"


@pytest.mark.parametrize("path", ["simple", "implicit"])
@pytest.mark.parametrize("kind", ["strided", "expanded"])
def test_emulated_bias_that_is_not_contiguous(emulated, path, kind):
    # Review D1: the implicit path read `bias` as if it were dense (wrong values for a slice, a read past the
    # allocation for an expanded bias); the emulator refuses a non-contiguous kernel argument.
    case = NAMED_CASES["3x3_pad1_mask"]
    (x, o, w, _, m), geometry = problem(case, torch.float32)
    c_out = w.shape[0]
    bias = torch.randn(2 * c_out)[::2] if kind == "strided" else torch.full((1,), 0.75).expand(c_out)
    expected = reference.deform_conv2d(x.double(), o.double(), w.double(), bias.double(), mask=m.double(),
                                       **case.kwargs())
    got = emulated.dcn_forward(x, w, o, m, bias, *geometry, path, BIG_BUDGET)
    bound = bounds(case, (x, o, w, bias, m), torch.ones_like(expected), torch.float32)
    roundoff = IMPLICIT_ROUNDOFF if path == "implicit" else SIMPLE_ROUNDOFF
    assert_rounded(got, expected, bound, 0, torch.float32, roundoff, "output")


def non_finite_problem():
    """Padding 1, a NaN at pixel (0, 0) of one plane and an Inf inside another; offsets that mostly stay near."""
    case = Case(2, 4, 3, (8, 9), (3, 3), (1, 1), (1, 1), (1, 1), 1, 2, True, True, offset_scale=0.7)
    x, o, w, b, m = case.tensors(dtype=torch.float32, seed=4)
    x[0, 1, 0, 0] = float("nan")
    x[1, 2, 4, 5] = float("inf")
    return case, (x, o, w, b, m)


def torchvision_grads(case, tensors, grad):
    import torchvision
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    x, o, w, b, m = leaves
    out = torchvision.ops.deform_conv2d(x, o, w, b, mask=m, **case.kwargs())
    grads = torch.autograd.grad((out * grad).sum(), [x, o, w, b, m])
    return [out] + list(grads)


@pytest.mark.parametrize("where", ["cpu", "simple", "implicit"])
def test_non_finite_pixels_reach_exactly_the_samples_torchvision_reaches(emulated, where):
    # Review D6: an out-of-plane corner (weight 0) must not read the plane, or a NaN at pixel (0, 0) spreads to
    # every sample with a corner outside the image. In-plane corners are read even at weight 0, as torchvision
    # reads them.
    pytest.importorskip("torchvision")
    case, tensors = non_finite_problem()
    x, o, w, b, m = tensors
    groups, offset_groups = 1, o.shape[1] // 18
    geometry = [list(case.stride), list(case.padding), list(case.dilation), groups, offset_groups]
    grad = torch.randn(case.batch, case.out_channels, *case.out_size(), generator=torch.Generator().manual_seed(3))
    expected = torchvision_grads(case, tensors, grad)
    if where == "cpu":
        got = aecr_grads(case, tensors, grad)
        backward = [got[1:]]
    else:
        got = [emulated.dcn_forward(x, w, o, m, b, *geometry, where, BIG_BUDGET)]
        backward = []
        for deterministic in (False, True):
            gi, gw, go, gm, gb = emulated.dcn_backward(grad, x, w, o, m, *geometry, where, deterministic, BIG_BUDGET,
                                                       ALL_GRADS)
            backward.append([gi, go, gw, gb, gm])
        got += backward[0]
    names = ["output", "input", "offset", "weight", "bias", "mask"]
    assert not torch.isfinite(expected[0]).all(), "the problem must have non-finite outputs"
    assert torch.equal(torch.isfinite(got[0]), torch.isfinite(expected[0])), "output"
    for grads in backward:
        for name, g, e in zip(names[1:], grads, expected[1:]):
            assert torch.equal(torch.isfinite(g), torch.isfinite(e)), name


def aecr_grads(case, tensors, grad):
    """aecr_ops.deform_conv2d's output and gradients, in torchvision_grads' order."""
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    x, o, w, b, m = leaves
    out = aecr_ops.deform_conv2d(x, o, w, b, mask=m, **case.kwargs())
    grads = torch.autograd.grad((out * grad).sum(), [x, o, w, b, m])
    return [out] + list(grads)


# Masks of deform_conv2d_backward (input, weight, offset, mask, bias): first layers, frozen weights, constant
# offsets, and each gradient alone.
OUTPUT_MASKS = [(True, False, False, False, False), (False, True, False, False, False),
                (False, False, True, False, False), (False, False, False, True, False),
                (False, False, True, True, False), (True, False, True, True, True), (False, True, False, False, True)]


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("path", ["simple", "implicit"])
@pytest.mark.parametrize("name", ["both_groups"])
def test_emulated_backward_computes_only_the_gradients_asked_for(emulated, name, path, deterministic):
    case = IMPLICIT_CASES[name]
    (x, o, w, b, m), geometry = problem(case, torch.float32, seed=6)
    grad = torch.randn(case.batch, case.out_channels, *case.out_size(), generator=torch.Generator().manual_seed(4))
    budget = pixel_chunk_budget(case)
    full = emulated.dcn_backward(grad, x, w, o, m, *geometry, path, deterministic, budget, ALL_GRADS)
    for output_mask in OUTPUT_MASKS:
        got = emulated.dcn_backward(grad, x, w, o, m, *geometry, path, deterministic, budget, output_mask)
        for label, wanted, g, f in zip(["input", "weight", "offset", "mask", "bias"], output_mask, got, full):
            if wanted:
                tol = 1e-6 * (f.abs().max().item() + 1)
                torch.testing.assert_close(g, f, rtol=tol, atol=tol, msg=f"{label} with {output_mask}")
            else:
                assert g.numel() == 0, f"{label} was computed though {output_mask} does not ask for it"
