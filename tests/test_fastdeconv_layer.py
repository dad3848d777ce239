"""aecr_ops.FastDeconv against the original algorithm (aecr_ops.reference.FastDeconv), step after step."""
import warnings

import pytest
import torch

import aecr_ops
from aecr_ops import reference

CONFIGS = {
    "aecr_3to3_k3": (dict(in_channels=3, out_channels=3, kernel_size=3, stride=1, padding=1), (2, 3, 16, 18)),
    "channels_above_block": (dict(in_channels=16, out_channels=6, kernel_size=3, padding=1, block=8), (2, 16, 10, 10)),
    "block_not_dividing": (dict(in_channels=12, out_channels=4, kernel_size=3, padding=1, block=8), (2, 12, 9, 11)),
    "stride2": (dict(in_channels=8, out_channels=4, kernel_size=3, stride=2, padding=1, block=8), (2, 8, 13, 14)),
    "1x1": (dict(in_channels=8, out_channels=5, kernel_size=1, block=4), (3, 8, 7, 6)),
    "freeze": (dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, freeze=True, freeze_iter=2), (2, 4, 8, 8)),
    "groups": (dict(in_channels=8, out_channels=6, kernel_size=3, padding=1, groups=2), (2, 8, 9, 9)),
    "no_bias_dilation": (dict(in_channels=4, out_channels=4, kernel_size=3, padding=2, dilation=2, bias=False),
                         (2, 4, 11, 11)),
    "big_block_576": (dict(in_channels=64, out_channels=8, kernel_size=3, padding=1, block=64), (2, 64, 12, 12)),
}


def make_pair(config, seed=0):
    torch.manual_seed(seed)
    ours = aecr_ops.FastDeconv(**config).double()
    torch.manual_seed(seed)
    ref = reference.FastDeconv(**config).double()
    return ours, ref


def assert_close(a, b, what):
    scale = max(1.0, b.abs().max().item())
    assert (a - b).abs().max().item() <= 1e-10 * scale, f"{what}: {(a - b).abs().max().item()}"


