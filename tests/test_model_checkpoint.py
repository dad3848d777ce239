"""load_checkpoint for this project's files, official AECR-Net files and plain state dicts; atomic saving."""
import os

import numpy as np
import pytest
import torch

from aecr_model import AECRNet, load_checkpoint, save_checkpoint
from aecr_model.checkpoint import CheckpointError, save_atomic


def random_model(**kwargs):
    torch.manual_seed(1)
    model = AECRNet(**kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


def assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_official_file_with_module_prefix_and_mix4_mix5(tmp_path):
    model = random_model()
    official = {}
    for key, value in model.state_dict().items():
        key = key.replace("mix1.", "mix4.").replace("mix2.", "mix5.")
        official["module." + key] = value
    path = tmp_path / "its_train_ffa_3_19.pk"
    torch.save({"model": official, "optimizer": {"state": {}, "param_groups": []}, "step": 500000,
                "max_psnr": np.float64(37.17), "max_ssim": np.float64(0.99), "psnrs": [np.float64(30.1)],
                "ssims": np.array([0.9]), "losses": [0.1, 0.05]}, path)
    loaded = load_checkpoint(str(path))
    assert_same(loaded, model)
    assert not loaded.training


def test_plain_state_dict(tmp_path):
    model = random_model()
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    assert_same(load_checkpoint(str(tmp_path / "plain.pth")), model)


def test_our_checkpoint_and_unshared_config(tmp_path):
    model = random_model(share_weights=False, ngf=16)
    save_checkpoint(str(tmp_path / "ours.pt"), model, step=7)
    loaded = load_checkpoint(str(tmp_path / "ours.pt"), map_location="cpu")
    assert loaded.config == {"in_channels": 3, "out_channels": 3, "ngf": 16, "share_weights": False,
                             "fastdeconv": True, "dcn": True, "mixup": True}
    assert loaded.arch == "aecr-unshared"
    assert_same(loaded, model)


@pytest.mark.parametrize("content,words", [
    (b"not a checkpoint", "cannot read"),
    (None, "not found"),
])
def test_bad_files(tmp_path, content, words):
    path = tmp_path / "bad.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=words):
        load_checkpoint(str(path))


def test_wrong_contents(tmp_path):
    torch.save({"model": {"foo.weight": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a state dict of any of aecr.*ffa"):
        load_checkpoint(str(tmp_path / "other.pt"))
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError):
        load_checkpoint(str(tmp_path / "list.pt"))


def test_atomic_save_keeps_the_old_file_when_saving_fails(tmp_path):
    path = str(tmp_path / "last.pt")
    save_atomic({"step": 1}, path)
    with pytest.raises(Exception):
        save_atomic({"step": 2, "bad": lambda: None}, path)  # a lambda cannot be pickled
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind
