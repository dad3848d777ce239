"""Training: the loss goes down, resuming is exact, failures keep the last good checkpoint."""
import os

import pytest
import torch

from aecr_model.checkpoint import read_checkpoint
from aecr_model.train import NonFiniteLoss, TrainConfig, cosine_lr, train
from model_helpers import tiny_reside


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_reside(tmp_path_factory.mktemp("train_data"), scenes=3, size=(32, 40), hazes=2)


def config(data, out, **kw):
    base = dict(data=data, out=str(out), steps=4, batch_size=2, crop=16, lr=1e-3, cr_weight=0.0, seed=3,
                progress=False, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


def quiet(message):
    pass


def test_cosine_schedule_is_the_official_one():
    assert cosine_lr(1, 100, 1e-4) == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(torch.pi / 100)).item()) * 1e-4)
    assert cosine_lr(100, 100, 1e-4) == pytest.approx(0.0, abs=1e-20)
    assert cosine_lr(50, 100, 2e-4) == pytest.approx(1e-4)


def test_short_training_lowers_the_loss(tmp_path):
    # One fixed image, no augmentation: the loss must fall clearly.
    root = tiny_reside(tmp_path / "one", scenes=1, size=(16, 16), hazes=1)
    summary = train(config(root, tmp_path / "run", steps=25, batch_size=1, lr=2e-3), echo=quiet)
    losses = summary["losses"]
    assert len(losses) == 25
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


def test_outputs_and_log(data, tmp_path):
    summary = train(config(data, tmp_path), echo=quiet)
    for name in ("last.pt", "best.pt", "train.log"):
        assert os.path.exists(tmp_path / name)
    ckpt = read_checkpoint(str(tmp_path / "last.pt"))
    assert ckpt["step"] == 4 and len(ckpt["losses"]) == 4 and summary["step"] == 4
    assert "step 4/4" in (tmp_path / "train.log").read_text()


def test_resume_is_bitwise_exact(data, tmp_path):
    train(config(data, tmp_path / "whole", steps=6), echo=quiet)
    train(config(data, tmp_path / "part", steps=6, stop_after=3), echo=quiet)
    assert read_checkpoint(str(tmp_path / "part" / "last.pt"))["step"] == 3
    train(config(data, tmp_path / "resumed", steps=6, resume=str(tmp_path / "part" / "last.pt")), echo=quiet)
    whole = read_checkpoint(str(tmp_path / "whole" / "last.pt"))
    resumed = read_checkpoint(str(tmp_path / "resumed" / "last.pt"))
    assert resumed["step"] == 6
    for key, value in whole["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert whole["losses"] == resumed["losses"]


def test_steps_is_the_total(data, tmp_path):
    train(config(data, tmp_path / "a", steps=4), echo=quiet)
    summary = train(config(data, tmp_path / "b", steps=8, resume=str(tmp_path / "a" / "last.pt")), echo=quiet)
    assert summary["step"] == 8 and len(summary["losses"]) == 8
    assert read_checkpoint(str(tmp_path / "b" / "last.pt"))["step"] == 8


def test_periodic_evaluation_keeps_the_best(data, tmp_path):
    summary = train(config(data, tmp_path, steps=4, val_data=data, eval_every=2), echo=quiet)
    ckpt = read_checkpoint(str(tmp_path / "last.pt"))
    assert [e["step"] for e in ckpt["evals"]] == [2, 4]
    best = read_checkpoint(str(tmp_path / "best.pt"))
    assert best["step"] == summary["best_step"] and summary["best_psnr"] == max(e["psnr"] for e in ckpt["evals"])


def test_a_diverging_run_keeps_the_last_good_checkpoint(data, tmp_path):
    train(config(data, tmp_path, steps=2), echo=quiet)
    good = read_checkpoint(str(tmp_path / "last.pt"))
    with pytest.raises(NonFiniteLoss, match="last good checkpoint"):
        train(config(data, tmp_path, steps=40, lr=1e30, resume=str(tmp_path / "last.pt")), echo=quiet)
    after = read_checkpoint(str(tmp_path / "last.pt"))
    assert after["step"] == 2
    assert all(torch.equal(v, after["model"][k]) for k, v in good["model"].items())


@pytest.mark.parametrize("kw,words", [
    (dict(crop=18), "multiple of 4"),
    (dict(steps=0), "steps"),
    (dict(lr=0.0), "lr"),
    (dict(eval_every=2), "val_data"),
    (dict(precision="fp16"), "precision"),
])
def test_bad_configs(data, tmp_path, kw, words):
    with pytest.raises(ValueError, match=words):
        train(config(data, tmp_path, **kw), echo=quiet)


def test_contrastive_regularisation_in_training(data, tmp_path):
    pytest.importorskip("torchvision")
    summary = train(config(data, tmp_path, steps=2, cr_weight=0.1, vgg_weights="random"), echo=quiet)
    assert summary["step"] == 2
    assert "cr 0.0000" not in (tmp_path / "train.log").read_text().split("step 1/2")[1].split("\n")[0]


@pytest.mark.cuda
def test_training_on_cuda_with_bf16_autocast(data, tmp_path):
    pytest.importorskip("torchvision")
    summary = train(config(data, tmp_path, steps=3, device="cuda", cr_weight=0.1, vgg_weights="random"), echo=quiet)
    assert summary["step"] == 3 and all(torch.isfinite(torch.tensor(summary["losses"])))
    assert "bf16 autocast" in (tmp_path / "train.log").read_text()


@pytest.mark.cuda
def test_cuda_and_cpu_models_agree_in_fp32(tmp_path):
    from aecr_model import AECRNet
    torch.manual_seed(0)
    model = AECRNet().eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        got = model.cuda()(x.cuda()).cpu()
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
