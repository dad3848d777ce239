"""deform_conv2d on the CPU with channels-last input: a channels-last output and input gradient (as F.conv2d gives),
the same values as with NCHW input, and the fake kernel's strides equal to the real ones. And every instruction-set
copy of the CPU tile loops (AECR_CPU_ISA) against the float64 reference, channel counts that leave vector tails
included."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import aecr_ops
from aecr_ops import reference
from dcn_cases import NAMED_CASES, Case

CL = torch.channels_last
CASES = {
    **{name: NAMED_CASES[name] for name in ("3x3_pad1_mask", "no_mask_no_bias", "weight_groups", "offset_groups",
                                            "both_groups", "stride2")},
    "tails": Case(2, 13, 7, (9, 11), (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, True, True),
    "dilated_odd_groups": Case(1, 12, 6, (10, 9), (3, 2), (2, 1), (2, 1), (2, 2), 3, 2, True, True),
}


def grads(x, o, w, b, m, case, grad):
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (x, o, w, b, m)]
    out = aecr_ops.deform_conv2d(leaves[0], leaves[1], leaves[2], leaves[3], mask=leaves[4], **case.kwargs())
    out.backward(grad)
    return out, [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", sorted(CASES))
def test_channels_last_input_gives_channels_last_results_with_the_same_values(name, dtype):
    case = CASES[name]
    x, o, w, b, m = case.tensors(dtype=dtype, seed=5)
    grad = torch.randn(case.batch, case.out_channels, *case.out_size(), dtype=dtype,
                       generator=torch.Generator().manual_seed(6))
    out, g = grads(x, o, w, b, m, case, grad)
    out_cl, g_cl = grads(x.contiguous(memory_format=CL), o, w, b, m, case, grad.contiguous(memory_format=CL))
    assert out_cl.is_contiguous(memory_format=CL) and not out_cl.is_contiguous()
    assert out.is_contiguous()
    assert g_cl[0].is_contiguous(memory_format=CL) and g[0].is_contiguous()
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_cl, out, **tol)
    for a, e in zip(g_cl, g):
        if e is not None:
            torch.testing.assert_close(a, e, **tol)
    # And both against the float64 reference.
    expected = reference.deform_conv2d(x.double(), o.double(), w.double(), None if b is None else b.double(),
                                       mask=None if m is None else m.double(), **case.kwargs())
    torch.testing.assert_close(out_cl.double(), expected, **tol)


def test_channels_last_matches_conv2d_layout_rule():
    # Zero offsets and a unit mask: deform_conv2d is conv2d, and it returns conv2d's memory format for either input.
    x = torch.randn(2, 8, 9, 10, dtype=torch.float64)
    w = torch.randn(6, 8, 3, 3, dtype=torch.float64)
    o = torch.zeros(2, 18, 9, 10, dtype=torch.float64)
    for fmt in (torch.contiguous_format, CL):
        xi = x.contiguous(memory_format=fmt)
        ours, theirs = aecr_ops.deform_conv2d(xi, o, w, padding=1), F.conv2d(xi, w, padding=1)
        assert ours.stride() == theirs.stride()
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_channels_last(requires_grad):
    # The fake kernel gives the real kernel's strides (channels-last on the CPU), for the forward and backward.
    case = CASES["both_groups"]
    x, o, w, b, m = case.tensors(seed=2)
    x = x.contiguous(memory_format=CL).requires_grad_(requires_grad)
    args = (x, w, o, m, b, list(case.stride), list(case.padding), list(case.dilation), case.groups,
            case.offset_groups)
    torch.library.opcheck(torch.ops.aecr_ops.deform_conv2d.default, args)
    grad = torch.randn(case.batch, case.out_channels, *case.out_size(), dtype=torch.float64).contiguous(
        memory_format=CL)
    torch.library.opcheck(torch.ops.aecr_ops.deform_conv2d_backward.default,
                          (grad, x.detach(), w, o, m, *args[5:]), test_utils=("test_schema", "test_faketensor"))


ISA_SCRIPT = textwrap.dedent("""
    import sys, torch, aecr_ops
    from aecr_ops import reference
    sys.path.insert(0, {tests!r})
    from test_deform_conv_channels_last import CASES
    worst = 0.0
    for name, case in sorted(CASES.items()):
        for dtype in (torch.float64, torch.float32):
            for fmt in (torch.contiguous_format, torch.channels_last):
                x, o, w, b, m = case.tensors(dtype=dtype, seed=3)
                leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (x, o, w, b, m)]
                leaves[0] = leaves[0].detach().contiguous(memory_format=fmt).requires_grad_(True)
                out = aecr_ops.deform_conv2d(leaves[0], leaves[1], leaves[2], leaves[3], mask=leaves[4],
                                             **case.kwargs())
                grad = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(4))
                out.backward(grad)
                ref = [t.detach().double().requires_grad_(True) if t is not None else None for t in (x, o, w, b, m)]
                expected = reference.deform_conv2d(ref[0], ref[1], ref[2], ref[3], mask=ref[4], **case.kwargs())
                expected.backward(grad.double())
                tol = 1e-10 if dtype == torch.float64 else 2e-4
                pairs = [(out, expected)] + [(a.grad, e.grad) for a, e in zip(leaves, ref) if a is not None]
                for got, want in pairs:
                    scale = max(1.0, want.abs().max().item())
                    err = (got.double() - want).abs().max().item() / scale
                    worst = max(worst, err if dtype == torch.float32 else 0.0)
                    assert err <= tol, (name, dtype, fmt, err)
    print("ok", worst)
""")


def supported_isas():
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    isas = ["base"]
    if " avx2" in flags and " fma" in flags:
        isas.append("avx2")
        if " avx512f" in flags:
            isas.append("avx512")
    return isas


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
def test_every_instruction_set_copy_matches_the_float64_reference(isa):
    if isa not in supported_isas():
        pytest.skip(f"this CPU has no {isa}")
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "AECR_CPU_ISA": isa, "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", ISA_SCRIPT.format(tests=tests)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.startswith("ok")


def test_an_unknown_instruction_set_is_a_clear_error():
    env = {**os.environ, "AECR_CPU_ISA": "sse9"}
    script = ("import torch, aecr_ops\n"
              "x = torch.randn(1, 2, 4, 4); w = torch.randn(2, 2, 1, 1); o = torch.zeros(1, 2, 4, 4)\n"
              "aecr_ops.deform_conv2d(x, o, w)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0 and "AECR_CPU_ISA must be base, avx2 or avx512" in done.stderr
