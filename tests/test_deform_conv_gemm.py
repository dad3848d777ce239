"""The CPU kernels' GEMMs: float32 goes to oneDNN's inner product on CPUs with AVX-512 and to at::mm (MKL) elsewhere,
or when torch.backends.mkldnn is disabled. Either library, every output and gradient matches the float64 reference,
on shapes of several tiles, several backward chunks and a chunk of rows that is not a multiple of 16."""
import contextlib

import pytest
import torch

import aecr_ops
from aecr_ops import reference
from dcn_cases import Case

CASES = {
    # 2 images of 24 x 37 pixels: tiles of an odd size, rows that are not a multiple of 16.
    "groups": Case(2, 12, 8, (24, 37), (3, 3), (1, 1), (1, 1), (1, 1), 2, 3, True, True),
    # 64 -> 16 channels at 72 x 72: a column-row budget of several tiles per image.
    "wide": Case(1, 64, 16, (72, 72), (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, True, True, offset_scale=1.5),
}


@contextlib.contextmanager
def mkldnn_enabled(enabled):
    # torch.backends.mkldnn.flags() also sets oneDNN's TF32 mode, with a warning on machines without an Intel GPU.
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def outputs_and_grads(case, dtype, asked=(True, True, True, True, True)):
    # The reference sees the float32 values: a float64 offset a rounding away from an integer has other corners.
    tensors = [None if t is None else t.to(dtype) for t in case.tensors(dtype=torch.float32, seed=5)]
    leaves = [t.detach().clone().requires_grad_(want) if t is not None else None for t, want in zip(tensors, asked)]
    fn = reference.deform_conv2d if dtype == torch.float64 else aecr_ops.deform_conv2d
    out = fn(leaves[0], leaves[1], leaves[2], leaves[3], mask=leaves[4], **case.kwargs())
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64).to(dtype)
    params = [t for t in leaves if t is not None and t.requires_grad]
    return [out.detach()] + list(torch.autograd.grad((out * r).sum(), params))


@pytest.mark.parametrize("onednn", [True, False], ids=["mkldnn-enabled", "mkldnn-disabled"])
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("asked", [(True, True, True, True, True), (False, False, True, False, False),
                                   (True, False, False, False, False)], ids=["all", "weight", "input"])
def test_float32_gemms_match_the_float64_reference(name, onednn, asked):
    case = CASES[name]
    with mkldnn_enabled(onednn):
        got = outputs_and_grads(case, torch.float32, asked)
    want = outputs_and_grads(case, torch.float64, asked)
    assert len(got) == len(want)
    names = [n for n, a in zip(("input", "offset", "weight", "bias", "mask"), asked) if a]
    for name_, g, w in zip(["output"] + names, got, want):
        scale = max(1.0, w.abs().max().item())
        err = (g.double() - w).abs() / scale
        if name_ in ("offset", "mask"):
            # The float32 sampling point of a site a rounding away from a pixel boundary can fall on its other side
            # and take the other corners' slope: allow one such element in 10,000.
            assert (err > 2e-5).double().mean().item() <= 1e-4, (name, onednn, name_, err.max().item())
        else:
            assert err.max().item() < 2e-5, (name, onednn, name_, err.max().item())

def test_either_gemm_library_gives_the_same_values():
    case = CASES["wide"]
    with mkldnn_enabled(True):
        first = outputs_and_grads(case, torch.float32)
    with mkldnn_enabled(False):
        second = outputs_and_grads(case, torch.float32)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
