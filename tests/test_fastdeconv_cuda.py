"""FastDeconv's ops and layer on CUDA against the CPU and the reference (skipped without a GPU)."""
import copy
import io
import warnings

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


def count_non_finite_warnings(record):
    found = [w for w in record if issubclass(w.category, RuntimeWarning) and "not finite" in str(w.message)]
    assert all("reported late" in str(w.message) for w in found)
    return len(found)


def cuda_batch(device="cuda", finite=True):
    x = torch.rand(2, 3, 16, 16, device=device)
    if not finite:
        x[1, 2, 5, 5] = float("nan")
    return x


def test_non_finite_batch_then_steps_without_a_sync_warns_once_and_keeps_the_buffers():
    layer = aecr_ops.FastDeconv(3, 3, 3, padding=1).cuda()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        layer(cuda_batch()).square().sum().backward()
        torch.cuda.synchronize()
        torch.cuda._sleep(200_000_000)  # holds the GPU back (~0.1 s) so that the host runs ahead of it
        before = layer.running_mean.clone(), layer.running_deconv.clone()
        layer(cuda_batch(finite=False)).square().sum().backward()
        after = layer.running_mean.clone(), layer.running_deconv.clone()
        most_queued = 0
        for _ in range(6):
            layer(cuda_batch()).square().sum().backward()
            most_queued = max(most_queued, len(layer._verdicts))
        torch.cuda.synchronize()
        layer(cuda_batch())  # finds every verdict back
        assert count_non_finite_warnings(record) == 1
    assert most_queued >= 2, "the host did not run ahead of the GPU: the test did not test what it should"
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    assert not torch.equal(layer.running_deconv, after[1])  # the later good batches moved the buffers again


def saved(module):
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return buffer


def test_deepcopy_and_pickle_with_verdicts_pending_on_cuda():
    layer = aecr_ops.FastDeconv(3, 3, 3, padding=1).cuda()
    torch.cuda._sleep(50_000_000)
    layer(cuda_batch(finite=False))
    copies = [copy.deepcopy(layer), torch.load(saved(layer), weights_only=False)]
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for other in copies:
            other(cuda_batch())
        assert count_non_finite_warnings(record) == 0  # copies do not report the original's batch
        layer(cuda_batch())
        assert count_non_finite_warnings(record) == 1


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_layer_on_another_device_than_the_current_one():
    # The layer on cuda:1, the current device cuda:0: the verdict must be brought back on cuda:1's stream, behind
    # the copy; an event on cuda:0's would complete at once and let the host read the pinned byte too early.
    torch.cuda.set_device(0)
    layer = aecr_ops.FastDeconv(3, 3, 3, padding=1).to("cuda:1")
    bad_steps = {2, 5}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for step in range(8):
            with torch.cuda.device(1):
                torch.cuda._sleep(50_000_000)  # the copy lands well after the host looks for it
            layer(cuda_batch("cuda:1", finite=step not in bad_steps))
        torch.cuda.synchronize(1)
        layer(cuda_batch("cuda:1"))
        assert count_non_finite_warnings(record) == len(bad_steps)
    assert torch.cuda.current_device() == 0


def test_training_step_captured_in_a_cuda_graph_replays():
    # D10: no per-step pinned flag or event while capturing; replays run the step (running update included,
    # which still leaves the buffers alone for a non-finite batch) and report nothing.
    torch.manual_seed(0)
    layer = aecr_ops.FastDeconv(3, 3, 3, padding=1).cuda()
    static_x = torch.rand(4, 3, 32, 32, device="cuda")

    def step(net, x):
        for p in net.parameters():
            p.grad = None
        loss = net(x).square().mean()
        loss.backward()
        with torch.no_grad():
            for p in net.parameters():
                p.sub_(0.01 * p.grad)
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up, as torch.cuda.graph wants
        for _ in range(3):
            step(layer, static_x)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    eager = copy.deepcopy(layer)
    for p in layer.parameters():
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        queued = len(layer._verdicts)
        with torch.cuda.graph(graph):
            static_loss = step(layer, static_x)
        assert len(layer._verdicts) == queued  # nothing queued during the capture
        for _ in range(3):
            x = torch.rand(4, 3, 32, 32, device="cuda")
            static_x.copy_(x)
            graph.replay()
            loss = step(eager, x)
            torch.testing.assert_close(static_loss, loss, rtol=1e-5, atol=1e-6)
        torch.cuda.synchronize()
        for a, b in ((layer.weight, eager.weight), (layer.bias, eager.bias),
                     (layer.running_mean, eager.running_mean), (layer.running_deconv, eager.running_deconv)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert int(layer.counter) == int(eager.counter)
        mean, deconv = layer.running_mean.clone(), layer.running_deconv.clone()
        static_x.copy_(cuda_batch(finite=False).repeat(2, 1, 2, 2))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(layer.running_mean, mean) and torch.equal(layer.running_deconv, deconv)
        layer(torch.rand(4, 3, 32, 32, device="cuda"))  # eager again: polls, and the warm-up's verdicts were good
        assert count_non_finite_warnings(record) == 0
