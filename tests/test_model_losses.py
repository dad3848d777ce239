"""Contrastive regularisation: hand-checkable values, negatives, ablation, and the VGG19 weights policy."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("torchvision")  # VGG19

from aecr_model.losses import CR_WEIGHTS, ContrastiveRegularization, VGGWeightsError, vgg19_features  # noqa: E402


@pytest.fixture(scope="module")
def cr():
    return ContrastiveRegularization("random", seed=3)


def images(seed, n=2, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def test_zero_when_restored_equals_clear(cr):
    clear, hazy = images(0), images(1)
    assert cr(clear.clone(), clear, hazy).item() == 0.0


def test_sum_of_weights_when_negative_equals_positive(cr):
    # d_ap / d_an = 1 at every layer, so CR = 1/32 + 1/16 + 1/8 + 1/4 + 1 (up to the 1e-7 in the denominator).
    restored, clear = images(0), images(1)
    assert cr(restored, clear, clear.clone()).item() == pytest.approx(sum(CR_WEIGHTS), rel=1e-4)
    assert sum(CR_WEIGHTS) == pytest.approx(1.46875)


def test_value_matches_a_direct_computation(cr):
    restored, clear, hazy = images(0), images(1), images(2)
    a, p, n = cr.features(restored), cr.features(clear), cr.features(hazy)
    expected = sum(w * F.l1_loss(a[i], p[i]) / (F.l1_loss(a[i], n[i]) + 1e-7) for i, w in enumerate(CR_WEIGHTS))
    assert cr(restored, clear, hazy).item() == pytest.approx(expected.item(), rel=1e-6)
    assert [t.shape[1] for t in a] == [64, 128, 256, 512, 512]  # relu1_1 ... relu5_1


def test_several_negatives_from_the_batch():
    cr3 = ContrastiveRegularization("random", num_negatives=3, seed=3)
    restored, clear, hazy = images(0, n=4), images(1, n=4), images(2, n=4)
    a, p, n = cr3.features(restored), cr3.features(clear), cr3.features(hazy)
    expected = 0.0
    for i, w in enumerate(CR_WEIGHTS):
        d_an = sum(F.l1_loss(a[i], torch.roll(n[i], s, 0)) for s in range(3)) / 3
        expected += w * F.l1_loss(a[i], p[i]) / (d_an + 1e-7)
    assert cr3(restored, clear, hazy).item() == pytest.approx(float(expected), rel=1e-6)
    # More negatives than the batch: capped at the batch size.
    cr9 = ContrastiveRegularization("random", num_negatives=9, seed=3)
    assert torch.isfinite(cr9(restored[:2], clear[:2], hazy[:2]))


def test_ablation_is_the_positive_only_perceptual_loss():
    ab = ContrastiveRegularization("random", ablation=True, seed=3)
    restored, clear, hazy = images(0), images(1), images(2)
    a, p = ab.features(restored), ab.features(clear)
    expected = sum(w * F.l1_loss(a[i], p[i]) for i, w in enumerate(CR_WEIGHTS))
    assert ab(restored, clear, hazy).item() == pytest.approx(expected.item(), rel=1e-6)


def test_only_the_restored_image_gets_gradients(cr):
    restored = images(0).requires_grad_(True)
    clear, hazy = images(1).requires_grad_(True), images(2).requires_grad_(True)
    cr(restored, clear, hazy).backward()
    assert restored.grad is not None and restored.grad.abs().sum() > 0
    assert clear.grad is None and hazy.grad is None
    assert all(p.grad is None for p in cr.parameters())


def test_missing_weights_are_refused_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    with pytest.raises(VGGWeightsError, match="--vgg-weights"):
        vgg19_features(None)
    with pytest.raises(VGGWeightsError, match="does not exist"):
        vgg19_features(str(tmp_path / "nope.pth"))


def test_weights_from_a_file_and_from_the_cache(tmp_path, monkeypatch):
    from torchvision.models import vgg19
    torch.manual_seed(5)
    full = vgg19(weights=None)
    path = tmp_path / "vgg19.pth"
    torch.save(full.state_dict(), path)
    features = vgg19_features(str(path))
    assert torch.equal(features[0].weight, full.features[0].weight)
    assert all(not p.requires_grad for p in features.parameters()) and not features.training
    # The same file in torchvision's cache is found without naming it.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    from aecr_model.losses import vgg19_cache_path
    cache = vgg19_cache_path()
    (tmp_path / "home" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save({"features." + k: v for k, v in full.features.state_dict().items()}, cache)
    assert torch.equal(vgg19_features(None)[28].weight, full.features[28].weight)


def test_random_vgg_is_seeded_and_logged(caplog):
    with caplog.at_level("WARNING"):
        a = vgg19_features("random", seed=7)
    b = vgg19_features("random", seed=7)
    assert torch.equal(a[0].weight, b[0].weight)
    assert "RANDOMLY INITIALISED" in caplog.text
