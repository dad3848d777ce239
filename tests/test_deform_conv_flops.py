"""aecr_ops.flops: FlopCounterMode counts the aecr ops by the documented formulas, and the dense part of the
deformable convolution is what torch.utils.flop_counter itself counts for the same convolution."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

import aecr_ops
import aecr_ops.flops as aecr_flops

DCN = torch.ops.aecr_ops.deform_conv2d
DCN_BACKWARD = torch.ops.aecr_ops.deform_conv2d_backward

# (batch, C_in, C_out, H, W, kernel, stride, padding, dilation, groups, offset_groups, mask, bias)
CASES = {
    "aecr-like": (1, 16, 16, 9, 11, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, True, True),
    "batch-2": (2, 8, 4, 7, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, True, True),
    "groups": (1, 8, 12, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 4, 1, True, True),
    "offset-groups": (1, 8, 6, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, 2, True, True),
    "stride": (2, 6, 5, 11, 9, (3, 3), (2, 3), (1, 0), (1, 1), 1, 1, True, True),
    "dilation": (1, 4, 4, 12, 10, (3, 3), (1, 1), (2, 2), (2, 3), 1, 1, True, True),
    "no-mask": (1, 6, 4, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, False, True),
    "no-bias": (1, 6, 4, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, True, False),
    "dcnv1-plain": (1, 6, 4, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, False, False),
    "rect-kernel": (1, 4, 6, 9, 8, (2, 3), (1, 1), (0, 1), (1, 1), 2, 2, True, True),
}


def make(case, requires_grad=False):
    b, c_in, c_out, h, w, k, s, p, d, groups, og, with_mask, with_bias = case
    ho = (h + 2 * p[0] - (d[0] * (k[0] - 1) + 1)) // s[0] + 1
    wo = (w + 2 * p[1] - (d[1] * (k[1] - 1) + 1)) // s[1] + 1
    taps = k[0] * k[1]
    tensors = dict(
        input=torch.randn(b, c_in, h, w), weight=torch.randn(c_out, c_in // groups, *k),
        offset=torch.randn(b, 2 * og * taps, ho, wo), mask=torch.rand(b, og * taps, ho, wo) if with_mask else None,
        bias=torch.randn(c_out) if with_bias else None)
    for t in tensors.values():
        if t is not None:
            t.requires_grad_(requires_grad)
    return tensors, dict(stride=s, padding=p, dilation=d, groups=groups, offset_groups=og)


def run_dcn(t, cfg):
    return aecr_ops.deform_conv2d(t["input"], t["offset"], t["weight"], t["bias"], cfg["stride"], cfg["padding"],
                                  cfg["dilation"], t["mask"])


def formula(t, cfg, fn=aecr_flops.deform_conv2d_flops):
    return fn(t["input"].shape, t["weight"].shape, t["offset"].shape, t["mask"] is not None, t["bias"] is not None,
              cfg["stride"], cfg["padding"], cfg["dilation"], cfg["groups"], cfg["offset_groups"])


def counted(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_counted_by_the_formula(name):
    t, cfg = make(CASES[name])
    counts = counted(lambda: run_dcn(t, cfg))
    assert counts == {"aecr_ops.deform_conv2d": formula(t, cfg)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_dense_part_is_flop_counters_conv(name):
    """The "2 x dense conv" part against torch's own formula for F.conv2d of the same shapes, not against ours."""
    t, cfg = make(CASES[name])
    counts = counted(lambda: F.conv2d(t["input"], t["weight"], t["bias"], cfg["stride"], cfg["padding"],
                                      cfg["dilation"], cfg["groups"]))
    parts = formula(t, cfg, aecr_flops.deform_conv2d_flop_breakdown)
    assert parts["conv"] == counts["aten.convolution"]
    assert sum(parts.values()) == formula(t, cfg)


def test_parts_by_hand():
    """One case written out: B=2, C_in=8, C_out=4, 7x6 in, 3x3, padding 1: 7x6 out, 42 pixels, 9 taps."""
    t, cfg = make(CASES["batch-2"])
    samples = 2 * 8 * 9 * 42  # 6048 sampled values
    points = 2 * 1 * 9 * 42   # 756 sampling points
    assert formula(t, cfg, aecr_flops.deform_conv2d_flop_breakdown) == {
        "conv": 2 * 2 * 4 * 8 * 9 * 42,        # 48384
        "bilinear": 7 * samples,               # 4 multiplies + 3 adds each
        "sampling_points": 10 * points,
        "modulation": samples,
        "bias": 2 * 4 * 42,
    }
    assert formula(t, cfg) == 48384 + 7 * 6048 + 10 * 756 + 6048 + 336 == 104664


