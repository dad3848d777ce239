"""deform_conv2d's CPU memory: the column work is cut into chunks within a fixed budget (of images, or of the
pixels of one image when an image needs more), no workspace above the budget outlives a call, and the cached
ones can be released. Results of chunked and unchunked work agree with the float64 reference."""
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import aecr_ops
from aecr_ops import reference
from dcn_cases import Case

BUDGET_BYTES = 64 << 20  # kColumnBytes in csrc/cpu/deform_conv_cpu.cpp


def columns_bytes(case: Case, dtype) -> int:
    """Bytes of one image's column matrix [C*K, Ho*Wo]."""
    kh, kw = case.kernel
    ho, wo = case.out_size()
    return case.in_channels * kh * kw * ho * wo * torch.finfo(dtype).bits // 8


def grads_of(fn, tensors, grad):
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in tensors]
    x, o, w, b, m = leaves
    out = fn(x, o, w, b, m)
    grads = torch.autograd.grad((out * grad).sum(), [t for t in leaves if t is not None])
    return [out.detach()] + list(grads)


@pytest.mark.slow
def test_images_cut_into_pixel_chunks_match_the_float64_reference():
    # float64: each image's columns (16 x 9 x 300 x 300 x 8 bytes = 104 MB) exceed the 64 MB budget, so every
    # image is cut into two pixel chunks of unequal length; two images.
    case = Case(2, 16, 8, (300, 300), (3, 3), (1, 1), (1, 1), (1, 1), 1, 2, True, True, offset_scale=3.0)
    assert columns_bytes(case, torch.float64) > BUDGET_BYTES
    tensors = case.tensors(seed=11)
    grad = torch.randn(case.batch, case.out_channels, *case.out_size(), generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64)
    got = grads_of(lambda x, o, w, b, m: aecr_ops.deform_conv2d(x, o, w, b, mask=m, **case.kwargs()), tensors, grad)
    expected = grads_of(lambda x, o, w, b, m: reference.deform_conv2d(x, o, w, b, mask=m, **case.kwargs()),
                        tensors, grad)
    for label, g, e in zip(["output", "input", "offset", "weight", "bias", "mask"], got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10, msg=label)


def test_no_workspace_above_the_budget_outlives_a_call_and_release_frees_them():
    # float32, one 64-channel image of 1080p at quarter resolution: its columns are 64 x 9 x 270 x 480 x 4 bytes
    # = 298 MB, cut into chunks of at most 64 MB.
    case = Case(1, 64, 16, (270, 480), (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, True, False)
    assert columns_bytes(case, torch.float32) > 4 * BUDGET_BYTES
    x, o, w, _, m = case.tensors(dtype=torch.float32, seed=2)
    aecr_ops.release_workspaces()
    assert aecr_ops.workspace_bytes() == 0
    first = aecr_ops.deform_conv2d(x, o, w, mask=m, padding=1)
    kept = aecr_ops.workspace_bytes()
    assert 0 < kept <= BUDGET_BYTES
    # The next call reuses the kept buffer (and gives the same result); float64 keeps its own, also bounded.
    torch.testing.assert_close(aecr_ops.deform_conv2d(x, o, w, mask=m, padding=1), first, rtol=0, atol=0)
    assert aecr_ops.workspace_bytes() == kept
    aecr_ops.deform_conv2d(x.double(), o.double(), w.double(), mask=m.double(), padding=1)
    assert kept < aecr_ops.workspace_bytes() <= 2 * BUDGET_BYTES
    assert aecr_ops.release_workspaces() > kept
    assert aecr_ops.workspace_bytes() == 0


def test_calls_from_several_threads_share_the_workspaces_safely():
    case = Case(2, 32, 16, (40, 48), (3, 3), (1, 1), (1, 1), (1, 1), 1, 2, True, True)
    x, o, w, b, m = case.tensors(dtype=torch.float32, seed=3)
    expected = aecr_ops.deform_conv2d(x, o, w, b, mask=m, padding=1)
    results, errors = [], []

    def work():
        try:
            for _ in range(5):
                results.append(aecr_ops.deform_conv2d(x, o, w, b, mask=m, padding=1))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 20
    for r in results:
        torch.testing.assert_close(r, expected, rtol=0, atol=0)
    assert aecr_ops.workspace_bytes() <= BUDGET_BYTES


def grads_of_some(fn, tensors, grad, wanted):
    """The output and the gradients of the tensors whose index is in `wanted` (the others need none)."""
    leaves = [t.clone().requires_grad_(i in wanted) for i, t in enumerate(tensors)]
    out = fn(*leaves)
    grads = torch.autograd.grad((out * grad).sum(), [leaves[i] for i in sorted(wanted)])
    return [out.detach()] + list(grads)


@pytest.mark.parametrize("wanted", [{0}, {2}, {1, 4}, {0, 1, 2, 3, 4}], ids=["input", "weight", "geometry", "all"])
@pytest.mark.parametrize("first_mode", ["inference_mode", "grad"])
def test_workspaces_serve_calls_in_and_out_of_inference_mode_alike(first_mode, wanted):
    # The cached workspace outlives the call that made it: one made under inference_mode must not become an
    # inference tensor that a later backward outside it may not write to (and the reverse order must work too).
    case = Case(1, 8, 8, (16, 16), (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, True, True)
    tensors = case.tensors(dtype=torch.float32, seed=5)
    grad = torch.randn(case.batch, case.out_channels, *case.out_size(), generator=torch.Generator().manual_seed(2))
    fn = lambda x, o, w, b, m: aecr_ops.deform_conv2d(x, o, w, b, mask=m, **case.kwargs())  # noqa: E731
    aecr_ops.release_workspaces()
    if first_mode == "inference_mode":
        with torch.inference_mode():
            fn(*tensors)
    else:
        grads_of_some(fn, tensors, grad, wanted)
    got = grads_of_some(fn, tensors, grad, wanted)
    with torch.inference_mode():
        inferred = fn(*tensors)
    again = grads_of_some(fn, tensors, grad, wanted)
    expected = grads_of_some(lambda x, o, w, b, m: reference.deform_conv2d(x, o, w, b, mask=m, **case.kwargs()),
                             [t.double() for t in tensors], grad.double(), wanted)
    for label, g, a, e in zip(["output"] + [f"grad {i}" for i in sorted(wanted)], got, again, expected):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-4, msg=label)
        torch.testing.assert_close(a, g, rtol=0, atol=0, msg=label)
    torch.testing.assert_close(inferred, got[0], rtol=0, atol=0)


PEAK_SCRIPT = textwrap.dedent("""
    import resource, torch, aecr_ops
    torch.manual_seed(0)
    x = torch.randn(1, 64, 270, 480); o = torch.randn(1, 18, 270, 480); m = torch.rand(1, 9, 270, 480)
    w = torch.randn(64, 64, 3, 3)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        y = aecr_ops.deform_conv2d(x, o, w, mask=m, padding=1)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024, y.numel() * 4)
""")


@pytest.mark.slow
def test_peak_memory_of_a_large_forward_is_its_output_plus_at_most_the_budget():
    # In a fresh process (ru_maxrss is a high-water mark): the forward of one 1080p-width image (64 channels at
    # quarter resolution) needs its output (33 MB) and one column chunk (64 MB), not the 298 MB of its columns.
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], capture_output=True, text=True, env=env, check=True)
    grown, output_bytes = (int(v) for v in out.stdout.split())
    assert grown <= output_bytes + BUDGET_BYTES + (32 << 20), f"peak grew by {grown / 2**20:.0f} MB"
