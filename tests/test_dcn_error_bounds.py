"""The per-element rounding bounds (tests/dcn_error_bounds.py) that the emulated CUDA tests compare against: they
bound the float64 results themselves (a sum of |terms| is at least |sum|), the coordinate term bounds what moving
the sampling positions does, and they catch an error in a small entry that a bound scaled by the tensor's largest
entry lets through (review: 64 x bf16 roundoff x max|reference| allowed 25 % of the largest entry)."""
import pytest
import torch

from aecr_ops import reference
from dcn_cases import NAMED_CASES
from dcn_error_bounds import _positions, assert_within_rounding, magnitudes

CASES = sorted(NAMED_CASES)


def float64_results(case, tensors, grad, offset=None):
    x, o, w, b, m = [t.detach().double().clone().requires_grad_(True) if t is not None else None for t in tensors]
    if offset is not None:
        o = offset.detach().clone().requires_grad_(True)
    out = reference.deform_conv2d(x, o, w, b, mask=m, **case.kwargs())
    leaves = [x, o, w] + ([b] if b is not None else []) + ([m] if m is not None else [])
    return [out.detach()] + list(torch.autograd.grad((out * grad).sum(), leaves))


def problem(case):
    tensors = [t.double() if t is not None else None for t in case.tensors(seed=11)]
    grad = torch.randn(case.batch, case.out_channels, *case.out_size(), dtype=torch.float64,
                       generator=torch.Generator().manual_seed(12))
    return tensors, grad


@pytest.mark.parametrize("name", CASES)
def test_sums_of_absolute_terms_bound_the_results(name):
    case = NAMED_CASES[name]
    tensors, grad = problem(case)
    terms, _ = magnitudes(case, tensors, grad)
    for i, (e, bound) in enumerate(zip(float64_results(case, tensors, grad), terms)):
        assert e.shape == bound.shape
        assert (e.abs() <= bound * (1 + 1e-12) + 1e-300).all(), f"result {i}"


@pytest.mark.parametrize("name", CASES)
def test_the_coordinate_term_bounds_moving_the_sampling_positions(name):
    # Move every position by up to the coordinate error along each axis, towards the middle of its cell (a float32
    # position that crosses a cell edge changes the offset gradient by a step: no rounding bound covers that, and
    # float32 and float64 positions of the same float32 offsets cross one only within 2^-24 of an edge).
    case = NAMED_CASES[name]
    tensors, grad = problem(case)
    u = 2.0 ** -24
    _, coordinates = magnitudes(case, tensors, grad, u)
    o = tensors[1]
    b, channels, out_h, out_w = o.shape
    taps = case.kernel[0] * case.kernel[1]
    moved = o.reshape(b, channels // (2 * taps), taps, 2, out_h, out_w).clone()
    draw = torch.Generator().manual_seed(13)
    for axis, pos in enumerate(_positions(case, o)):
        pos = pos.reshape(moved[:, :, :, axis].shape)
        towards_middle = torch.where(pos - torch.floor(pos) < 0.5, 1.0, -1.0)
        step = 2 * u * (pos.abs() + 1) * torch.rand(pos.shape, generator=draw, dtype=torch.float64)
        moved[:, :, :, axis] += towards_middle * step
    before = float64_results(case, tensors, grad)
    after = float64_results(case, tensors, grad, offset=moved.reshape(o.shape))
    for i, (p, q, bound) in enumerate(zip(before, after, coordinates)):
        # First order in the step: within a cell the sample is bilinear in the position.
        assert ((p - q).abs() <= bound * (1 + 1e-6) + 1e-300).all(), f"result {i}"
    assert any((p != q).any() for p, q in zip(before, after)), "the move changed nothing"


def test_an_error_in_a_small_entry_fails_the_per_element_bound_not_the_per_tensor_one():
    case = NAMED_CASES["3x3_pad1_mask"]
    dtype, u = torch.bfloat16, 2.0 ** -8
    tensors, grad = problem(case)
    tensors = [t.to(dtype) if t is not None else None for t in tensors]
    terms, coordinates = magnitudes(case, tensors, grad)
    exact = float64_results(case, tensors, grad)
    offset_grad, bound = exact[2], terms[2]
    got = offset_grad.to(dtype)
    assert_within_rounding(got, offset_grad, bound, coordinates[2], dtype, u, "rounded once", 4)
    # A 10 % error (of its own sum of |terms|) in the offset gradient whose terms are smallest but not zero.
    candidates = torch.where(bound > 0, bound, torch.inf).flatten()
    i = int(candidates.argmin())
    wrong = got.clone().flatten()
    wrong[i] = (offset_grad.flatten()[i] + 0.1 * bound.flatten()[i]).to(dtype)
    wrong = wrong.reshape(got.shape)
    # The per-tensor bound the emulated tests used before: 64 x u x max|reference|.
    assert (wrong.double() - offset_grad).abs().max() <= 64 * u * offset_grad.abs().max()
    with pytest.raises(AssertionError, match="sum of \\|terms\\|"):
        assert_within_rounding(wrong, offset_grad, bound, coordinates[2], dtype, u, "offset", 4)
