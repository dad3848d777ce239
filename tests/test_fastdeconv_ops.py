"""patch_statistics and isqrt_newton_schulz against the float64 reference; gradcheck, opcheck, bad inputs."""
import pytest
import torch

import aecr_ops
from aecr_ops import reference
from aecr_ops._registrations import NS_FUSED_MAX_FEATURES

# (N, C, H, W, kernel, dilation, padding, sampling_stride, block, groups)
STAT_CASES = {
    "aecr_3to3": (2, 3, 17, 19, (3, 3), (1, 1), (1, 1), 3, 3, 1),
    "one_block_64": (2, 64, 9, 9, (3, 3), (1, 1), (1, 1), 3, 64, 1),
    "interleaved_blocks": (2, 12, 10, 9, (3, 3), (1, 1), (1, 1), 2, 4, 1),
    "sampling_stride_6": (2, 4, 20, 21, (3, 3), (1, 1), (1, 1), 6, 4, 1),
    "pixel_mode_1x1": (3, 8, 7, 5, (1, 1), (1, 1), (0, 0), 3, 4, 1),
    "groups": (2, 6, 9, 9, (3, 3), (1, 1), (1, 1), 3, 3, 2),
    "dilation_rect": (2, 4, 12, 11, (3, 2), (2, 1), (2, 0), 2, 2, 1),
    "no_padding_stride1": (1, 2, 6, 6, (3, 3), (1, 1), (0, 0), 1, 2, 1),
}


def stats_inputs(case, dtype=torch.float64, seed=0):
    n, c, h, w, *_ = case
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)


def reference_stats(x, case, eps):
    _, c, _, _, kernel, dilation, padding, stride, block, groups = case
    patches = reference.fastdeconv_patches(x, kernel, dilation, padding, stride)
    features = kernel[0] * kernel[1] * block
    mean, cov = reference.fastdeconv_statistics(patches, features, groups, eps)
    return mean.reshape(groups, features), cov


def ours_stats(x, case, eps):
    _, _, _, _, kernel, dilation, padding, stride, block, groups = case
    return aecr_ops.patch_statistics(x, kernel, dilation, padding, stride, block, groups, eps)


@pytest.mark.parametrize("name", sorted(STAT_CASES))
def test_patch_statistics_against_reference(name):
    case = STAT_CASES[name]
    x = stats_inputs(case)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    mean, cov = ours_stats(xa, case, 1e-5)
    mean_r, cov_r = reference_stats(xb, case, 1e-5)
    torch.testing.assert_close(mean, mean_r, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cov, cov_r, rtol=1e-12, atol=1e-12)
    gm, gc = torch.randn_like(mean), torch.randn_like(cov)
    (ga,) = torch.autograd.grad((mean * gm).sum() + (cov * gc).sum(), xa)
    (gb,) = torch.autograd.grad((mean_r * gm).sum() + (cov_r * gc).sum(), xb)
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)


def test_patch_statistics_over_several_tiles():
    # 2.4M patch entries: the kernel accumulates over tiles of about 1M (shifted sums, float64).
    case = (4, 16, 64, 64, (3, 3), (1, 1), (1, 1), 1, 16, 1)
    x = stats_inputs(case) + 100.0  # a large common offset: a naive E[x^2] - E[x]^2 would lose digits
    mean, cov = ours_stats(x, case, 0.0)
    mean_r, cov_r = reference_stats(x, case, 0.0)
    torch.testing.assert_close(mean, mean_r, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(cov, cov_r, rtol=1e-9, atol=1e-9)


def test_patch_statistics_float32_is_accurate():
    case = STAT_CASES["one_block_64"]
    x = stats_inputs(case) + 10.0
    mean, cov = ours_stats(x.float(), case, 1e-5)
    mean_r, cov_r = reference_stats(x, case, 1e-5)
    torch.testing.assert_close(mean.double(), mean_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cov.double(), cov_r, rtol=1e-4, atol=1e-4)


def test_patch_statistics_gradcheck():
    case = (2, 4, 6, 7, (3, 3), (1, 1), (1, 1), 2, 2, 1)
    x = stats_inputs(case).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: ours_stats(t, case, 1e-3), (x,), eps=1e-6, atol=1e-7)


