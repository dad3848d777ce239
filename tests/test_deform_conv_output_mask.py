"""deform_conv2d_backward's output mask: only the gradients asked for are computed (CPU), the others are empty,
and autograd asks for exactly the gradients it needs."""
import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import aecr_ops
from aecr_ops import reference
from dcn_cases import NAMED_CASES, Case

NAMES = ["input", "weight", "offset", "mask", "bias"]
ALL_MASKS = list(itertools.product([False, True], repeat=5))


def op_problem(case: Case, seed=1):
    x, o, w, b, m = case.tensors(seed=seed)
    groups = case.in_channels // w.shape[1]
    geometry = (list(case.stride), list(case.padding), list(case.dilation), groups, case.offset_groups)
    grad = torch.randn(case.batch, case.out_channels, *case.out_size(), generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)
    return grad, x, w, o, m, geometry


@pytest.mark.parametrize("name", ["3x3_pad1_mask", "both_groups", "no_mask_no_bias"])
def test_every_output_mask_gives_the_full_backward_values_for_what_it_asks(name):
    grad, x, w, o, m, geometry = op_problem(NAMED_CASES[name])
    full = torch.ops.aecr_ops.deform_conv2d_backward(grad, x, w, o, m, *geometry)
    for output_mask in ALL_MASKS:
        got = torch.ops.aecr_ops.deform_conv2d_backward(grad, x, w, o, m, *geometry, list(output_mask))
        for label, wanted, g, f in zip(NAMES, output_mask, got, full):
            if wanted and not (label == "mask" and m is None):
                torch.testing.assert_close(g, f, rtol=1e-12, atol=1e-12, msg=f"{label} with {output_mask}")
            else:
                assert g.numel() == 0, f"{label} computed though {output_mask} does not ask for it"


class BackwardMasks(TorchDispatchMode):
    """Records the output_mask of every deform_conv2d_backward call."""

    def __init__(self):
        super().__init__()
        self.masks = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aecr_ops.deform_conv2d_backward.default:
            self.masks.append(tuple(args[10]) if len(args) > 10 else tuple((kwargs or {})["output_mask"]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("requires", [(False, True, True, True, True), (True, False, True, True, True),
                                      (False, True, False, False, False), (True, False, False, False, False),
                                      (True, True, False, True, False), (False, False, True, False, False)])
def test_autograd_asks_only_for_what_requires_grad_and_gets_the_right_values(requires):
    # A first layer (no input gradient), frozen weights and bias, constant offsets or mask.
    case = NAMED_CASES["3x3_pad1_mask"]
    x, o, w, b, m = case.tensors(seed=2)
    leaves = [t.clone().requires_grad_(r) for t, r in zip((x, w, o, m, b), requires)]
    xx, ww, oo, mm, bb = leaves
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, w, o, m, b)]
    rx, rw, ro, rm, rb = ref_leaves
    expected = torch.autograd.grad(reference.deform_conv2d(rx, ro, rw, rb, mask=rm, **case.kwargs()).square().sum(),
                                   ref_leaves)
    with BackwardMasks() as spy:
        aecr_ops.deform_conv2d(xx, oo, ww, bb, mask=mm, **case.kwargs()).square().sum().backward()
    assert spy.masks == [requires]
    for label, leaf, e in zip(NAMES, leaves, expected):
        if leaf.requires_grad:
            torch.testing.assert_close(leaf.grad, e, msg=label)
        else:
            assert leaf.grad is None, label


def test_no_mask_and_no_bias_are_never_asked_for():
    case = NAMED_CASES["no_mask_no_bias"]
    x, o, w, _, _ = case.tensors(seed=2)
    x.requires_grad_(True)
    with BackwardMasks() as spy:
        aecr_ops.deform_conv2d(x, o, w, **case.kwargs()).sum().backward()
    assert spy.masks == [(True, False, False, False, False)]


@pytest.mark.parametrize("output_mask", [(True, False, False, False, False), (False, True, False, False, True),
                                         (False, False, True, True, False), (False,) * 5])
def test_opcheck_masked_backward(output_mask):
    grad, x, w, o, m, geometry = op_problem(NAMED_CASES["both_groups"])
    torch.library.opcheck(torch.ops.aecr_ops.deform_conv2d_backward.default,
                          (grad, x, w, o, m, *geometry, list(output_mask)),
                          test_utils=("test_schema", "test_faketensor"))


def test_masked_backward_under_torch_compile():
    case = NAMED_CASES["3x3_pad1_mask"]
    x, o, w, b, m = case.tensors(seed=4)
    w.requires_grad_(True)  # a layer whose only trainable parameter is its weight

    def step(x, o, w, b, m):
        return aecr_ops.deform_conv2d(x, o, w, b, mask=m, **case.kwargs()).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    (grad_compiled,) = torch.autograd.grad(compiled(x, o, w, b, m), [w])
    (grad_eager,) = torch.autograd.grad(step(x, o, w, b, m), [w])
    torch.testing.assert_close(grad_compiled, grad_eager)


def test_output_mask_of_the_wrong_length_is_an_error():
    grad, x, w, o, m, geometry = op_problem(NAMED_CASES["3x3_pad1_mask"])
    with pytest.raises(RuntimeError, match="output_mask"):
        torch.ops.aecr_ops.deform_conv2d_backward(grad, x, w, o, m, *geometry, [True, False])
