"""Layer 5: malformed calls raise Python exceptions whose messages name the argument; nothing crashes."""
import pytest
import torch

import aecr_ops


def good():
    return dict(input=torch.randn(2, 4, 8, 8), offset=torch.randn(2, 18, 8, 8), weight=torch.randn(6, 4, 3, 3),
                bias=torch.randn(6), mask=torch.rand(2, 9, 8, 8), padding=1)


def call(**changes):
    kwargs = good()
    kwargs.update(changes)
    return aecr_ops.deform_conv2d(**kwargs)


def test_good_call_works():
    assert call().shape == (2, 6, 8, 8)


@pytest.mark.parametrize("changes,exc,words", [
    (dict(offset=torch.randn(2, 17, 8, 8)), ValueError, "offset"),
    (dict(offset=torch.randn(2, 18, 7, 8)), ValueError, "offset"),
    (dict(offset=torch.randn(3, 18, 8, 8)), ValueError, "offset"),
    (dict(offset=torch.randn(2, 18 * 3, 8, 8)), ValueError, "offset"),  # 3 offset groups do not divide 4 channels
    (dict(mask=torch.rand(2, 8, 8, 8)), ValueError, "mask"),
    (dict(mask=torch.rand(2, 9, 8, 7)), ValueError, "mask"),
    (dict(weight=torch.randn(6, 3, 3, 3)), ValueError, "weight"),
    (dict(weight=torch.randn(5, 2, 3, 3)), ValueError, "output channels"),
    (dict(weight=torch.randn(6, 4, 3)), ValueError, "weight"),
    (dict(weight=torch.randn(6, 4, 0, 3)), ValueError, "weight"),
    (dict(bias=torch.randn(5)), ValueError, "bias"),
    (dict(bias=torch.randn(6, 1)), ValueError, "bias"),
    (dict(input=torch.randn(4, 8, 8)), ValueError, "input"),
    (dict(input=torch.randn(2, 4, 8, 8, 1)), ValueError, "input"),
    (dict(offset=torch.randn(2, 18, 8)), ValueError, "offset"),
    (dict(stride=0), ValueError, "stride"),
    (dict(stride=(1, -1)), ValueError, "stride"),
    (dict(padding=-1), ValueError, "padding"),
    (dict(dilation=0), ValueError, "dilation"),
    (dict(stride=(1, 2, 3)), TypeError, "stride"),
    (dict(stride=1.5), TypeError, "stride"),
    (dict(padding="1"), TypeError, "padding"),
    (dict(input=torch.randn(2, 4, 2, 2), padding=0), ValueError, "empty"),
    (dict(offset=torch.randn(2, 18, 8, 8, dtype=torch.float64)), TypeError, "offset"),
    (dict(mask=torch.rand(2, 9, 8, 8, dtype=torch.float64)), TypeError, "mask"),
    (dict(bias=torch.randn(6, dtype=torch.float64)), TypeError, "bias"),
    (dict(input=torch.randint(0, 5, (2, 4, 8, 8))), TypeError, "input"),
    (dict(input=torch.randn(2, 4, 8, 8).half(), offset=torch.randn(2, 18, 8, 8).half(),
          weight=torch.randn(6, 4, 3, 3).half(), bias=None, mask=None), TypeError, "CPU"),
    (dict(input=[[1.0]]), TypeError, "input"),
    (dict(offset=None), TypeError, "offset"),
])
def test_bad_arguments(changes, exc, words):
    with pytest.raises(exc, match=words):
        call(**changes)


def test_errors_are_also_runtime_errors_like_torchvision():
    with pytest.raises(RuntimeError):
        call(offset=torch.randn(2, 17, 8, 8))
    with pytest.raises(RuntimeError):
        call(bias=torch.randn(6, dtype=torch.float64))


def test_integer_tensors_everywhere():
    ints = dict(input=torch.ones(2, 4, 8, 8, dtype=torch.long), offset=torch.zeros(2, 18, 8, 8, dtype=torch.long),
                weight=torch.ones(6, 4, 3, 3, dtype=torch.long), bias=None, mask=None)
    with pytest.raises(TypeError, match="floating"):
        call(**ints)


