"""FastDeconv's ops and layer on CUDA against the CPU and the reference (skipped without a GPU)."""
import pytest
import torch

import aecr_ops
from aecr_ops import reference
from test_fastdeconv_ops import STAT_CASES, ours_stats, spd, stats_inputs

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", sorted(STAT_CASES))
def test_patch_statistics_cuda_matches_cpu(name, dtype):
    case = STAT_CASES[name]
    x = stats_inputs(case, dtype)
    xc, xg = x.clone().requires_grad_(True), x.cuda().requires_grad_(True)
    mc, cc = ours_stats(xc, case, 1e-5)
    mg, cg = ours_stats(xg, case, 1e-5)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(mg.cpu(), mc, rtol=tol, atol=tol)
    torch.testing.assert_close(cg.cpu(), cc, rtol=tol, atol=tol)
    gm, gc = torch.randn_like(mc), torch.randn_like(cc)
    (ga,) = torch.autograd.grad((mc * gm).sum() + (cc * gc).sum(), xc)
    (gb,) = torch.autograd.grad((mg * gm.cuda()).sum() + (cg * gc.cuda()).sum(), xg)
    torch.testing.assert_close(gb.cpu(), ga, rtol=tol, atol=tol)


@pytest.mark.parametrize("offset", [0.0, 100.0])
@pytest.mark.parametrize("shape", [(16, 3, 256, 256), (3, 8, 61, 47)])
def test_two_launch_statistics_over_many_blocks(shape, offset):
    # Many blocks whose row runs are not multiples of the 32 staged rows, merged in float64; a mean far from 0
    # (offset 100, spread 0.1) checks the per-block shifts: without them float32 sums would cancel.
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.1 + offset
    case = (*shape, (3, 3), (1, 1), (1, 1), 3, shape[1], 1)
    mc, cc = ours_stats(x, case, 1e-5)
    mg, cg = ours_stats(x.float().cuda(), case, 1e-5)
    torch.testing.assert_close(mg.cpu().double(), mc, rtol=1e-6, atol=1e-6 * (1 + offset))
    torch.testing.assert_close(cg.cpu().double(), cc, rtol=1e-3, atol=1e-3 * cc.abs().max().item())


@pytest.mark.parametrize("f", [27, 48, 49, 576])
def test_isqrt_cuda_matches_reference(f):
    a = spd(2, f, seed=f, cond=1e3)
    ag = a.cuda().requires_grad_(True)
    ar = a.clone().requires_grad_(True)
    d = aecr_ops.isqrt_newton_schulz(ag, 5)
    d_r = reference.isqrt_newton_schulz(ar, 5)
    torch.testing.assert_close(d.cpu(), d_r, rtol=1e-9, atol=1e-11)
    g = torch.randn_like(d_r)
    (ga,) = torch.autograd.grad((d * g.cuda()).sum(), ag)
    (gb,) = torch.autograd.grad((d_r * g).sum(), ar)
    torch.testing.assert_close(ga.cpu(), gb, rtol=1e-8, atol=1e-9 * gb.abs().max().item())


def test_layer_cuda_matches_cpu_over_steps():
    torch.manual_seed(0)
    cpu = aecr_ops.FastDeconv(3, 3, 3, stride=1, padding=1).double()
    gpu = aecr_ops.FastDeconv(3, 3, 3, stride=1, padding=1).double().cuda()
    gpu.load_state_dict(cpu.state_dict())
    for _ in range(3):
        x = torch.rand(4, 3, 32, 32, dtype=torch.float64)
        yc, yg = cpu(x), gpu(x.cuda())
        torch.testing.assert_close(yg.cpu(), yc, rtol=1e-10, atol=1e-10)
        yc.square().sum().backward()
        yg.square().sum().backward()
        torch.testing.assert_close(gpu.weight.grad.cpu(), cpu.weight.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gpu.running_deconv.cpu(), cpu.running_deconv, rtol=1e-10, atol=1e-10)


def test_layer_under_bf16_autocast():
    layer = aecr_ops.FastDeconv(3, 16, 3, padding=1).cuda()
    x = torch.rand(2, 3, 32, 32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.running_deconv.dtype == torch.float32 and torch.isfinite(layer.weight.grad).all()


def test_opcheck_cuda():
    x = torch.randn(2, 8, 12, 12, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.aecr_ops.patch_statistics.default, (x, [3, 3], [1, 1], [1, 1], 3, 4, 1, 1e-5))
    a = spd(2, 27).float().cuda().requires_grad_(True)
    torch.library.opcheck(torch.ops.aecr_ops.isqrt_newton_schulz.default, (a, 5))


def test_non_finite_batch_on_cuda_is_reported_by_a_later_call_without_touching_the_buffers():
    layer = aecr_ops.FastDeconv(3, 3, 3, padding=1).cuda()
    layer(torch.rand(2, 3, 12, 12, device="cuda"))
    mean, deconv = layer.running_mean.clone(), layer.running_deconv.clone()
    x = torch.rand(2, 3, 12, 12, device="cuda")
    x[0, 1, 3, 3] = float("nan")
    layer(x)
    torch.cuda.synchronize()
    assert torch.equal(layer.running_mean, mean) and torch.equal(layer.running_deconv, deconv)
    with pytest.warns(RuntimeWarning, match="not finite"):
        layer(torch.rand(2, 3, 12, 12, device="cuda"))
    assert not torch.equal(layer.running_mean, mean)
