"""The implicit-GEMM CUDA path of deform_conv2d (AECR_DCN_CUDA_PATH=implicit) against the float64 reference and
the simple path. It takes fp16, bf16 and fp32 with TF32 allowed; everything else falls back to the simple path.

Every test here is marked `cuda` and skips without a GPU (and without the CUDA kernels).
"""
import pytest
import torch

import aecr_ops
from aecr_ops import reference
from dcn_cases import NAMED_CASES, Case, random_cases

pytestmark = pytest.mark.cuda

NAMES = ["out", "input", "offset", "weight", "bias", "mask"]

# Cases bigger than one 64 x 64 tile: channel counts that are not multiples of 32 or 64, several pixel tiles,
# conv groups and offset groups whose channel runs straddle tiles.
WIDE_CASES = {
    "wide_3x3": Case(3, 72, 70, (11, 13), (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, True, True),
    "wide_groups": Case(2, 96, 64, (9, 10), (3, 3), (1, 1), (1, 1), (1, 1), 2, 3, True, True),
    "wide_stride2_nomask": Case(2, 40, 130, (15, 12), (3, 3), (2, 2), (1, 1), (1, 1), 1, 2, False, False),
    "wide_1x1": Case(2, 130, 33, (8, 8), (1, 1), (1, 1), (0, 0), (1, 1), 1, 1, True, True),
}


@pytest.fixture
def cuda_path(monkeypatch):
    """Switches the CUDA path: cuda_path("implicit") or cuda_path("simple"). TF32 matmuls on for the test."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True

    def use(name):
        monkeypatch.setenv("AECR_DCN_CUDA_PATH", name)
    yield use
    torch.backends.cuda.matmul.allow_tf32 = previous


def grads(case, tensors, fn=aecr_ops.deform_conv2d, seed=11):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]
    x, o, w, b, m = leaves
    out = fn(x, o, w, b, mask=m, **case.kwargs())
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    gs = torch.autograd.grad((out * r.to(out)).sum(), [t for t in leaves if t is not None])
    return [out.detach()] + list(gs)


def all_cases():
    cases = {**NAMED_CASES, **WIDE_CASES}
    cases.update({f"random_{i}": c for i, c in enumerate(random_cases(6, seed=7))})
    return cases


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(all_cases()))
def test_implicit_error_is_within_twice_the_simple_paths(cuda_path, name, dtype):
    case = all_cases()[name]
    low = [t.cuda().to(dtype) if t is not None else None for t in case.tensors(seed=3)]
    exact = grads(case, [t.double() if t is not None else None for t in low], fn=reference.deform_conv2d)
    cuda_path("simple")
    simple = grads(case, low)
    cuda_path("implicit")
    got = grads(case, low)
    for label, a, s, e in zip(NAMES, got, simple, exact):
        assert a.dtype == dtype and a.shape == e.shape and a.is_contiguous()
        err = (a.double() - e).abs().max().item()
        simple_err = (s.double() - e).abs().max().item()
        scale = e.abs().max().item() + 1e-12
        assert err <= 2.0 * simple_err + 2e-3 * scale, f"{label}: implicit error {err}, simple {simple_err}"


def test_the_variable_switches_the_path(cuda_path):
    case = WIDE_CASES["wide_3x3"]
    tensors = [t.cuda().float() if t is not None else None for t in case.tensors(seed=5)]
    cuda_path("simple")
    simple = grads(case, tensors)
    cuda_path("implicit")
    implicit = grads(case, tensors)
    # Different summation orders: equal values would mean the same kernels ran.
    assert not torch.equal(simple[0], implicit[0])
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 without TF32: the implicit path does not apply
    cuda_path("simple")
    ieee_simple = grads(case, tensors)
    cuda_path("implicit")
    ieee_implicit = grads(case, tensors)
    for a, b in zip(ieee_simple, ieee_implicit):
        assert torch.equal(a, b)


def test_unknown_path_is_an_error_that_names_the_variable(cuda_path):
    case = NAMED_CASES["3x3_pad1_mask"]
    x, o, w, b, m = [t.cuda().half() if t is not None else None for t in case.tensors()]
    cuda_path("fastest")
    with pytest.raises(RuntimeError, match="AECR_DCN_CUDA_PATH"):
        aecr_ops.deform_conv2d(x, o, w, b, mask=m, **case.kwargs())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_implicit_deterministic_backward_is_bitwise_reproducible(cuda_path, dtype):
    case = Case(3, 80, 48, (20, 22), (3, 3), (1, 1), (1, 1), (1, 1), 1, 2, True, True, offset_scale=3.0)
    tensors = [t.cuda().to(dtype) if t is not None else None for t in case.tensors(seed=4)]
    cuda_path("implicit")
    default = grads(case, tensors)
    torch.use_deterministic_algorithms(True)
    try:
        first = grads(case, tensors)
        for _ in range(2):
            for a, b in zip(first, grads(case, tensors)):
                assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(False)
    tol = 1e-2 if dtype == torch.float32 else 5e-2
    for label, a, b in zip(NAMES, first, default):
        scale = b.abs().max().item() + 1e-12
        assert (a - b).abs().max().item() <= tol * scale, label


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_implicit_at_the_aecr_net_layer_shape(cuda_path, dtype):
    # The DCN layer of AECR-Net (256 -> 256, 3x3, pad 1, mask) at a smaller batch and size.
    case = Case(2, 256, 256, (24, 24), (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, True, True, offset_scale=1.0)
    tensors = [t.cuda().to(dtype) if t is not None else None for t in case.tensors(seed=8)]
    exact = grads(case, [t.double() if t is not None else None for t in tensors])  # simple path in float64
    cuda_path("implicit")
    got = grads(case, tensors)
    tol = 5e-3 if dtype == torch.float32 else 3e-2
    for label, a, e in zip(NAMES, got, exact):
        rel = ((a.double() - e).norm() / e.norm()).item()
        assert rel <= tol, f"{label}: relative error {rel}"


def test_implicit_with_channels_last_and_non_contiguous_inputs(cuda_path):
    case = WIDE_CASES["wide_groups"]
    x, o, w, b, m = [t.cuda().half() if t is not None else None for t in case.tensors(seed=9)]
    cuda_path("implicit")
    expected = aecr_ops.deform_conv2d(x, o, w, b, mask=m, **case.kwargs())
    got = aecr_ops.deform_conv2d(x.to(memory_format=torch.channels_last),
                                 o.transpose(2, 3).contiguous().transpose(2, 3), w, b, mask=m, **case.kwargs())
    assert torch.equal(got, expected)


def test_implicit_opcheck(cuda_path):
    case = NAMED_CASES["both_groups"]
    x, o, w, b, m = [t.cuda().half().requires_grad_(True) if t is not None else None for t in case.tensors(seed=6)]
    cuda_path("implicit")
    args = (x, w, o, m, b, list(case.stride), list(case.padding), list(case.dilation), 2, case.offset_groups)
    torch.library.opcheck(torch.ops.aecr_ops.deform_conv2d.default, args)


@pytest.mark.parametrize("kind", ["strided", "expanded"])
def test_implicit_with_a_bias_that_is_not_contiguous(cuda_path, kind):
    # Review D1: the implicit path read `bias` as if it were dense (a slice gave wrong outputs, an expanded bias
    # read past its allocation).
    case = NAMED_CASES["3x3_pad1_mask"]
    x, o, w, _, m = [t.cuda().half() if t is not None else None for t in case.tensors(seed=4)]
    bias = (torch.randn(2 * w.shape[0], device="cuda").half()[::2] if kind == "strided"
            else torch.full((1,), 0.75, device="cuda").half().expand(w.shape[0]))
    cuda_path("implicit")
    assert aecr_ops.deform_conv2d_path(x, o, w, mask=m, **case.kwargs()) == "implicit"
    got = aecr_ops.deform_conv2d(x, o, w, bias, mask=m, **case.kwargs())
    cuda_path("simple")
    expected = aecr_ops.deform_conv2d(x, o, w, bias.contiguous(), mask=m, **case.kwargs())
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_the_path_query_names_the_path_that_runs(cuda_path):
    case = NAMED_CASES["3x3_pad1_mask"]
    x, o, w, _, m = [t.cuda() if t is not None else None for t in case.tensors()]
    cuda_path("implicit")
    capability = torch.cuda.get_device_capability()
    assert aecr_ops.deform_conv2d_path(x.half(), o.half(), w.half()) == ("implicit" if capability >= (8, 0)
                                                                         else "simple")
    assert aecr_ops.deform_conv2d_path(x.double(), o.double(), w.double()) == "simple"
    torch.backends.cuda.matmul.allow_tf32 = False
    assert aecr_ops.deform_conv2d_path(x, o, w) == "simple"  # fp32 without TF32: the implicit path does not apply
    cuda_path("simple")
    assert aecr_ops.deform_conv2d_path(x.half(), o.half(), w.half()) == "simple"
    assert aecr_ops.deform_conv2d_path(x.cpu(), o.cpu(), w.cpu()) == "cpu"


@pytest.mark.parametrize("path", ["simple", "implicit"])
def test_forward_and_backward_replay_in_a_cuda_graph(cuda_path, path):
    # Review D10: the implicit backward copied its channel-chunk table from a per-call pinned host buffer, which
    # a captured graph would replay from a reused address. Now nothing in a call comes from the host.
    case = WIDE_CASES["wide_groups"]
    x, o, w, b, m = [t.cuda().half().requires_grad_(True) if t is not None else None for t in case.tensors(seed=9)]
    cuda_path(path)
    grad = torch.randn(case.batch, case.out_channels, *case.out_size(), device="cuda").half()

    def step():
        for t in (x, o, w, b, m):
            t.grad = None
        aecr_ops.deform_conv2d(x, o, w, b, mask=m, **case.kwargs()).backward(grad)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up outside the capture (allocator, cuBLAS handles)
    torch.cuda.current_stream().wait_stream(stream)
    expected = [t.grad.clone() for t in (x, o, w, b, m)]
    for t in (x, o, w, b, m):
        t.grad = None  # allocated inside the capture: each replay writes them afresh
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        aecr_ops.deform_conv2d(x, o, w, b, mask=m, **case.kwargs()).backward(grad)
    for _ in range(3):
        torch.cuda.synchronize()
        graph.replay()
    torch.cuda.synchronize()
    for e, t in zip(expected, (x, o, w, b, m)):
        torch.testing.assert_close(t.grad, e, rtol=1e-2, atol=1e-2)
