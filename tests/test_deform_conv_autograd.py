"""Layers 2 and 3: gradcheck, torch.library.opcheck, torch.compile, double backward."""
import pytest
import torch

import aecr_ops
from dcn_cases import NAMED_CASES, Case

GRADCHECK_CASES = ["3x3_pad1_mask", "no_mask_no_bias", "both_groups", "non_square", "stride2", "dilation2"]


def small(case: Case) -> Case:
    return Case(**{**case.__dict__, "batch": min(case.batch, 2), "offset_scale": 1.5})


@pytest.mark.parametrize("name", GRADCHECK_CASES)
def test_gradcheck(name):
    case = small(NAMED_CASES[name])
    x, o, w, b, m = case.tensors(seed=3)
    # Offsets away from integers: bilinear sampling has kinks on the pixel grid.
    o = o + 0.25 * (o.frac().abs() < 0.02).to(o.dtype)
    leaves = [t.requires_grad_(True) for t in (x, o, w, b, m) if t is not None]

    def fn(*args):
        it = iter(args)
        xx, oo, ww = next(it), next(it), next(it)
        bb = next(it) if b is not None else None
        mm = next(it) if m is not None else None
        return aecr_ops.deform_conv2d(xx, oo, ww, bb, mask=mm, **case.kwargs())

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


def op_args(case: Case, requires_grad: bool):
    x, o, w, b, m = case.tensors(seed=5)
    if requires_grad:
        for t in (x, o, w, b, m):
            if t is not None:
                t.requires_grad_(True)
    groups = case.in_channels // w.shape[1]
    return (x, w, o, m, b, list(case.stride), list(case.padding), list(case.dilation), groups, case.offset_groups)


@pytest.mark.parametrize("name", ["3x3_pad1_mask", "no_mask_no_bias", "both_groups", "non_square"])
@pytest.mark.parametrize("requires_grad", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck(name, requires_grad, dtype):
    case = small(NAMED_CASES[name])
    args = op_args(case, requires_grad)
    args = tuple(a.detach().to(dtype).requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                 for a in args)
    torch.library.opcheck(torch.ops.aecr_ops.deform_conv2d.default, args)


def test_opcheck_backward_op():
    case = small(NAMED_CASES["3x3_pad1_mask"])
    x, w, o, m, b, *rest = op_args(case, False)
    grad = torch.randn(case.batch, case.out_channels, *case.out_size(), dtype=torch.float64)
    torch.library.opcheck(torch.ops.aecr_ops.deform_conv2d_backward.default, (grad, x, w, o, m, *rest),
                          test_utils=("test_schema", "test_faketensor"))


def test_double_backward_is_a_clear_error():
    case = small(NAMED_CASES["3x3_pad1_mask"])
    x, o, w, b, m = case.tensors()
    x.requires_grad_(True)
    w.requires_grad_(True)
    out = aecr_ops.deform_conv2d(x, o, w, b, mask=m, **case.kwargs())
    (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


class TinyDCNNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.dcn = aecr_ops.DCN(8, 8, 3, 1, 1)
        with torch.no_grad():  # non-zero offsets, so the deformable path is really exercised
            self.dcn.conv_offset_mask.weight.normal_(0, 0.1)
            self.dcn.conv_offset_mask.bias.normal_(0, 0.5)

    def forward(self, x):
        return self.dcn(torch.relu(self.conv(x))).sum(dim=1)


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = TinyDCNNet()
    x = torch.randn(2, 3, 12, 12)
    eager_out = model(x)
    eager_out.square().mean().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.square().mean().backward()
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager():
    torch._dynamo.reset()
    model = TinyDCNNet()
    x = torch.randn(1, 3, 10, 10, requires_grad=True)
    eager_out = model(x)
    (gx_eager,) = torch.autograd.grad(eager_out.sum(), x)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    (gx,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_eager, rtol=1e-4, atol=1e-5)


def test_autocast_cpu_runs_in_float32():
    layer = aecr_ops.DCN(4, 4, 3, 1, 1)
    x = torch.randn(1, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.nn.functional.conv2d(x, torch.randn(4, 4, 1, 1)))  # bf16 activations in
    assert y.dtype == torch.float32