def spd(batch, f, seed=0, cond=1e3, dtype=torch.float64):
    """Covariance-like symmetric positive-definite matrices with eigenvalues spread over `cond`."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, f, f, generator=g, dtype=torch.float64))
    values = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), f, dtype=torch.float64)
    a = q @ torch.diag_embed(values.expand(batch, f)) @ q.transpose(1, 2)
    return (0.5 * (a + a.transpose(1, 2))).to(dtype)


@pytest.mark.parametrize("f", [1, 9, 27, NS_FUSED_MAX_FEATURES, NS_FUSED_MAX_FEATURES + 1, 100])
@pytest.mark.parametrize("n_iter", [0, 1, 5, 9])
def test_isqrt_against_reference(f, n_iter):
    a = spd(2, f, seed=f + n_iter)
    aa, ab = a.clone().requires_grad_(True), a.clone().requires_grad_(True)
    d = aecr_ops.isqrt_newton_schulz(aa, n_iter)
    d_r = reference.isqrt_newton_schulz(ab, n_iter)
    torch.testing.assert_close(d, d_r, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(d)
    (ga,) = torch.autograd.grad((d * g).sum(), aa)
    (gb,) = torch.autograd.grad((d_r * g).sum(), ab)
    torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-10 * gb.abs().max().item())


def test_isqrt_at_fastdeconv_size_576():
    a = spd(1, 576, seed=3, cond=1e4)
    aa, ab = a.clone().requires_grad_(True), a.clone().requires_grad_(True)
    d = aecr_ops.isqrt_newton_schulz(aa[0], 5)
    d_r = reference.isqrt_newton_schulz(ab[0], 5)
    torch.testing.assert_close(d, d_r, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(d)
    (ga,) = torch.autograd.grad((d * g).sum(), aa)
    (gb,) = torch.autograd.grad((d_r * g).sum(), ab)
    torch.testing.assert_close(ga, gb, rtol=1e-8, atol=1e-10 * gb.abs().max().item())


def test_isqrt_converges_to_the_inverse_square_root():
    a = spd(1, 10, cond=4.0)[0]
    d = aecr_ops.isqrt_newton_schulz(a, 30)
    torch.testing.assert_close(d @ a @ d, torch.eye(10, dtype=torch.float64), rtol=1e-10, atol=1e-10)


def test_isqrt_matrix_form_accepts_any_square_matrix():
    g = torch.Generator().manual_seed(1)
    a = torch.eye(12, dtype=torch.float64) + 0.1 * torch.randn(12, 12, generator=g, dtype=torch.float64)
    torch.testing.assert_close(aecr_ops.isqrt_newton_schulz(a, 5), reference.isqrt_newton_schulz(a, 5))


def test_isqrt_spectral_form_refuses_non_symmetric_matrices():
    a = spd(1, 60)[0]
    a[0, 1] += 0.1
    with pytest.raises(RuntimeError, match="symmetric"):
        aecr_ops.isqrt_newton_schulz(a, 5)


def test_isqrt_saved_state_matches_fake_kernel_rule():
    for f in (NS_FUSED_MAX_FEATURES, NS_FUSED_MAX_FEATURES + 1):
        result, saved = torch.ops.aecr_ops.isqrt_newton_schulz(spd(2, f), 5)
        expected = (2, f + 1, f) if f > NS_FUSED_MAX_FEATURES else (0,)
        assert tuple(saved.shape) == expected


def test_isqrt_backward_without_saved_state_recomputes_it():
    a, g = spd(1, 60), torch.randn(1, 60, 60, dtype=torch.float64)
    result, saved = torch.ops.aecr_ops.isqrt_newton_schulz(a, 5)
    with_state = torch.ops.aecr_ops.isqrt_newton_schulz_backward(g, a, result, saved, 5)
    without = torch.ops.aecr_ops.isqrt_newton_schulz_backward(g, a, result, torch.empty(0, dtype=a.dtype), 5)
    torch.testing.assert_close(with_state, without, rtol=1e-10, atol=1e-12)


def test_isqrt_non_finite_input_gives_nan_not_a_crash():
    for f in (9, 60):
        a = spd(1, f)
        a[0, 0, 0] = float("nan")
        assert torch.isnan(aecr_ops.isqrt_newton_schulz(a, 5)).any()


@pytest.mark.parametrize("f", [5, 52])
def test_isqrt_gradcheck(f):
    a = spd(2, f, cond=10.0).requires_grad_(True)
    # The spectral form's gradient is that of the iteration at a symmetric point: perturb symmetrically.
    fn = lambda t: aecr_ops.isqrt_newton_schulz(0.5 * (t + t.transpose(1, 2)), 3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (a,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("requires_grad", [True, False])
@pytest.mark.parametrize("name", ["aecr_3to3", "interleaved_blocks", "groups", "pixel_mode_1x1"])
def test_opcheck_patch_statistics(name, requires_grad):
    case = STAT_CASES[name]
    _, _, _, _, kernel, dilation, padding, stride, block, groups = case
    x = stats_inputs(case).requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.aecr_ops.patch_statistics.default,
                          (x, list(kernel), list(dilation), list(padding), stride, block, groups, 1e-5))


@pytest.mark.parametrize("requires_grad", [True, False])
@pytest.mark.parametrize("f", [27, 60])
def test_opcheck_isqrt(f, requires_grad):
    a = spd(2, f).requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.aecr_ops.isqrt_newton_schulz.default, (a, 5))


@pytest.mark.parametrize("call,exc,words", [
    (lambda: aecr_ops.patch_statistics(torch.randn(3, 8, 8), 3), ValueError, "input"),
    (lambda: aecr_ops.patch_statistics(torch.randn(1, 4, 8, 8).long(), 3), TypeError, "input"),
    (lambda: aecr_ops.patch_statistics(torch.randn(1, 4, 8, 8).half(), 3), TypeError, "input"),
    (lambda: aecr_ops.patch_statistics(torch.randn(1, 4, 8, 8), 3, block=3), ValueError, "block"),
    (lambda: aecr_ops.patch_statistics(torch.randn(1, 4, 8, 8), 3, groups=3), ValueError, "groups"),
    (lambda: aecr_ops.patch_statistics(torch.randn(1, 4, 8, 8), 3, groups=2, block=4), ValueError, "block"),
    (lambda: aecr_ops.patch_statistics(torch.randn(1, 4, 8, 8), 0), ValueError, "kernel_size"),
    (lambda: aecr_ops.patch_statistics(torch.randn(1, 4, 8, 8), 3, sampling_stride=0), ValueError, "sampling"),
    (lambda: aecr_ops.patch_statistics(torch.randn(1, 4, 8, 8), 3, padding=-1), ValueError, "padding"),
    (lambda: aecr_ops.patch_statistics(torch.randn(1, 4, 2, 2), 5), RuntimeError, "does not fit"),
    (lambda: aecr_ops.patch_statistics(torch.randn(0, 4, 8, 8), 3), RuntimeError, "no patches"),
    (lambda: aecr_ops.isqrt_newton_schulz(torch.randn(3, 4)), ValueError, "`a`"),
    (lambda: aecr_ops.isqrt_newton_schulz(torch.randn(2, 2, 3, 3)), ValueError, "`a`"),
    (lambda: aecr_ops.isqrt_newton_schulz(torch.eye(3), n_iter=-1), ValueError, "n_iter"),
    (lambda: aecr_ops.isqrt_newton_schulz(torch.eye(3).long()), TypeError, "float"),
    (lambda: aecr_ops.isqrt_newton_schulz("eye"), TypeError, "Tensor"),
])
def test_bad_arguments(call, exc, words):
    with pytest.raises(exc, match=words):
        call()


def test_raw_ops_check_their_arguments():
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(RuntimeError, match="block"):
        torch.ops.aecr_ops.patch_statistics(x, [3, 3], [1, 1], [1, 1], 3, 3, 1, 0.0)
    with pytest.raises(RuntimeError, match="grad_cov"):
        torch.ops.aecr_ops.patch_statistics_backward(torch.zeros(1, 36), torch.zeros(1, 36, 35), x, torch.zeros(1, 36),
                                                     [3, 3], [1, 1], [1, 1], 3, 4, 1)
    with pytest.raises(RuntimeError, match="square"):
        torch.ops.aecr_ops.isqrt_newton_schulz(torch.zeros(1, 3, 4), 5)


def test_double_backward_is_a_clear_error():
    a = spd(1, 6).requires_grad_(True)
    d = aecr_ops.isqrt_newton_schulz(a, 3)
    (g,) = torch.autograd.grad(d.square().sum(), a, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


def _running_case(f=27, groups=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (f, f) if groups == 1 else (groups, f, f)
    running_mean = torch.randn(f * groups, generator=g, dtype=torch.float64)
    running_deconv = torch.randn(*shape, generator=g, dtype=torch.float64)
    mean = torch.randn(f * groups, generator=g, dtype=torch.float64)
    deconv = torch.randn(*shape, generator=g, dtype=torch.float64)
    return running_mean, running_deconv, mean, deconv


@pytest.mark.parametrize("groups", [1, 3])
def test_update_running_moves_both_buffers_by_momentum(groups):
    running_mean, running_deconv, mean, deconv = _running_case(groups=groups)
    expected = [r * (1 - 0.1) + s * 0.1 for r, s in ((running_mean, mean), (running_deconv, deconv))]
    finite = torch.ops.aecr_ops.fastdeconv_update_running(running_mean, running_deconv, mean, deconv, 0.1)
    assert finite.dtype == torch.bool and finite.shape == () and bool(finite)
    torch.testing.assert_close(running_mean, expected[0], rtol=0, atol=1e-15)
    torch.testing.assert_close(running_deconv, expected[1], rtol=0, atol=1e-15)


@pytest.mark.parametrize("where", ["mean", "deconv"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_update_running_leaves_both_buffers_alone_on_a_non_finite_statistic(where, bad):
    running_mean, running_deconv, mean, deconv = _running_case()
    before = running_mean.clone(), running_deconv.clone()
    (mean if where == "mean" else deconv).view(-1)[5] = bad
    finite = torch.ops.aecr_ops.fastdeconv_update_running(running_mean, running_deconv, mean, deconv, 0.1)
    assert not bool(finite)
    assert torch.equal(running_mean, before[0]) and torch.equal(running_deconv, before[1])


def test_update_running_rejects_mismatched_arguments():
    running_mean, running_deconv, mean, deconv = _running_case()
    with pytest.raises(RuntimeError, match="`deconv` must have the shape"):
        torch.ops.aecr_ops.fastdeconv_update_running(running_mean, running_deconv, mean, deconv[:3], 0.1)
    with pytest.raises(RuntimeError, match="one dtype"):
        torch.ops.aecr_ops.fastdeconv_update_running(running_mean, running_deconv, mean.float(), deconv, 0.1)


def test_update_running_opcheck():
    args = (*_running_case(f=9), 0.25)
    torch.library.opcheck(torch.ops.aecr_ops.fastdeconv_update_running.default, args)