def test_no_mask_no_bias_drop_their_parts():
    with_both, cfg = make(CASES["no-bias"][:11] + (True, True))
    plain, _ = make(CASES["dcnv1-plain"])
    a = formula(with_both, cfg, aecr_flops.deform_conv2d_flop_breakdown)
    b = formula(plain, cfg, aecr_flops.deform_conv2d_flop_breakdown)
    assert b["modulation"] == 0 and b["bias"] == 0 and a["modulation"] > 0 and a["bias"] > 0
    assert {k: v for k, v in a.items() if k not in ("modulation", "bias")} == \
        {k: v for k, v in b.items() if k not in ("modulation", "bias")}


def test_offset_groups_share_points_not_samples():
    one, cfg1 = make(CASES["offset-groups"][:10] + (1,) + CASES["offset-groups"][11:])
    two, cfg2 = make(CASES["offset-groups"])
    p1 = formula(one, cfg1, aecr_flops.deform_conv2d_flop_breakdown)
    p2 = formula(two, cfg2, aecr_flops.deform_conv2d_flop_breakdown)
    assert p2["sampling_points"] == 2 * p1["sampling_points"]
    assert p2["bilinear"] == p1["bilinear"] and p2["conv"] == p1["conv"]


def test_formula_checks_the_offset_shape():
    with pytest.raises(ValueError, match="offset shape"):
        aecr_flops.deform_conv2d_flops((1, 8, 8, 8), (4, 8, 3, 3), (1, 18, 7, 8), True, True, 1, 1, 1, 1, 1)


GRADS = ("input", "weight", "offset", "mask", "bias")


@pytest.mark.parametrize("name", ["aecr-like", "groups", "offset-groups", "stride", "no-mask", "dcnv1-plain"])
@pytest.mark.parametrize("wanted", [GRADS, ("weight",), ("input",), ("offset", "mask"), ("weight", "bias"),
                                    ("input", "weight", "bias")])
def test_backward_counts_only_the_gradients_asked_for(name, wanted):
    t, cfg = make(CASES[name])
    for key in wanted:
        if t[key] is not None:
            t[key].requires_grad_(True)
    if not any(v is not None and v.requires_grad for v in t.values()):
        pytest.skip("nothing to differentiate")
    out = run_dcn(t, cfg)
    grad = torch.randn_like(out)
    counts = counted(lambda: out.backward(grad))
    output_mask = [t[k] is not None and t[k].requires_grad for k in GRADS]
    expected = aecr_flops.deform_conv2d_backward_flops(
        t["input"].shape, t["weight"].shape, t["offset"].shape, t["mask"] is not None, cfg["stride"],
        cfg["padding"], cfg["dilation"], cfg["groups"], cfg["offset_groups"], output_mask)
    assert counts == {"aecr_ops.deform_conv2d_backward": expected}


def test_backward_parts_follow_output_mask():
    t, cfg = make(CASES["aecr-like"])
    args = (t["input"].shape, t["weight"].shape, t["offset"].shape, True, cfg["stride"], cfg["padding"],
            cfg["dilation"], cfg["groups"], cfg["offset_groups"])
    full = aecr_flops.deform_conv2d_backward_flop_breakdown(*args)
    conv = aecr_flops.deform_conv2d_flop_breakdown(t["input"].shape, t["weight"].shape, t["offset"].shape, True,
                                                   True, *args[4:])["conv"]
    assert full["column_grad"] == conv and full["grad_weight"] > conv and all(full.values())
    only_bias = aecr_flops.deform_conv2d_backward_flop_breakdown(*args, output_mask=(False,) * 4 + (True,))
    assert only_bias == {**{k: 0 for k in full}, "grad_bias": full["grad_bias"]}
    only_weight = aecr_flops.deform_conv2d_backward_flop_breakdown(*args, output_mask=(False, True, False, False,
                                                                                        False))
    assert only_weight["column_grad"] == 0 and only_weight["grad_weight"] == full["grad_weight"]
    no_mask = aecr_flops.deform_conv2d_backward_flop_breakdown(*args[:3], False, *args[4:])
    assert no_mask["grad_mask"] == 0


def test_backward_op_called_directly_with_and_without_output_mask():
    t, cfg = make(CASES["offset-groups"])
    out = run_dcn(t, cfg)
    grad = torch.randn_like(out)
    call = (grad, t["input"], t["weight"], t["offset"], t["mask"], list(cfg["stride"]), list(cfg["padding"]),
            list(cfg["dilation"]), cfg["groups"], cfg["offset_groups"])
    shapes = (t["input"].shape, t["weight"].shape, t["offset"].shape, True, cfg["stride"], cfg["padding"],
              cfg["dilation"], cfg["groups"], cfg["offset_groups"])
    assert counted(lambda: DCN_BACKWARD(*call)) == {
        "aecr_ops.deform_conv2d_backward": aecr_flops.deform_conv2d_backward_flops(*shapes)}
    mask = [False, False, True, False, True]
    assert counted(lambda: DCN_BACKWARD(*call, mask)) == {
        "aecr_ops.deform_conv2d_backward": aecr_flops.deform_conv2d_backward_flops(*shapes, output_mask=mask)}


