"""CUDA kernels run on the CPU under an emulator (tests/cuda_emulation/cuda_emulation.h): the implicit-GEMM
deform_conv2d (its real driver and kernels, with emulated threads, shared memory, warp shuffles and WMMA
fragments) against the float64 reference, and FastDeconv's two-launch patch statistics, fused Newton-Schulz
(forward and backward) and running update against the CPU ops, so that their indexing, tiling, synchronisation
and layouts are checked on machines without a GPU. What the emulator cannot show (speed, memory ordering beyond
barriers, the hardware's exact rounding inside an MMA) still needs a GPU: tests/test_deform_conv_implicit_cuda.py.

Building the emulated module takes about half a minute.
"""
import os

import pytest
import torch

import aecr_ops
from aecr_ops import reference
from dcn_cases import NAMED_CASES, Case
from test_fastdeconv_ops import STAT_CASES, spd, stats_inputs

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Unit roundoff of the tensor-core operands: TF32 and fp16 keep 10 mantissa bits, bf16 7.
ROUNDOFF = {torch.float32: 2.0 ** -11, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}

CASES = {
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


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    from torch.utils.cpp_extension import load
    build = tmp_path_factory.mktemp("implicit_dcn_emulation")
    return load("aecr_cuda_emulation", [os.path.join(ROOT, "tests", "cuda_emulation", "emulated_kernels.cpp")],
                extra_include_paths=[os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include"),
                                     os.path.join(ROOT, "tests", "cuda_emulation")],
                extra_cflags=["-O2", "-std=c++20"], build_directory=str(build), verbose=False)


def problem(case, dtype, seed=3):
    x, o, w, b, m = [t.to(dtype) if t is not None else None for t in case.tensors(seed=seed)]
    groups = x.shape[1] // w.shape[1]
    offset_groups = o.shape[1] // (2 * w.shape[2] * w.shape[3])
    geometry = [list(case.stride), list(case.padding), list(case.dilation), groups, offset_groups]
    return (x, o, w, b, m), geometry


def exact(case, tensors, seed=5):
    """Output and gradients (input, offset, weight, bias, mask) in float64 of the same (rounded) values."""
    leaves = [t.double().requires_grad_(True) if t is not None else None for t in tensors]
    x, o, w, b, m = leaves
    out = reference.deform_conv2d(x, o, w, b, mask=m, **case.kwargs())
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grads = torch.autograd.grad((out * grad).sum(), [t for t in leaves if t is not None])
    return out.detach(), grad, grads


def emulated_grads(emulated, tensors, geometry, grad, dtype, deterministic, sms=3):
    x, o, w, b, m = tensors
    gi, gw, go, gm, gb = emulated.backward(grad.to(dtype), x, w, o, m, *geometry, deterministic, sms)
    return [gi, go, gw] + ([gb] if b is not None else []) + ([gm] if m is not None else [])


def assert_close_in_precision(got, expected, dtype, label):
    assert got.dtype == dtype and got.shape == expected.shape, label
    err = (got.double() - expected).abs().max().item()
    scale = expected.abs().max().item() + 1e-30
    assert err <= 8 * ROUNDOFF[dtype] * scale, f"{label}: error {err:.3g} for values up to {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(CASES))
def test_emulated_implicit_path_matches_float64_reference(emulated, name, dtype):
    case = CASES[name]
    tensors, geometry = problem(case, dtype)
    x, o, w, b, m = tensors
    out_exact, grad, grads_exact = exact(case, tensors)
    assert_close_in_precision(emulated.forward(x, w, o, m, b, *geometry), out_exact, dtype, "output")
    names = ["input", "offset", "weight"] + (["bias"] if b is not None else []) + (["mask"] if m is not None else [])
    for deterministic in (False, True):
        got = emulated_grads(emulated, tensors, geometry, grad, dtype, deterministic)
        for label, g, e in zip(names, got, grads_exact):
            assert_close_in_precision(g, e, dtype, f"{label} (deterministic={deterministic})")


def test_emulated_deterministic_backward_is_bitwise_reproducible_and_split_independent(emulated):
    case = CASES["wide_groups"]
    tensors, geometry = problem(case, torch.float32, seed=8)
    _, grad, grads_exact = exact(case, tensors)
    first = emulated_grads(emulated, tensors, geometry, grad, torch.float32, True, sms=3)
    again = emulated_grads(emulated, tensors, geometry, grad, torch.float32, True, sms=3)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    # Another SM count changes the split-K of the weight gradient, not the result beyond rounding.
    more_splits = emulated_grads(emulated, tensors, geometry, grad, torch.float32, True, sms=40)
    for a, b, e in zip(first, more_splits, grads_exact):
        assert_close_in_precision(b, e, torch.float32, "more splits")
        assert (a - b).abs().max().item() <= 8 * ROUNDOFF[torch.float32] * e.abs().max().item()


@pytest.mark.parametrize("sms", [1, 5])
@pytest.mark.parametrize("name", sorted(n for n, c in STAT_CASES.items() if c[4][0] * c[4][1] * c[8] <= 64))
def test_emulated_two_launch_statistics_match_the_cpu_op(emulated, name, sms):
    case = STAT_CASES[name]
    _, _, _, _, kernel, dilation, padding, stride, block, groups = case
    x = stats_inputs(case, torch.float64, seed=2)
    args = (list(kernel), list(dilation), list(padding), stride, block, groups, 1e-5)
    mean, cov = emulated.moments(x, *args, sms)
    expected_mean, expected_cov = aecr_ops.patch_statistics(x, *args)
    torch.testing.assert_close(mean, expected_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cov, expected_cov, rtol=1e-12, atol=1e-12)


def test_emulated_statistics_in_float32_keep_a_far_mean(emulated):
    # Spread 0.1 around 100 over many blocks: the per-block shifts keep float32 sums from cancelling.
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.1 + 100
    args = ([3, 3], [1, 1], [1, 1], 3, 3, 1, 1e-5)
    mean, cov = emulated.moments(x.float(), *args, 6)
    expected_mean, expected_cov = aecr_ops.patch_statistics(x, *args)
    torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(cov.double(), expected_cov, rtol=0, atol=1e-3 * expected_cov.abs().max().item())


@pytest.mark.parametrize("f,n_iter", [(1, 5), (9, 5), (27, 5), (27, 0), (33, 3)])
def test_emulated_fused_newton_schulz_matches_the_cpu_op(emulated, f, n_iter):
    a = spd(3, f, seed=f, cond=1e2)
    result = emulated.isqrt(a, n_iter)
    leaf = a.clone().requires_grad_(True)
    expected = aecr_ops.isqrt_newton_schulz(leaf, n_iter)
    torch.testing.assert_close(result, expected.detach(), rtol=1e-12, atol=1e-12)
    grad = torch.randn(a.shape, generator=torch.Generator().manual_seed(f), dtype=torch.float64)
    (expected_grad,) = torch.autograd.grad((expected * grad).sum(), leaf)
    got = emulated.isqrt_backward(grad, a, result, n_iter)
    torch.testing.assert_close(got, expected_grad, rtol=1e-10, atol=1e-12 * expected_grad.abs().max().item())


@pytest.mark.parametrize("bad", [None, "mean", "deconv"])
def test_emulated_running_update_matches_the_cpu_op(emulated, bad):
    g = torch.Generator().manual_seed(4)
    tensors = [torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((600,), (600, 600)) * 2]
    if bad is not None:
        tensors[2 if bad == "mean" else 3].view(-1)[-1] = float("nan")
    mine = [t.clone() for t in tensors]
    finite = emulated.update_running(*mine, 0.1)
    expected = torch.ops.aecr_ops.fastdeconv_update_running(*tensors, 0.1)
    assert bool(finite) == bool(expected) == (bad is None)
    assert torch.equal(mine[0], tensors[0]) and torch.equal(mine[1], tensors[1])
