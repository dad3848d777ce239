"""Layer 1 and 4: the kernels against the float64 reference and against torchvision, forward and gradients."""
import itertools
import math

import pytest
import torch

import aecr_ops
from aecr_ops import reference
from dcn_cases import NAMED_CASES, Case, random_cases


def loop_deform_conv2d(x, offset, weight, bias, mask, stride, padding, dilation):
    """The definition in DCN.md, evaluated one scalar at a time (tiny tensors only)."""
    b_, c_, h_, w_ = x.shape
    c_out, cpg, kh, kw = weight.shape
    groups = c_ // cpg
    taps = kh * kw
    og = offset.shape[1] // (2 * taps)
    ho, wo = offset.shape[2:]
    out = torch.zeros(b_, c_out, ho, wo, dtype=torch.float64)

    def pixel(b, c, yy, xx):
        return float(x[b, c, yy, xx]) if 0 <= yy < h_ and 0 <= xx < w_ else 0.0

    def bilinear(b, c, h, w):
        if not (-1 < h < h_ and -1 < w < w_):
            return 0.0
        h0, w0 = math.floor(h), math.floor(w)
        lh, lw = h - h0, w - w0
        return ((1 - lh) * (1 - lw) * pixel(b, c, h0, w0) + (1 - lh) * lw * pixel(b, c, h0, w0 + 1)
                + lh * (1 - lw) * pixel(b, c, h0 + 1, w0) + lh * lw * pixel(b, c, h0 + 1, w0 + 1))

    for b, o, y, xo in itertools.product(range(b_), range(c_out), range(ho), range(wo)):
        g = o // (c_out // groups)
        acc = float(bias[o]) if bias is not None else 0.0
        for cl in range(cpg):
            c = g * cpg + cl
            og_c = c // (c_ // og)
            for i, j in itertools.product(range(kh), range(kw)):
                k = i * kw + j
                dy = float(offset[b, og_c * 2 * taps + 2 * k, y, xo])
                dx = float(offset[b, og_c * 2 * taps + 2 * k + 1, y, xo])
                m = float(mask[b, og_c * taps + k, y, xo]) if mask is not None else 1.0
                h = y * stride[0] - padding[0] + i * dilation[0] + dy
                w = xo * stride[1] - padding[1] + j * dilation[1] + dx
                acc += float(weight[o, cl, i, j]) * m * bilinear(b, c, h, w)
        out[b, o, y, xo] = acc
    return out