@pytest.mark.parametrize("changes,words", [
    (dict(offset=torch.randn(2, 17, 8, 8)), "offset"),
    (dict(mask=torch.rand(2, 9, 8, 7)), "mask"),
    (dict(weight=torch.randn(6, 3, 3, 3)), "weight"),
    (dict(bias=torch.randn(5)), "bias"),
    (dict(stride=[0, 1]), "stride"),
    (dict(padding=[-1, 0]), "padding"),
    (dict(input=torch.randint(0, 5, (2, 4, 8, 8))), "input"),
    (dict(offset=torch.randn(2, 18, 8, 8, dtype=torch.float64)), "offset"),
])
def test_the_raw_op_checks_too(changes, words):
    # torch.ops.aecr_ops.* bypasses the Python checks: the C++ checks must stop the call before any kernel runs.
    kw = good()
    kw["stride"], kw["padding"], kw["dilation"] = [1, 1], [1, 1], [1, 1]
    kw.update(changes)
    with pytest.raises(RuntimeError, match=words):
        torch.ops.aecr_ops.deform_conv2d(kw["input"], kw["weight"], kw["offset"], kw["mask"], kw["bias"],
                                         kw["stride"], kw["padding"], kw["dilation"], 1, 1)


def test_raw_backward_checks_grad_output():
    kw = good()
    with pytest.raises(RuntimeError, match="grad_output"):
        torch.ops.aecr_ops.deform_conv2d_backward(torch.randn(2, 6, 8, 7), kw["input"], kw["weight"], kw["offset"],
                                                  kw["mask"], [1, 1], [1, 1], [1, 1], 1, 1)


def test_raw_op_rejects_inconsistent_groups():
    kw = good()
    with pytest.raises(RuntimeError, match="groups"):
        torch.ops.aecr_ops.deform_conv2d(kw["input"], kw["weight"], kw["offset"], kw["mask"], kw["bias"],
                                         [1, 1], [1, 1], [1, 1], 3, 1)
    with pytest.raises(RuntimeError, match="offset"):
        torch.ops.aecr_ops.deform_conv2d(kw["input"], kw["weight"], kw["offset"], kw["mask"], kw["bias"],
                                         [1, 1], [1, 1], [1, 1], 1, 2)


def test_module_argument_errors():
    with pytest.raises(ValueError, match="deformable_groups"):
        aecr_ops.DCN(4, 4, 3, 1, 1, deformable_groups=3)
    with pytest.raises(ValueError, match="in_channels"):
        aecr_ops.DCN(0, 4, 3, 1, 1)
    with pytest.raises(ValueError, match="stride"):
        aecr_ops.DCN(4, 4, 3, 0, 1)
    with pytest.raises(ValueError, match="groups"):
        aecr_ops.ModulatedDeformConv2d(4, 6, 3, groups=4)
    layer = aecr_ops.ModulatedDeformConv2d(4, 6, 3, padding=1, deformable_groups=2)
    with pytest.raises(ValueError, match="offset"):
        layer(torch.randn(1, 4, 8, 8), torch.randn(1, 18, 8, 8))


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
def test_float32_geometry_is_accepted_beside_low_precision_features(low):
    # Checked on the meta device (CUDA is where fp16 / bf16 run): offset and mask may be float32, as torchvision
    # and autocast keep them; any other dtype mix is an error naming the tensor.
    x = torch.empty(1, 4, 6, 6, device="meta", dtype=low)
    w = torch.empty(4, 4, 3, 3, device="meta", dtype=low)
    offset = torch.empty(1, 18, 6, 6, device="meta", dtype=torch.float32)
    mask = torch.empty(1, 9, 6, 6, device="meta", dtype=torch.float32)
    out = aecr_ops.deform_conv2d(x, offset, w, padding=1, mask=mask)
    assert out.dtype == low and out.shape == (1, 4, 6, 6)
    with pytest.raises(TypeError, match="`offset`"):
        aecr_ops.deform_conv2d(x, offset.double(), w, padding=1, mask=mask)
    with pytest.raises(TypeError, match="`weight`"):
        aecr_ops.deform_conv2d(x, offset, w.float(), padding=1, mask=mask)