@pytest.mark.parametrize("input_grad", [False, True])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_steps_and_eval_match_the_original(name, input_grad):
    config, shape = CONFIGS[name]
    ours, ref = make_pair(config)
    # Same initialisation as the original under the same seed (the original inherits nn.Conv2d's).
    assert_close(ours.weight, ref.weight, "initial weight")
    opt_a = torch.optim.SGD(ours.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(ref.parameters(), lr=0.1)
    steps = 6 if config.get("freeze") else 4
    for step in range(steps):
        x = torch.randn(shape, dtype=torch.float64) * 1.5 + 0.3
        xa, xb = x.clone().requires_grad_(input_grad), x.clone().requires_grad_(input_grad)
        ya, yb = ours(xa), ref(xb)
        assert_close(ya, yb, f"step {step} output")
        g = torch.randn_like(ya)
        (ya * g).sum().backward()
        (yb * g).sum().backward()
        for (n, pa), pb in zip(ours.named_parameters(), ref.parameters()):
            assert_close(pa.grad, pb.grad, f"step {step} grad of {n}")
        if input_grad:
            assert_close(xa.grad, xb.grad, f"step {step} input grad")
        assert_close(ours.running_mean, ref.running_mean, f"step {step} running_mean")
        assert_close(ours.running_deconv, ref.running_deconv, f"step {step} running_deconv")
        assert int(ours.counter) == ref.counter
        opt_a.step()
        opt_b.step()
        opt_a.zero_grad()
        opt_b.zero_grad()
    ours.eval()
    ref.eval()
    x = torch.randn(shape, dtype=torch.float64).requires_grad_(True)
    assert_close(ours(x), ref(x), "eval output")
    with torch.no_grad():
        assert_close(ours(x), ref(x), "eval output (no_grad, cached fold)")


def test_state_dict_is_the_original_one():
    layer = aecr_ops.FastDeconv(3, 3, 3, stride=1, padding=1)
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == {
        "weight": (3, 3, 3, 3), "bias": (3,), "running_mean": (27,), "running_deconv": (27, 27)}
    grouped = aecr_ops.FastDeconv(8, 4, 3, padding=1, groups=2)
    assert {k: tuple(v.shape) for k, v in grouped.state_dict().items()} == {
        "weight": (4, 4, 3, 3), "bias": (4,), "running_mean": (72,), "running_deconv": (2, 36, 36)}
    assert torch.equal(layer.running_deconv, torch.eye(27)) and torch.count_nonzero(layer.running_mean) == 0


def test_loads_an_original_checkpoint_and_reproduces_it():
    torch.manual_seed(3)
    ref = reference.FastDeconv(3, 3, 3, stride=1, padding=1).double()
    for _ in range(3):
        ref(torch.rand(2, 3, 20, 20, dtype=torch.float64))
    ours = aecr_ops.FastDeconv(3, 3, 3, stride=1, padding=1).double()
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours.eval()
    ref.eval()
    x = torch.rand(1, 3, 24, 24, dtype=torch.float64)
    assert_close(ours(x), ref(x), "eval after loading")


def test_block_rule():
    assert aecr_ops.FastDeconv(3, 3, 3).block == 3
    assert aecr_ops.FastDeconv(64, 64, 3).block == 64
    assert aecr_ops.FastDeconv(96, 8, 3).block == 32      # gcd(64, 96)
    assert aecr_ops.FastDeconv(256, 8, 3).block == 64
    assert aecr_ops.FastDeconv(8, 8, 3, groups=4).block == 2
    assert aecr_ops.FastDeconv(3, 3, 3, stride=2).sampling_stride == 6


def test_eval_folds_once_and_refolds_after_a_change(monkeypatch):
    import aecr_ops.fastdeconv as module
    layer = aecr_ops.FastDeconv(4, 4, 3, padding=1)
    layer(torch.randn(2, 4, 8, 8))
    layer.eval()
    calls = []
    real = module.fastdeconv_fold
    monkeypatch.setattr(module, "fastdeconv_fold", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        y1 = layer(x)
        y2 = layer(x)
    assert len(calls) == 1 and torch.equal(y1, y2)
    with torch.no_grad():
        layer.weight.mul_(2.0)  # an in-place change, as an optimiser makes
        y3 = layer(x)
    assert len(calls) == 2 and not torch.allclose(y3, y1)
    layer.load_state_dict(layer.state_dict())  # copies in place: the fold must be redone
    with torch.no_grad():
        layer(x)
    assert len(calls) == 3


def test_eval_fold_made_under_autocast_does_not_serve_outside_it():
    # The fold's matmuls run in bf16 under autocast: a cached bf16 weight given to a float32 convolution failed
    # ("expected scalar type Float but found BFloat16").
    layer = aecr_ops.FastDeconv(3, 3, 3, padding=1)
    layer(torch.randn(2, 3, 8, 8))
    layer.eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = layer(x)
        full = layer(x)
        again = layer(x)
    assert low.dtype == torch.bfloat16 and full.dtype == torch.float32 and torch.equal(full, again)
    torch.testing.assert_close(low.float(), full, rtol=5e-2, atol=5e-2)


def test_eval_with_grad_flows_to_the_weight():
    layer = aecr_ops.FastDeconv(4, 4, 3, padding=1)
    layer(torch.randn(2, 4, 8, 8))
    layer.eval()
    layer(torch.randn(1, 4, 8, 8)).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_non_finite_batch_does_not_poison_running_buffers():
    layer = aecr_ops.FastDeconv(3, 3, 3, padding=1)
    layer(torch.randn(2, 3, 12, 12))
    mean, deconv = layer.running_mean.clone(), layer.running_deconv.clone()
    x = torch.randn(2, 3, 12, 12)
    x[0, 1, 3, 3] = float("nan")
    with pytest.warns(RuntimeWarning, match="not finite"):
        layer(x)
    assert torch.equal(layer.running_mean, mean) and torch.equal(layer.running_deconv, deconv)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.randn(2, 3, 12, 12))  # a good batch updates again, silently
    assert not torch.equal(layer.running_mean, mean)


def test_empty_batch_in_training():
    layer = aecr_ops.FastDeconv(3, 3, 3, padding=1)
    out = layer(torch.randn(0, 3, 8, 8))
    assert out.shape == (0, 3, 8, 8)
    assert torch.equal(layer.running_deconv, torch.eye(27))


def test_counter_and_cache_are_not_in_the_state_dict():
    layer = aecr_ops.FastDeconv(3, 3, 3, padding=1)
    layer(torch.randn(1, 3, 8, 8))
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(1, 3, 8, 8))
    assert set(layer.state_dict()) == {"weight", "bias", "running_mean", "running_deconv"}


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = aecr_ops.FastDeconv(8, 8, 3, padding=1, block=8)
    torch.manual_seed(0)
    compiled_layer = aecr_ops.FastDeconv(8, 8, 3, padding=1, block=8)
    compiled = torch.compile(compiled_layer, fullgraph=True)
    for step in range(3):
        x = torch.randn(2, 8, 10, 10)
        ya, yb = eager(x), compiled(x)
        torch.testing.assert_close(yb, ya, rtol=1e-4, atol=1e-5)
        ya.square().sum().backward()
        yb.square().sum().backward()
        torch.testing.assert_close(compiled_layer.weight.grad, eager.weight.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(compiled_layer.running_deconv, eager.running_deconv, rtol=1e-5, atol=1e-6)
    assert int(compiled_layer.counter) == int(eager.counter) == 3
    eager.eval()
    compiled_layer.eval()
    x = torch.randn(1, 8, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs,words", [
    (dict(in_channels=0, out_channels=3, kernel_size=3), "in_channels"),
    (dict(in_channels=4, out_channels=3, kernel_size=3, groups=2), "groups"),
    (dict(in_channels=4, out_channels=4, kernel_size=0), "kernel_size"),
    (dict(in_channels=4, out_channels=4, kernel_size=3, stride=(1, 2)), "stride"),
    (dict(in_channels=4, out_channels=4, kernel_size=3, padding=-1), "padding"),
    (dict(in_channels=4, out_channels=4, kernel_size=3, block=0), "block"),
    (dict(in_channels=4, out_channels=4, kernel_size=3, sampling_stride=0), "sampling_stride"),
    (dict(in_channels=4, out_channels=4, kernel_size=3, freeze_iter=0), "freeze_iter"),
    (dict(in_channels=4, out_channels=4, kernel_size=3, n_iter=-1), "n_iter"),
])
def test_constructor_errors(kwargs, words):
    with pytest.raises(ValueError, match=words):
        aecr_ops.FastDeconv(**kwargs)


def test_forward_errors():
    layer = aecr_ops.FastDeconv(4, 4, 3, padding=1)
    with pytest.raises(ValueError, match="4 channels"):
        layer(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="4-D"):
        layer(torch.randn(4, 8, 8))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(1, 4, 8, 8, dtype=torch.float64))


def test_a_fold_cached_under_inference_mode_does_not_serve_autograd():
    layer = aecr_ops.FastDeconv(3, 3, kernel_size=3, padding=1).eval()
    layer.requires_grad_(False)  # frozen: the fold is cached under autograd too
    x = torch.rand(1, 3, 8, 8)
    with torch.inference_mode():
        expected = layer(x)
    xr = x.clone().requires_grad_()
    out = layer(xr)
    out.sum().backward()  # an inference tensor's fold could not be saved for backward
    assert torch.equal(out.detach(), expected) and xr.grad is not None
