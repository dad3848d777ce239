"""The modules: the CharlesShang/DCNv2 `DCN` contract and ModulatedDeformConv2d."""
import math

import pytest
import torch
import torch.nn.functional as F

import aecr_ops
from aecr_ops import reference
from dcn_cases import fit_to_a_target


def test_dcn_state_dict_is_exactly_dcnv2s():
    layer = aecr_ops.DCN(256, 256, kernel_size=(3, 3), stride=1, padding=1, deformable_groups=1)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {
        "weight": (256, 256, 3, 3),
        "bias": (256,),
        "conv_offset_mask.weight": (27, 256, 3, 3),
        "conv_offset_mask.bias": (27,),
    }


def test_dcn_state_dict_with_offset_groups_and_rectangular_kernel():
    layer = aecr_ops.DCN(8, 4, kernel_size=(3, 2), stride=1, padding=(1, 0), deformable_groups=2)
    assert tuple(layer.conv_offset_mask.weight.shape) == (2 * 3 * 6, 8, 3, 2)


def test_dcn_initialisation():
    torch.manual_seed(1)
    layer = aecr_ops.DCN(16, 8, 3, 1, 1)
    bound = 1 / math.sqrt(16 * 9)
    assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.9 * bound
    assert layer.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)  # uniform(-b, b)
    assert torch.count_nonzero(layer.bias) == 0
    assert torch.count_nonzero(layer.conv_offset_mask.weight) == 0
    assert torch.count_nonzero(layer.conv_offset_mask.bias) == 0


def test_dcn_at_initialisation_is_half_a_convolution():
    layer = aecr_ops.DCN(6, 5, 3, 1, 1).double()
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    expected = 0.5 * F.conv2d(x, layer.weight, padding=1) + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_dcn_forward_is_the_documented_composition():
    layer = aecr_ops.DCN(4, 3, 3, stride=2, padding=1, deformable_groups=2).double()
    with torch.no_grad():
        layer.conv_offset_mask.weight.normal_(0, 0.3)
        layer.conv_offset_mask.bias.normal_()
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    om = F.conv2d(x, layer.conv_offset_mask.weight, layer.conv_offset_mask.bias, stride=2, padding=1)
    o1, o2, m = torch.chunk(om, 3, dim=1)
    expected = reference.deform_conv2d(x, torch.cat((o1, o2), 1), layer.weight, layer.bias, stride=2, padding=1,
                                       mask=torch.sigmoid(m))
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


def test_dcn_with_dilation_keeps_shapes_consistent():
    layer = aecr_ops.DCN(4, 4, 3, stride=1, padding=2, dilation=2)
    assert layer(torch.randn(1, 4, 10, 10)).shape == (1, 4, 10, 10)


def test_dcn_loads_a_dcnv2_style_checkpoint():
    src = aecr_ops.DCN(8, 8, 3, 1, 1)
    state = {k: torch.randn_like(v) for k, v in src.state_dict().items()}
    dst = aecr_ops.DCN(8, 8, 3, 1, 1)
    dst.load_state_dict(state, strict=True)
    for k, v in dst.state_dict().items():
        assert torch.equal(v, state[k])


def test_modulated_deform_conv2d_module():
    layer = aecr_ops.ModulatedDeformConv2d(6, 4, (3, 2), stride=1, padding=(1, 0), groups=2, deformable_groups=3)
    layer = layer.double()
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    offset = torch.randn(2, 2 * 3 * 6, 7, 6, dtype=torch.float64)
    mask = torch.rand(2, 3 * 6, 7, 6, dtype=torch.float64)
    expected = reference.deform_conv2d(x, offset, layer.weight, layer.bias, padding=(1, 0), mask=mask)
    torch.testing.assert_close(layer(x, offset, mask), expected, rtol=1e-10, atol=1e-10)
    no_bias = aecr_ops.ModulatedDeformConv2d(6, 4, 3, bias=False)
    assert no_bias.bias is None and set(no_bias.state_dict()) == {"weight"}


def test_dcn_trains():
    torch.manual_seed(0)
    layer = aecr_ops.DCN(3, 3, 3, 1, 1)
    target = aecr_ops.DCN(3, 3, 3, 1, 1)
    with torch.no_grad():
        target.conv_offset_mask.weight.normal_(0, 0.2)
    first, last = fit_to_a_target(layer, target)
    assert last < 0.2 * first
    assert layer.conv_offset_mask.weight.grad.abs().sum() > 0
