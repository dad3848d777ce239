"""Layers 4 and 6 on CUDA: CPU against CUDA, low precision against the reference, determinism, big tensors.

Every test here is marked `cuda` and skips without a GPU (and without the CUDA kernels).
"""
import pytest
import torch
import torch.nn.functional as F

import aecr_ops
from aecr_ops import reference
from dcn_cases import NAMED_CASES, Case, random_cases
from dcn_error_bounds import assert_within_rounding, magnitudes

pytestmark = pytest.mark.cuda


def grads(fn, tensors, seed=11, grad=None):
    """[output] + the gradients of sum(output * grad) by every tensor given; grad: random (seeded) unless given."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]
    out = fn(*leaves)
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) \
        if grad is None else grad
    params = [t for t in leaves if t is not None]
    gs = torch.autograd.grad((out * r.to(out)).sum(), params)
    return [out.detach()] + list(gs)


def ours(case):
    return lambda x, o, w, b, m: aecr_ops.deform_conv2d(x, o, w, b, mask=m, **case.kwargs())


def ref(case):
    return lambda x, o, w, b, m: reference.deform_conv2d(x, o, w, b, mask=m, **case.kwargs())


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("index,case", list(enumerate(random_cases(20, seed=99))))
def test_cuda_matches_cpu_float64(index, case, deterministic):
    cpu = case.tensors(seed=index)
    gpu = [t.cuda() if t is not None else None for t in cpu]
    expected = grads(ours(case), cpu)
    torch.use_deterministic_algorithms(deterministic)
    try:
        got = grads(ours(case), gpu)
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", sorted(NAMED_CASES))
def test_cuda_float32_against_float64_reference(name):
    case = NAMED_CASES[name]
    cpu = case.tensors(seed=1)
    expected = grads(ref(case), cpu)
    got = grads(ours(case), [t.cuda().float() if t is not None else None for t in cpu])
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.cpu().double(), b, rtol=1e-4, atol=1e-4)


LOW_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
ROUNDING_STAGES = 4  # grad_output and the columns rounded to the dtype, float32 sums, the result rounded once


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["3x3_pad1_mask", "both_groups", "stride2", "huge_offsets"])
def test_low_precision_is_within_rounding_of_the_float64_result_of_its_rounded_inputs(dtype, name):
    # Element by element (dcn_error_bounds): within ROUNDING_STAGES x (u x the sum of |terms| + what float32
    # coordinates can move) of float64 run on the same rounded inputs and the same rounded grad_output, so small
    # entries (a small offset gradient beside a large one) are checked as strictly as large ones.
    case = Case(**{**NAMED_CASES[name].__dict__, "in_channels": NAMED_CASES[name].in_channels * 8,
                   "size": (16, 16)})
    low = [t.cuda().to(dtype) if t is not None else None for t in case.tensors(seed=2)]
    exact_inputs = [t.double().cpu() if t is not None else None for t in low]
    out_shape = ours(case)(*low).shape
    grad = torch.randn(out_shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64).to(dtype)
    exact = grads(ref(case), exact_inputs, grad=grad.double())
    got = grads(ours(case), low, grad=grad.cuda())
    terms, coordinates = magnitudes(case, exact_inputs, grad.double())
    labels = ["out", "input", "offset", "weight"] + (["bias"] if low[3] is not None else []) + \
        (["mask"] if low[4] is not None else [])
    for i, (label, a, e) in enumerate(zip(labels, got, exact)):
        assert_within_rounding(a.cpu(), e, terms[i], coordinates[i], dtype, LOW_ROUNDOFF[dtype], label,
                               ROUNDING_STAGES)


def test_deterministic_backward_is_bitwise_reproducible():
    case = Case(4, 32, 16, (24, 24), (3, 3), (1, 1), (1, 1), (1, 1), 1, 2, True, True, offset_scale=3.0)
    tensors = [t.cuda().float() if t is not None else None for t in case.tensors(seed=4)]
    torch.use_deterministic_algorithms(True)
    try:
        first = grads(ours(case), tensors)
        for _ in range(3):
            again = grads(ours(case), tensors)
            for a, b in zip(first, again):
                assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(False)
    default = grads(ours(case), tensors)
    for a, b in zip(first, default):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_autocast_bfloat16_dcn_layer():
    layer = aecr_ops.DCN(16, 16, 3, 1, 1).cuda()
    with torch.no_grad():
        layer.conv_offset_mask.weight.normal_(0, 0.05)
    x = torch.randn(2, 16, 20, 20, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and torch.isfinite(layer.weight.grad).all()
    torch.testing.assert_close(y.float(), layer(x), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_opcheck_cuda(dtype):
    case = NAMED_CASES["both_groups"]
    x, o, w, b, m = [t.cuda().to(dtype).requires_grad_(True) if t is not None else None
                     for t in case.tensors(seed=6)]
    args = (x, w, o, m, b, list(case.stride), list(case.padding), list(case.dilation), 2, case.offset_groups)
    torch.library.opcheck(torch.ops.aecr_ops.deform_conv2d.default, args)


def test_batch_zero_and_non_contiguous_cuda():
    x = torch.randn(0, 4, 8, 8, device="cuda")
    out = aecr_ops.deform_conv2d(x, torch.randn(0, 18, 8, 8, device="cuda"), torch.randn(3, 4, 3, 3, device="cuda"),
                                 padding=1)
    assert out.shape == (0, 3, 8, 8)
    case = NAMED_CASES["weight_groups"]
    x, o, w, b, m = [t.cuda() for t in case.tensors()]
    expected = aecr_ops.deform_conv2d(x, o, w, b, mask=m, **case.kwargs())
    got = aecr_ops.deform_conv2d(x.to(memory_format=torch.channels_last), o.transpose(2, 3).contiguous().transpose(2, 3),
                                 w, b, mask=m, **case.kwargs())
    torch.testing.assert_close(got, expected)


def test_non_finite_offsets_cuda():
    case = NAMED_CASES["3x3_pad1_mask"]
    x, o, w, b, m = case.tensors()
    o[0, 0, 0, 0], o[1, 3, 2, 2], o[0, 5, 1, 1] = float("nan"), float("inf"), -1e30
    expected = grads(ref(case), [x, o, w, b, m])
    got = grads(ours(case), [t.cuda() for t in (x, o, w, b, m)])
    for a, e in zip(got, expected):
        torch.testing.assert_close(a.cpu(), e, rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_an_input_of_more_than_2_to_the_31_elements():
    # Nine images of 64 x 2048 x 2048: the last one starts at element 8 * 2^28 = 2^31, so reading it, and writing
    # its input gradient, needs 64-bit indices. (A column buffer can no longer pass 2^31: chunks cap it at 2^28
    # elements.) An offset of +1 row everywhere with a unit mask equals conv2d with 0 rows of padding above and
    # 2 below; the last image must also give what it gives alone, where every index fits in 32 bits.
    free, _ = torch.cuda.mem_get_info()
    if free < 32 * 2**30:
        pytest.skip("needs 32 GiB of free GPU memory")
    x = torch.randn(9, 64, 2048, 2048, device="cuda")
    assert x.numel() > 2**31 and x[8].storage_offset() == 2**31
    w = torch.randn(4, 64, 3, 3, device="cuda") / 24
    offset = torch.zeros(9, 18, 512, 512, device="cuda")
    offset[:, 0::2] = 1.0
    last = x[8:9]
    got = aecr_ops.deform_conv2d(x, offset, w, stride=4, padding=1)[8:9]
    alone = aecr_ops.deform_conv2d(last, offset[8:9], w, stride=4, padding=1)
    torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, F.conv2d(F.pad(last, (1, 1, 0, 2)), w, stride=4), rtol=1e-3, atol=1e-3)
    del got
    xg = x.requires_grad_(True)
    aecr_ops.deform_conv2d(xg, offset, w, stride=4, padding=1).sum().backward()
    got_grad = xg.grad[8:9].clone()
    del xg, x
    lg = last.detach().clone().requires_grad_(True)
    aecr_ops.deform_conv2d(lg, offset[8:9], w, stride=4, padding=1).sum().backward()
    torch.testing.assert_close(got_grad, lg.grad, rtol=1e-5, atol=1e-5)
    assert got_grad.abs().sum() > 0
