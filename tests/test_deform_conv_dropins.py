"""The drop-ins: aecr_ops.DeformConv2d for torchvision.ops.DeformConv2d, and ModulatedDeformConv2dPack /
MMCVModulatedDeformConv2d for mmcv.ops' ModulatedDeformConv2dPack / ModulatedDeformConv2d."""
import math
import warnings

import numpy
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aecr_ops
from aecr_ops import ArgumentError, ArgumentTypeError, reference
from dcn_cases import fit_to_a_target

# (in, out, kernel, stride, padding, dilation, groups, offset groups, mask, bias)
CONFIGS = [
    (4, 6, 3, 1, 1, 1, 1, 1, True, True),
    (6, 4, (3, 2), (2, 1), (1, 0), (1, 2), 2, 3, True, True),   # groups, offset groups, pairs everywhere
    (4, 4, 3, 2, 2, 2, 4, 2, False, True),                      # no mask (DCNv1), depthwise
    (6, 3, (2, 3), 1, (0, 1), 1, 3, 6, True, False),            # no bias, one offset group per channel
    (3, 5, 1, 1, 0, 1, 1, 1, False, False),                     # 1x1, neither
]


def _tv():
    return pytest.importorskip("torchvision").ops


def _inputs(cin, kernel, stride, padding, dilation, og, with_mask, size=(7, 8), batch=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    pair = (lambda v: (v, v) if isinstance(v, int) else v)
    (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
    ho = (size[0] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (size[1] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    x = torch.randn(batch, cin, *size, generator=g, dtype=torch.float64)
    offset = 1.5 * torch.randn(batch, 2 * og * kh * kw, ho, wo, generator=g, dtype=torch.float64)
    mask = torch.rand(batch, og * kh * kw, ho, wo, generator=g, dtype=torch.float64) if with_mask else None
    return x, offset, mask


def _pair_of_modules(cfg, seed=0):
    """torchvision's DeformConv2d and ours, each made right after torch.manual_seed(seed)."""
    tv = _tv()
    cin, cout, k, s, p, d, groups, _, _, bias = cfg
    torch.manual_seed(seed)
    theirs = tv.DeformConv2d(cin, cout, k, stride=s, padding=p, dilation=d, groups=groups, bias=bias)
    torch.manual_seed(seed)
    ours = aecr_ops.DeformConv2d(cin, cout, k, stride=s, padding=p, dilation=d, groups=groups, bias=bias)
    return theirs, ours


# ---------------------------------------------------------------------------------------------------------------
# torchvision.ops.DeformConv2d


@pytest.mark.parametrize("cfg", CONFIGS)
def test_deform_conv2d_same_parameters_as_torchvision_from_the_same_seed(cfg):
    theirs, ours = _pair_of_modules(cfg, seed=11)
    assert [n for n, _ in theirs.named_parameters()] == [n for n, _ in ours.named_parameters()]
    for (name, a), (_, b) in zip(theirs.named_parameters(), ours.named_parameters()):
        assert a.shape == b.shape and torch.equal(a, b), name
    # Both drew the same amount from the generator: the next draw agrees.
    torch.manual_seed(11)
    _tv().DeformConv2d(*cfg[:3], stride=cfg[3], padding=cfg[4], dilation=cfg[5], groups=cfg[6], bias=cfg[9])
    after_theirs = torch.rand(4)
    torch.manual_seed(11)
    aecr_ops.DeformConv2d(*cfg[:3], stride=cfg[3], padding=cfg[4], dilation=cfg[5], groups=cfg[6], bias=cfg[9])
    assert torch.equal(torch.rand(4), after_theirs)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_deform_conv2d_attributes_repr_and_state_dict_match_torchvision(cfg):
    theirs, ours = _pair_of_modules(cfg)
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
        assert getattr(ours, name) == getattr(theirs, name), name
        assert type(getattr(ours, name)) is type(getattr(theirs, name)), name
    assert repr(ours) == repr(theirs)
    assert (ours.bias is None) == (theirs.bias is None)
    assert "bias" in ours._parameters and "bias" in theirs._parameters   # registered, as None without bias
    sa, sb = theirs.state_dict(), ours.state_dict()
    assert list(sa) == list(sb)
    assert all(sa[k].shape == sb[k].shape for k in sa)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_deform_conv2d_state_dicts_load_both_ways_strictly(cfg):
    theirs, ours = _pair_of_modules(cfg)
    g = torch.Generator().manual_seed(5)
    random_state = {k: torch.randn(v.shape, generator=g) for k, v in theirs.state_dict().items()}
    ours.load_state_dict(random_state, strict=True)
    theirs2, _ = _pair_of_modules(cfg, seed=1)
    theirs2.load_state_dict(ours.state_dict(), strict=True)
    for k, v in theirs2.state_dict().items():
        assert torch.equal(v, random_state[k]), k


@pytest.mark.parametrize("cfg", CONFIGS)
def test_deform_conv2d_same_outputs_and_gradients_as_torchvision_float64(cfg):
    theirs, ours = _pair_of_modules(cfg, seed=2)
    theirs, ours = theirs.double(), ours.double()
    cin, _, k, s, p, d, _, og, with_mask, _ = cfg
    x, offset, mask = _inputs(cin, k, s, p, d, og, with_mask)
    results = []
    for module in (theirs, ours):
        args = [t.clone().requires_grad_() for t in (x, offset)]
        m = mask.clone().requires_grad_() if mask is not None else None
        out = module(*args, m) if m is not None else module(*args)
        cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        (out * cot).sum().backward()
        grads = [args[0].grad, args[1].grad, m.grad if m is not None else None, module.weight.grad,
                 module.bias.grad if module.bias is not None else None]
        results.append((out, grads))
    (out_t, grads_t), (out_o, grads_o) = results
    torch.testing.assert_close(out_o, out_t, rtol=1e-10, atol=1e-10)
    for name, a, b in zip(("input", "offset", "mask", "weight", "bias"), grads_t, grads_o):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9, msg=f"gradient of {name}")


def test_deform_conv2d_mask_keyword_and_positional_like_torchvision():
    theirs, ours = _pair_of_modules(CONFIGS[0])
    theirs, ours = theirs.double(), ours.double()
    x, offset, mask = _inputs(4, 3, 1, 1, 1, 1, True)
    torch.testing.assert_close(ours(x, offset, mask=mask), theirs(x, offset, mask=mask), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours(input=x, offset=offset), theirs(input=x, offset=offset), rtol=1e-10,
                               atol=1e-10)


@pytest.mark.parametrize("groups,bias", [(1, True), (2, True), (4, False)])
def test_deform_conv2d_initialisation_is_nn_conv2ds(groups, bias):
    """torchvision initialises as nn.Conv2d does (kaiming uniform a=sqrt(5), bias +-1/sqrt(fan_in)); no
    torchvision needed to check that ours draws the same numbers."""
    torch.manual_seed(4)
    conv = nn.Conv2d(8, 4, (3, 2), groups=groups, bias=bias)
    torch.manual_seed(4)
    ours = aecr_ops.DeformConv2d(8, 4, (3, 2), groups=groups, bias=bias)
    assert torch.equal(ours.weight, conv.weight)
    assert (ours.bias is None) == (conv.bias is None)
    if bias:
        assert torch.equal(ours.bias, conv.bias)
    torch.manual_seed(4)
    ours.reset_parameters()
    assert torch.equal(ours.weight, conv.weight)


def test_deform_conv2d_with_zero_offsets_is_a_convolution():
    ours = aecr_ops.DeformConv2d(6, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1), groups=2).double()
    x = torch.randn(2, 6, 9, 8, dtype=torch.float64)
    expected = F.conv2d(x, ours.weight, ours.bias, stride=(2, 1), padding=(1, 2), dilation=(2, 1), groups=2)
    offset = torch.zeros(2, 2 * 3 * 6, *expected.shape[2:], dtype=torch.float64)   # 3 offset groups
    torch.testing.assert_close(ours(x, offset), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs,error,words", [
    (dict(in_channels=0), ArgumentError, "in_channels"),
    (dict(out_channels=-1), ArgumentError, "out_channels"),
    (dict(in_channels=4.0), ArgumentError, "in_channels"),
    (dict(groups=0), ArgumentError, "groups"),
    (dict(groups=3), ArgumentError, "groups"),             # divides neither 4 nor 6
    (dict(in_channels=6, groups=3), ArgumentError, "groups"),   # divides in, not out=4
    (dict(kernel_size=0), ArgumentError, "kernel_size"),
    (dict(kernel_size=(3, 3, 3)), ArgumentTypeError, "kernel_size"),
    (dict(kernel_size="3"), ArgumentTypeError, "kernel_size"),
    (dict(stride=0), ArgumentError, "stride"),
    (dict(padding=-1), ArgumentError, "padding"),
    (dict(dilation=(1, 0)), ArgumentError, "dilation"),
])
def test_deform_conv2d_constructor_errors_name_the_argument(kwargs, error, words):
    args = dict(in_channels=4, out_channels=4, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(error, match=words):
        aecr_ops.DeformConv2d(**args)


def test_deform_conv2d_group_errors_are_value_errors_as_torchvision_raises():
    tv = _tv()
    for args in ((4, 6, 3, 1, 0, 1, 3), (6, 4, 3, 1, 0, 1, 3)):
        with pytest.raises(ValueError):
            tv.DeformConv2d(*args)
        with pytest.raises(ValueError, match="groups"):
            aecr_ops.DeformConv2d(*args)


# ---------------------------------------------------------------------------------------------------------------
# mmcv's published fixed-value case, transcribed from open-mmlab/mmcv, tests/test_ops/test_modulated_deform_conv.py
# at commit 45fa3e44a22cd0b74071237304bdfef97b5b9bd6 (the same values at 08653020139b452cee07fd78fd19554e8b648a99).
# These are mmcv's numbers, not ours: its test builds ModulatedDeformConv2dPack(1, 1, kernel_size=(2, 2),
# stride=1, padding=1, deform_groups=1, bias=False), fills the weight with 1 (conv_offset stays zero from
# init_weights), runs output.sum().backward() and compares with numpy.allclose(actual, expected, 1e-2).

MMCV_INPUT_T = [[[[1., 2., 3.], [1., 2., 3.], [1., 2., 3.]]]]
MMCV_OUTPUT_T = [[[[0.5, 1.5, 2.5, 1.5], [1.0, 3.0, 5.0, 3.0], [1.0, 3.0, 5.0, 3.0],
                   [0.5, 1.5, 2.5, 1.5]]]]
MMCV_INPUT_GRAD = [[[[2., 2., 2.], [2., 2., 2.], [2., 2., 2.]]]]
MMCV_DCN_W_GRAD = [[[[9., 9.], [9., 9.]]]]
MMCV_DCN_OFFSET_W_GRAD = [[[[-7.0, -4.0], [0.0, 0.0]]], [[[-9.0, 7.5], [-6.0, 5.0]]],
                          [[[-4.0, -7.0], [0.0, 0.0]]],
                          [[[-7.5, -9.0], [-5.0, -6.0]]],
                          [[[-7.0, -4.0], [-7.0, -4.0]]],
                          [[[-6.0, 5.0], [-9.0, 7.5]]],
                          [[[-4.0, -7.0], [-4.0, -7.0]]],
                          [[[-5.0, -6.0], [-7.5, -9.0]]], [[[10.5, 6.0], [7.0, 4.0]]],
                          [[[6.0, 10.5], [4.0, 7.0]]], [[[7.0, 4.0], [10.5, 6.0]]],
                          [[[4.0, 7.0], [6.0, 10.5]]]]
MMCV_DCN_OFFSET_B_GRAD = [-3.0, -1.5, -3.0, -1.5, -3.0, -1.5, -3.0, -1.5, 4.5, 4.5, 4.5, 4.5]


def _allclose(actual, expected):
    return numpy.allclose(actual.detach().cpu().numpy(), expected, 1e-2)   # mmcv's check and tolerance


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pack_reproduces_mmcvs_published_values(dtype):
    input = torch.tensor(MMCV_INPUT_T, dtype=dtype)
    input.requires_grad = True
    dcn = aecr_ops.ModulatedDeformConv2dPack(1, 1, kernel_size=(2, 2), stride=1, padding=1, deform_groups=1,
                                             bias=False)
    dcn.weight.data.fill_(1.)
    dcn.type(dtype)
    output = dcn(input)
    output.sum().backward()
    assert output.dtype == dtype
    assert _allclose(output, MMCV_OUTPUT_T)
    assert _allclose(input.grad, MMCV_INPUT_GRAD)
    assert _allclose(dcn.weight.grad, MMCV_DCN_W_GRAD)
    assert _allclose(dcn.conv_offset.weight.grad, MMCV_DCN_OFFSET_W_GRAD)
    assert _allclose(dcn.conv_offset.bias.grad, MMCV_DCN_OFFSET_B_GRAD)


def test_mmcvs_published_values_pin_the_offset_and_mask_layout():
    """The published gradients tell the layouts apart: the same computation with dy and dx swapped, or with
    the mask taken from the first third of conv_offset's channels, misses them."""
    x = torch.tensor(MMCV_INPUT_T, dtype=torch.float64)
    weight = torch.ones(1, 1, 2, 2, dtype=torch.float64)

    def offset_weight_grad(layout):
        w = torch.zeros(12, 1, 2, 2, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(12, dtype=torch.float64, requires_grad=True)
        out = F.conv2d(x, w, b, padding=1)
        offset, mask = layout(out)
        reference.deform_conv2d(x, offset, weight, None, padding=1, mask=torch.sigmoid(mask)).sum().backward()
        return w.grad, b.grad

    def mmcv_layout(out):
        o1, o2, m = torch.chunk(out, 3, dim=1)
        return torch.cat((o1, o2), 1), m

    def swapped_dy_dx(out):
        offset, m = mmcv_layout(out)
        return offset.view(1, 4, 2, 4, 4).flip(2).reshape(1, 8, 4, 4), m

    def mask_first(out):
        m, o1, o2 = torch.chunk(out, 3, dim=1)
        return torch.cat((o1, o2), 1), m

    w_grad, b_grad = offset_weight_grad(mmcv_layout)
    assert _allclose(w_grad, MMCV_DCN_OFFSET_W_GRAD) and _allclose(b_grad, MMCV_DCN_OFFSET_B_GRAD)
    for layout in (swapped_dy_dx, mask_first):
        w_grad, b_grad = offset_weight_grad(layout)
        assert not _allclose(w_grad, MMCV_DCN_OFFSET_W_GRAD)


# ---------------------------------------------------------------------------------------------------------------
# mmcv's ModulatedDeformConv2dPack and ModulatedDeformConv2d


def test_pack_state_dict_is_exactly_mmcvs():
    layer = aecr_ops.ModulatedDeformConv2dPack(16, 8, kernel_size=3, padding=1, deform_groups=2)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {"weight": (8, 16, 3, 3), "bias": (8,), "conv_offset.weight": (2 * 3 * 9, 16, 3, 3),
                      "conv_offset.bias": (2 * 3 * 9,)}
    grouped = aecr_ops.ModulatedDeformConv2dPack(8, 4, kernel_size=(3, 2), groups=2, bias=False)
    shapes = {k: tuple(v.shape) for k, v in grouped.state_dict().items()}
    assert shapes == {"weight": (4, 4, 3, 2), "conv_offset.weight": (18, 8, 3, 2), "conv_offset.bias": (18,)}
    assert layer.state_dict()._metadata[""]["version"] == 2


def test_pack_attributes_are_mmcvs():
    layer = aecr_ops.ModulatedDeformConv2dPack(4, 6, 3, stride=2, padding=1, dilation=2, groups=2, deform_groups=4)
    assert (layer.in_channels, layer.out_channels, layer.groups, layer.deform_groups) == (4, 6, 2, 4)
    assert (layer.kernel_size, layer.stride, layer.padding, layer.dilation) == ((3, 3), (2, 2), (1, 1), (2, 2))
    assert layer.transposed is False and layer.output_padding == (0,)
    conv = layer.conv_offset
    assert (conv.in_channels, conv.out_channels) == (4, 4 * 3 * 9)
    assert (conv.kernel_size, conv.stride, conv.padding, conv.dilation) == ((3, 3), (2, 2), (1, 1), (2, 2))
    assert "deform_groups=4" in repr(layer) and "conv_offset" in repr(layer)


def test_pack_initialisation_follows_mmcvs_init_weights_and_random_order():
    # mmcv: weight uniform in +-1/sqrt(in_channels * kh * kw) (all in_channels, groups or not), bias zero; the
    # constructor draws the weight, then nn.Conv2d's own initialisation of conv_offset, then the weight again,
    # and zeroes conv_offset.
    cin, cout, k, groups = 8, 4, (3, 2), 2
    stdv = 1.0 / math.sqrt(cin * 3 * 2)
    torch.manual_seed(7)
    torch.empty(cout, cin // groups, *k).uniform_(-stdv, stdv)
    nn.Conv2d(cin, 3 * 6, k)
    expected = torch.empty(cout, cin // groups, *k).uniform_(-stdv, stdv)
    torch.manual_seed(7)
    layer = aecr_ops.ModulatedDeformConv2dPack(cin, cout, k, groups=groups)
    assert torch.equal(layer.weight, expected)
    assert torch.count_nonzero(layer.bias) == 0
    assert torch.count_nonzero(layer.conv_offset.weight) == 0 and torch.count_nonzero(layer.conv_offset.bias) == 0
    assert layer.weight.abs().max() <= stdv and layer.weight.abs().max() > 0.8 * stdv


def test_pack_at_initialisation_is_half_a_convolution():
    layer = aecr_ops.ModulatedDeformConv2dPack(6, 4, 3, padding=1, groups=2, deform_groups=3).double()
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    expected = 0.5 * F.conv2d(x, layer.weight, padding=1, groups=2) + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("groups,deform_groups,stride,padding,dilation", [
    (1, 1, 1, 1, 1), (2, 2, 2, 1, 1), (1, 4, 1, 2, 2), (4, 1, (2, 1), (1, 0), (1, 2))])
def test_pack_forward_is_mmcvs_composition(groups, deform_groups, stride, padding, dilation):
    layer = aecr_ops.ModulatedDeformConv2dPack(4, 8, 3, stride, padding, dilation, groups, deform_groups).double()
    with torch.no_grad():
        layer.conv_offset.weight.normal_(0, 0.3)
        layer.conv_offset.bias.normal_()
        layer.bias.normal_()
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    out = F.conv2d(x, layer.conv_offset.weight, layer.conv_offset.bias, stride, padding, dilation)
    o1, o2, m = torch.chunk(out, 3, dim=1)
    expected = reference.deform_conv2d(x, torch.cat((o1, o2), 1), layer.weight, layer.bias, stride, padding,
                                       dilation, mask=torch.sigmoid(m))
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


def test_dcn_weights_run_unchanged_in_the_pack():
    """CharlesShang's conv_offset_mask and mmcv's conv_offset have the same channel layout."""
    dcn = aecr_ops.DCN(8, 6, 3, stride=1, padding=1, deformable_groups=2).double()
    with torch.no_grad():
        for p in dcn.parameters():
            p.normal_(0, 0.2)
    state = {k.replace("conv_offset_mask.", "conv_offset."): v for k, v in dcn.state_dict().items()}
    pack = aecr_ops.ModulatedDeformConv2dPack(8, 6, 3, stride=1, padding=1, deform_groups=2).double()
    pack.load_state_dict(state, strict=True)
    x = torch.randn(2, 8, 10, 9, dtype=torch.float64)
    assert torch.equal(pack(x), dcn(x))


@pytest.mark.parametrize("version", [None, 1])
def test_pack_converts_mmcvs_version_1_keys(version):
    # Called as mmcv/mmengine's load_state_dict calls it: with the whole, shared state dict. (torch's own
    # load_state_dict hands each child only the keys under its prefix, so there, as with mmcv's layer, the
    # `<name>_offset.*` keys beside the layer are never seen by it.)
    src = aecr_ops.ModulatedDeformConv2dPack(4, 4, 3, padding=1)
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()
    state = {"conv2.weight": src.weight.detach().clone(), "conv2.bias": src.bias.detach().clone(),
             "conv2_offset.weight": src.conv_offset.weight.detach().clone(),
             "conv2_offset.bias": src.conv_offset.bias.detach().clone()}
    dst = aecr_ops.ModulatedDeformConv2dPack(4, 4, 3, padding=1)
    metadata = {} if version is None else {"version": version}
    missing, unexpected, errors = [], [], []
    dst._load_from_state_dict(state, "conv2.", metadata, True, missing, unexpected, errors)
    assert not errors and missing == []      # conv_offset's own keys are loaded by its _load_from_state_dict
    assert set(state) == {"conv2.weight", "conv2.bias", "conv2.conv_offset.weight", "conv2.conv_offset.bias"}
    dst.conv_offset._load_from_state_dict(state, "conv2.conv_offset.", {}, True, missing, unexpected, errors)
    assert not errors and missing == []
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_pack_takes_version_2_keys_as_they_are():
    state = {"conv2.weight": torch.zeros(4, 4, 3, 3), "conv2.bias": torch.zeros(4),
             "conv2_offset.weight": torch.zeros(27, 4, 3, 3), "conv2_offset.bias": torch.zeros(27)}
    dst = aecr_ops.ModulatedDeformConv2dPack(4, 4, 3, padding=1)
    missing, unexpected, errors = [], [], []
    dst._load_from_state_dict(state, "conv2.", {"version": 2}, True, missing, unexpected, errors)
    assert "conv2_offset.weight" in state and "conv2.conv_offset.weight" not in state


def test_pack_state_dict_round_trip_through_a_parent():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), aecr_ops.ModulatedDeformConv2dPack(4, 4, 3, padding=1))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    copy = nn.Sequential(nn.Conv2d(3, 4, 1), aecr_ops.ModulatedDeformConv2dPack(4, 4, 3, padding=1))
    copy.load_state_dict(net.state_dict(), strict=True)
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(copy(x), net(x))


def test_pack_deformable_groups_alias_and_bias_auto():
    with pytest.warns(UserWarning, match="deformable_groups"):
        layer = aecr_ops.ModulatedDeformConv2dPack(4, 4, 3, deformable_groups=2)
    assert layer.deform_groups == 2 and layer.conv_offset.out_channels == 2 * 3 * 9
    with pytest.raises(ArgumentError, match="deform_groups"):
        aecr_ops.ModulatedDeformConv2dPack(4, 4, 3, deform_groups=2, deformable_groups=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert aecr_ops.ModulatedDeformConv2dPack(4, 4, 3, bias="auto").bias is not None
        assert aecr_ops.ModulatedDeformConv2dPack(4, 4, 3, deform_groups=4).deform_groups == 4
    with pytest.raises(ArgumentError, match="bias"):
        aecr_ops.ModulatedDeformConv2dPack(4, 4, 3, bias="yes")


@pytest.mark.parametrize("kwargs,error,words", [
    (dict(in_channels=0), ArgumentError, "in_channels"),
    (dict(groups=3), ArgumentError, "groups"),
    (dict(deform_groups=3), ArgumentError, "deform_groups"),
    (dict(deform_groups=0), ArgumentError, "deform_groups"),
    (dict(kernel_size=(2, 0)), ArgumentError, "kernel_size"),
    (dict(stride=None), ArgumentTypeError, "stride"),
    (dict(padding=-2), ArgumentError, "padding"),
])
def test_pack_constructor_errors_name_the_argument(kwargs, error, words):
    args = dict(in_channels=4, out_channels=4, kernel_size=3)
    args.update(kwargs)
    for cls in (aecr_ops.ModulatedDeformConv2dPack, aecr_ops.MMCVModulatedDeformConv2d):
        with pytest.raises(error, match=words):
            cls(**args)


def test_mmcv_modulated_deform_conv2d_module():
    layer = aecr_ops.MMCVModulatedDeformConv2d(6, 4, (3, 2), stride=1, padding=(1, 0), groups=2,
                                               deform_groups=3).double()
    assert set(layer.state_dict()) == {"weight", "bias"} and torch.count_nonzero(layer.bias) == 0
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    offset = torch.randn(2, 2 * 3 * 6, 7, 6, dtype=torch.float64)
    mask = torch.rand(2, 3 * 6, 7, 6, dtype=torch.float64)
    expected = reference.deform_conv2d(x, offset, layer.weight, layer.bias, padding=(1, 0), mask=mask)
    torch.testing.assert_close(layer(x, offset, mask), expected, rtol=1e-10, atol=1e-10)
    with pytest.raises(ArgumentError, match="offset"):
        layer(x, offset[:, :18], mask)         # 1 offset group's worth, the layer has 3
    with pytest.raises(ArgumentError, match="mask"):
        layer(x, offset, mask[:, :6])


def test_mmcv_modules_cast_like_mmcv():
    """mmcv casts input to offset's dtype, then weight, bias and mask to input's (its fp16/amp support)."""
    layer = aecr_ops.MMCVModulatedDeformConv2d(4, 4, 3, padding=1)          # float32 parameters
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    offset = torch.randn(1, 18, 6, 6, dtype=torch.float64)
    mask = torch.rand(1, 9, 6, 6, dtype=torch.float32)
    out = layer(x, offset, mask)
    assert out.dtype == torch.float64
    expected = reference.deform_conv2d(x, offset, layer.weight.double(), layer.bias.double(), padding=1,
                                       mask=mask.double())
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    out.sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float64


def test_mmcv_compat_names():
    from aecr_ops import mmcv_compat
    assert mmcv_compat.ModulatedDeformConv2dPack is aecr_ops.ModulatedDeformConv2dPack
    assert mmcv_compat.ModulatedDeformConv2d is aecr_ops.MMCVModulatedDeformConv2d
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    w = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    offset = torch.randn(1, 2 * 2 * 9, 4, 4, dtype=torch.float64)
    mask = torch.rand(1, 2 * 9, 4, 4, dtype=torch.float64)
    out = mmcv_compat.modulated_deform_conv2d(x, offset, mask, w, None, 1, 0, 1, 2, 2)
    torch.testing.assert_close(out, reference.deform_conv2d(x, offset, w, mask=mask), rtol=1e-10, atol=1e-10)
    with pytest.raises(ArgumentError, match="groups"):
        mmcv_compat.modulated_deform_conv2d(x, offset, mask, w, None, 1, 0, 1, 1, 2)
    with pytest.raises(ArgumentError, match="offset"):
        mmcv_compat.modulated_deform_conv2d(x, offset, mask, w, None, 1, 0, 1, 2, 1)


def test_exported():
    for name in ("DeformConv2d", "ModulatedDeformConv2dPack", "MMCVModulatedDeformConv2d"):
        assert name in aecr_ops.__all__ and getattr(aecr_ops, name).__module__ == "aecr_ops.modules"


def test_pack_trains():
    torch.manual_seed(0)
    layer = aecr_ops.ModulatedDeformConv2dPack(3, 3, 3, padding=1)
    target = aecr_ops.ModulatedDeformConv2dPack(3, 3, 3, padding=1)
    with torch.no_grad():
        target.conv_offset.weight.normal_(0, 0.2)
    first, last = fit_to_a_target(layer, target)
    assert last < 0.2 * first
    assert layer.conv_offset.weight.grad.abs().sum() > 0