def test_module_counted_with_its_offset_conv():
    """aecr_ops.DCN: the offset/mask predictor is an nn.Conv2d, counted by torch; the deformable part by ours."""
    layer = aecr_ops.DCN(8, 8, kernel_size=3, stride=1, padding=1)
    x = torch.randn(1, 8, 10, 10)
    counts = counted(lambda: layer(x))
    assert counts["aten.convolution"] == 2 * 27 * 8 * 9 * 100
    assert counts["aecr_ops.deform_conv2d"] == aecr_flops.deform_conv2d_flops(
        (1, 8, 10, 10), (8, 8, 3, 3), (1, 18, 10, 10), True, True, 1, 1, 1, 1, 1)


def test_registration_is_idempotent_and_leaves_others_formulas():
    assert aecr_flops.register_flop_formulas() and aecr_flops.register_flop_formulas()
    importlib.reload(aecr_flops)  # registers again on import
    t, cfg = make(CASES["aecr-like"])
    assert counted(lambda: run_dcn(t, cfg)) == {"aecr_ops.deform_conv2d": formula(t, cfg)}

    def theirs(*args, out_shape=None, **kwargs):
        return 1

    packet = torch.ops.aecr_ops.isqrt_newton_schulz
    ours = flop_counter.flop_registry.pop(packet)
    try:
        flop_counter.register_flop_formula(packet)(theirs)
        aecr_flops.register_flop_formulas()
        assert getattr(flop_counter.flop_registry[packet], "__wrapped__", None) is theirs
    finally:
        flop_counter.flop_registry[packet] = ours


# ---- FastDeconv ops -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, kernel, stride, block, groups", [
    ((1, 3, 32, 32), (3, 3), 3, 3, 1),    # AECR-Net's FastDeconv: F = 27, M = 11 * 11 patches
    ((2, 8, 12, 10), (3, 3), 2, 4, 1),    # two interleaved blocks of 4 channels
    ((2, 8, 12, 10), (3, 3), 1, 2, 4),    # grouped
    ((2, 6, 7, 9), (1, 1), 3, 6, 1),      # 1x1: every 9th pixel of the flattened N*H*W grid
])
def test_patch_statistics_counted(shape, kernel, stride, block, groups):
    x = torch.randn(*shape)
    padding = (kernel[0] // 2, kernel[1] // 2)
    counts = counted(lambda: aecr_ops.patch_statistics(x, kernel, 1, padding, stride, block, groups))
    assert counts == {"aecr_ops.patch_statistics": aecr_flops.patch_statistics_flops(
        shape, kernel, (1, 1), padding, stride, block, groups)}


def test_patch_statistics_by_hand():
    """AECR-Net's FastDeconv on a 32x32 image: 3x3 patches every 3 pixels, 11 x 11 = 121 rows of 27 features."""
    m, f = 121, 27
    assert aecr_flops.patch_statistics_flops((1, 3, 32, 32), 3, 1, 1, 3, 3, 1) == \
        2 * m * f + 2 * m * f * f + 2 * f * f
    # 1x1 kernel: ceil(2*7*9 / 9) = 14 rows of 6 features
    assert aecr_flops.patch_statistics_flops((2, 6, 7, 9), 1, 1, 0, 3, 6, 1) == 2 * 14 * 6 + 2 * 14 * 36 + 2 * 36


@pytest.mark.parametrize("f", [5, 27, 60])  # 60 > 48: the spectral form, counted as the iteration
def test_isqrt_counted_forward_and_backward(f):
    a = torch.randn(2, f, 2 * f)
    a = (a @ a.transpose(1, 2) / (2 * f) + torch.eye(f)).requires_grad_(True)
    counts = counted(lambda: aecr_ops.isqrt_newton_schulz(a, 5))
    assert counts == {"aecr_ops.isqrt_newton_schulz": 2 * (5 * (6 * f ** 3 + 2 * f * f) + 4 * f * f)}
    out = aecr_ops.isqrt_newton_schulz(a, 5)
    counts = counted(lambda: out.sum().backward())
    assert counts == {"aecr_ops.isqrt_newton_schulz_backward":
                      aecr_flops.isqrt_newton_schulz_backward_flops(a.shape, 5)}


def test_fastdeconv_layer_training_counts_its_statistics():
    layer = aecr_ops.FastDeconv(3, 3, kernel_size=3, stride=1, padding=1).train()
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    counts = counted(lambda: layer(x).sum().backward())
    assert counts["aecr_ops.patch_statistics"] == aecr_flops.patch_statistics_flops((1, 3, 32, 32), 3, 1, 1, 3, 3, 1)
    assert counts["aecr_ops.patch_statistics_backward"] == aecr_flops.patch_statistics_backward_flops(
        (1, 3, 32, 32), 3, 1, 1, 3, 3, 1)
    assert counts["aecr_ops.isqrt_newton_schulz"] == aecr_flops.isqrt_newton_schulz_flops((1, 27, 27), 5)
