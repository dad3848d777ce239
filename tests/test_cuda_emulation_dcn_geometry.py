"""Review R5: the sampling geometry (offset, mask) stays float32 beside float16 / bfloat16 features, as torchvision
keeps it: the CUDA kernels take the features in their dtype and the geometry in float32, and return the offset
and mask gradients in the geometry's dtype. (Under CUDA autocast, csrc/autocast.cpp casts the features to the
autocast dtype and the geometry to float32; that kernel needs a GPU to run.)

The problem makes every feature-side term exact (integer features, weights and grad_output), so the offset and
mask gradients carry only float32 rounding when the geometry is read in float32, and about 1e-2 relative error
(bf16's 8 bits) when it is rounded to bfloat16 first.
"""
import pytest
import torch

from aecr_ops import reference
from dcn_cases import Case

pytestmark = pytest.mark.slow

CASE = Case(2, 8, 4, (7, 9), (3, 3), (1, 1), (1, 1), (1, 1), 1, 2, True, False)
ALL_GRADS = (True, True, True, True, True)


def geometry_problem(dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    b, c, (h, w), og = CASE.batch, CASE.in_channels, CASE.size, CASE.offset_groups
    x = torch.randint(-4, 5, (b, c, h, w), generator=g).to(dtype)
    weight = torch.randint(-2, 3, (CASE.out_channels, c, 3, 3), generator=g).to(dtype)
    offset = 3.0 * torch.randn(b, 2 * og * 9, h, w, generator=g)  # float32, not representable in bf16
    mask = torch.rand(b, og * 9, h, w, generator=g)
    grad = torch.randint(-2, 3, (b, CASE.out_channels, h, w), generator=g).to(dtype)
    return x, offset, weight, mask, grad


def reference_grads(x, offset, weight, mask, grad):
    leaves = [t.double().requires_grad_(True) for t in (x, offset, weight, mask)]
    out = reference.deform_conv2d(leaves[0], leaves[1], leaves[2], None, mask=leaves[3], **CASE.kwargs())
    return out.detach(), torch.autograd.grad((out * grad.double()).sum(), leaves)


def relative_error(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path,deterministic", [("simple", False), ("simple", True), ("implicit", False)])
def test_float32_geometry_beside_low_precision_features(emulated, dtype, path, deterministic):
    x, offset, weight, mask, grad = geometry_problem(dtype)
    geometry = [list(CASE.stride), list(CASE.padding), list(CASE.dilation), 1, CASE.offset_groups]
    out_exact, (gx, goffset, gweight, gmask) = reference_grads(x, offset, weight, mask, grad)
    out = emulated.dcn_forward(x, weight, offset, mask, None, *geometry, path, 1 << 28)
    assert out.dtype == dtype
    assert relative_error(out, out_exact) < 2 ** -7
    gi, gw, go, gm, _ = emulated.dcn_backward(grad, x, weight, offset, mask, *geometry, path, deterministic, 1 << 28,
                                              ALL_GRADS)
    assert (gi.dtype, gw.dtype, go.dtype, gm.dtype) == (dtype, dtype, torch.float32, torch.float32)
    assert relative_error(gi, gx) < 2 ** -7 and relative_error(gw, gweight) < 2 ** -7
    # Read in float32, the geometry's gradients are float32-accurate; rounded to bf16 they would be off by ~1e-2.
    assert relative_error(go, goffset) < 1e-5, relative_error(go, goffset)
    assert relative_error(gm, gmask) < 1e-5, relative_error(gm, gmask)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_geometry_is_read_as_given(emulated, dtype):
    # Geometry in the features' dtype (no autocast): still accepted, computed in float32, gradients in that dtype.
    x, offset, weight, mask, grad = geometry_problem(dtype)
    geometry = [list(CASE.stride), list(CASE.padding), list(CASE.dilation), 1, CASE.offset_groups]
    offset, mask = offset.to(dtype), mask.to(dtype)
    _, (_, goffset, _, gmask) = reference_grads(x, offset, weight, mask, grad)
    _, _, go, gm, _ = emulated.dcn_backward(grad, x, weight, offset, mask, *geometry, "simple", False, 1 << 28,
                                            ALL_GRADS)
    assert go.dtype == dtype and gm.dtype == dtype
    assert relative_error(go, goffset) < 2 ** -7 and relative_error(gm, gmask) < 2 ** -7