@pytest.mark.parametrize("name", ["3x3_pad1_mask", "both_groups", "non_square", "huge_offsets"])
def test_reference_matches_the_definition(name):
    case = NAMED_CASES[name]
    case = Case(**{**case.__dict__, "batch": 1, "size": (5, 6)}) if name != "non_square" else case
    x, offset, weight, bias, mask = case.tensors()
    expected = loop_deform_conv2d(x, offset, weight, bias, mask, case.stride, case.padding, case.dilation)
    got = reference.deform_conv2d(x, offset, weight, bias, mask=mask, **case.kwargs())
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def grads_of(fn, tensors, grad_output_seed=7):
    """Output and gradients of sum(fn(*tensors) * r) for a fixed random r, for every tensor that is not None."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]
    out = fn(*leaves)
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_output_seed), dtype=out.dtype)
    params = [t for t in leaves if t is not None]
    grads = torch.autograd.grad((out * r.to(out.device)).sum(), params)
    return out.detach(), grads


def run_ours(case):
    return lambda x, o, w, b, m: aecr_ops.deform_conv2d(x, o, w, b, mask=m, **case.kwargs())


def run_reference(case):
    return lambda x, o, w, b, m: reference.deform_conv2d(x, o, w, b, mask=m, **case.kwargs())


def run_torchvision(case):
    torchvision = pytest.importorskip("torchvision")
    return lambda x, o, w, b, m: torchvision.ops.deform_conv2d(x, o, w, b, mask=m, **case.kwargs())


def assert_same(a, b, tol=1e-10):
    out_a, grads_a = a
    out_b, grads_b = b
    torch.testing.assert_close(out_a, out_b, rtol=tol, atol=tol)
    assert len(grads_a) == len(grads_b)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", sorted(NAMED_CASES))
def test_named_cases_against_reference(name):
    case = NAMED_CASES[name]
    tensors = case.tensors()
    assert_same(grads_of(run_ours(case), tensors), grads_of(run_reference(case), tensors))


RANDOM_CASES = list(enumerate(random_cases(40)))


@pytest.mark.parametrize("index,case", RANDOM_CASES)
def test_random_cases_against_reference(index, case):
    tensors = case.tensors(seed=index)
    assert_same(grads_of(run_ours(case), tensors), grads_of(run_reference(case), tensors))


@pytest.mark.parametrize("index,case", RANDOM_CASES)
def test_random_cases_against_torchvision(index, case):
    tensors = case.tensors(seed=index)
    assert_same(grads_of(run_ours(case), tensors), grads_of(run_torchvision(case), tensors))


def test_float32_close_to_float64_reference():
    case = NAMED_CASES["3x3_pad1_mask"]
    x, o, w, b, m = case.tensors()
    expected = reference.deform_conv2d(x, o, w, b, mask=m, **case.kwargs())
    got = aecr_ops.deform_conv2d(x.float(), o.float(), w.float(), b.float(), mask=m.float(), **case.kwargs())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_non_contiguous_inputs():
    case = NAMED_CASES["weight_groups"]
    x, o, w, b, m = case.tensors()
    # Same values, other memory layouts: channels-last input, transposed views of offset and mask.
    x_nc = x.to(memory_format=torch.channels_last)
    o_nc = o.transpose(2, 3).contiguous().transpose(2, 3)
    m_nc = m.transpose(2, 3).contiguous().transpose(2, 3)
    w_nc = w.transpose(0, 1).contiguous().transpose(0, 1)
    assert not (x_nc.is_contiguous() or o_nc.is_contiguous() or m_nc.is_contiguous() or w_nc.is_contiguous())
    assert_same(grads_of(run_ours(case), (x_nc, o_nc, w_nc, b, m_nc)), grads_of(run_reference(case), (x, o, w, b, m)))


def test_batch_zero():
    case = Case(0, 4, 3, (6, 6), (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, True, True)
    x, o, w, b, m = case.tensors()
    leaves = [t.requires_grad_(True) for t in (x, o, w, b, m)]
    out = aecr_ops.deform_conv2d(leaves[0], leaves[1], leaves[2], leaves[3], mask=leaves[4], **case.kwargs())
    assert out.shape == (0, 3, 6, 6)
    out.sum().backward()
    assert leaves[0].grad.shape == x.shape and leaves[2].grad.abs().sum() == 0 and leaves[3].grad.abs().sum() == 0


def test_batch_larger_than_one_chunk():
    # Enough images that the kernel splits the batch into several chunks of its column buffer.
    case = Case(9, 64, 8, (48, 48), (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, True, True, offset_scale=1.0)
    x, o, w, b, m = case.tensors(dtype=torch.float32)
    got = aecr_ops.deform_conv2d(x, o, w, b, mask=m, **case.kwargs())
    expected = torch.cat([aecr_ops.deform_conv2d(x[i:i + 1], o[i:i + 1], w, b, mask=m[i:i + 1], **case.kwargs())
                          for i in range(case.batch)])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_zero_offsets_and_unit_mask_give_conv2d():
    case = NAMED_CASES["dilation2"]
    x, o, w, b, _ = case.tensors()
    got = aecr_ops.deform_conv2d(x, torch.zeros_like(o), w, b, mask=torch.ones(o.shape[0], o.shape[1] // 2,
                                                                                 *o.shape[2:], dtype=o.dtype),
                                 **case.kwargs())
    torch.testing.assert_close(got, torch.nn.functional.conv2d(x, w, b, **case.kwargs()), rtol=1e-12, atol=1e-12)


def test_integer_offsets_shift_the_image():
    # An offset of exactly (+1, 0) everywhere moves every tap one row down: a 3x3 conv2d whose zero padding
    # is 0 rows at the top and 2 at the bottom.
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    offset = torch.zeros(1, 18, 6, 6, dtype=torch.float64)
    offset[:, 0::2] = 1.0
    padded = torch.nn.functional.pad(x, (1, 1, 0, 2))
    got = aecr_ops.deform_conv2d(x, offset, w, padding=1)
    torch.testing.assert_close(got, torch.nn.functional.conv2d(padded, w), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 3e9])
def test_non_finite_and_huge_offsets_sample_zero(bad):
    case = NAMED_CASES["3x3_pad1_mask"]
    x, o, w, b, m = case.tensors()
    o = o.clone()
    o[0, 4, 2, 3] = bad  # dy of tap 2 of image 0 at pixel (2, 3)
    tensors = (x, o, w, b, m)
    ours = grads_of(run_ours(case), tensors)
    expected = grads_of(run_reference(case), tensors)
    assert torch.isfinite(ours[0]).all() and all(torch.isfinite(g).all() for g in ours[1])
    assert_same(ours, expected)
    # The poisoned sample contributes nothing: the same output as with that tap's mask at zero.
    m0 = m.clone()
    m0[0, 2, 2, 3] = 0.0
    o0 = o.clone()
    o0[0, 4, 2, 3] = 0.0
    torch.testing.assert_close(ours[0], aecr_ops.deform_conv2d(x, o0, w, b, mask=m0, **case.kwargs()))


def test_samples_on_the_border_are_zero():
    # Positions at exactly -1 and H lie outside: value and offset gradient 0, as in the spec.
    x = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    w = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    for dy in (-1.0, 4.0):
        offset = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
        offset[0, 0, 0, 0] = dy
        offset.requires_grad_(True)
        out = aecr_ops.deform_conv2d(x, offset, w)
        out.sum().backward()
        assert out[0, 0, 0, 0].item() == 0.0 and offset.grad[0, :, 0, 0].abs().sum().item() == 0.0
        assert out[0, 0, 1, 1].item() == x[0, 0, 1, 1].item()


def test_cpu_is_deterministic():
    case = Case(2, 16, 8, (12, 12), (3, 3), (1, 1), (1, 1), (1, 1), 1, 2, True, True)
    x, o, w, b, m = case.tensors(dtype=torch.float32)
    first = grads_of(run_ours(case), (x, o, w, b, m))
    for _ in range(3):
        again = grads_of(run_ours(case), (x, o, w, b, m))
        assert torch.equal(first[0], again[0])
        assert all(torch.equal(a, b_) for a, b_ in zip(first[1], again[1]))


def test_cpu_result_does_not_depend_on_thread_count():
    case = Case(1, 16, 8, (12, 12), (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, True, True)
    x, o, w, b, m = case.tensors()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = grads_of(run_ours(case), (x, o, w, b, m))
    finally:
        torch.set_num_threads(threads)
    many = grads_of(run_ours(case), (x, o, w, b, m))
    # The sampling kernels sum in a fixed order whatever the thread count; the GEMM library may not.
    assert_same(one, many, tol=1e-12)
