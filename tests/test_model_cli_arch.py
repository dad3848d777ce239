"""Every architecture through the command line on tiny data: train (with and without contrastive
regularisation), evaluate, dehaze and export to ONNX, the checkpoint naming its own architecture."""
import json

import numpy as np
import pytest
import torch

from aecr_model import ARCHITECTURES, load_checkpoint
from aecr_model.cli import main
from aecr_model.data import load_image
from aecr_model.inference import dehaze_tensor
from model_helpers import tiny_reside

TINY = {"aecr": ["ngf=8"], "aecr-unshared": ["ngf=8"], "aecr-no-fastdeconv": ["ngf=8"], "aecr-no-dcn": ["ngf=8"],
        "aecr-no-mixup": ["ngf=8"], "ffa": ["blocks=1", "dim=16"]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_reside(tmp_path_factory.mktemp("arch") / "data", scenes=2, size=(24, 28), hazes=1)


def train(data, out, arch, *extra):
    options = [a for option in TINY[arch] for a in ("--model-option", option)]
    code = main(["train", "--data", data, "--out", str(out), "--arch", arch, *options, "--steps", "2",
                 "--batch-size", "2", "--crop", "16", "--lr", "1e-3", "--seed", "1", "--no-progress", *extra])
    assert code == 0
    return out / "last.pt"


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_trains_evaluates_dehazes_and_exports(data, tmp_path, arch, capsys):
    checkpoint = train(data, tmp_path / "run", arch, "--cr-weight", "0")
    ckpt = torch.load(checkpoint, weights_only=True)
    assert ckpt["arch"] == arch and ckpt["train_config"]["arch"] == arch
    assert "training " + arch in (tmp_path / "run" / "train.log").read_text()
    model = load_checkpoint(str(checkpoint))
    assert model.arch == arch

    scores = tmp_path / "scores.json"
    assert main(["evaluate", "--data", data, "--checkpoint", str(checkpoint), "--json", str(scores),
                 "--no-progress"]) == 0
    assert json.loads(scores.read_text())["n"] == 2

    hazy_dir = f"{data}/hazy"
    assert main(["dehaze", hazy_dir, "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    written = sorted((tmp_path / "out").iterdir())
    assert len(written) == 2

    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    onnx_path = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(onnx_path)]) == 0
    assert main(["dehaze", hazy_dir, "--onnx", str(onnx_path), "--out", str(tmp_path / "onnx_out"),
                 "--no-progress"]) == 0
    for ours, theirs in zip(written, sorted((tmp_path / "onnx_out").iterdir())):
        # Both went through 8-bit PNGs: at most one level apart.
        a, b = np.asarray(load_image(str(ours))), np.asarray(load_image(str(theirs)))
        assert np.abs(a - b).max() <= 1.5 / 255
    capsys.readouterr()


def test_ffa_net_trains_with_contrastive_regularisation(data, tmp_path):
    pytest.importorskip("torchvision")
    checkpoint = train(data, tmp_path / "cr", "ffa", "--cr-weight", "0.1", "--vgg-weights", "random",
                       "--negatives", "2")
    log = (tmp_path / "cr" / "train.log").read_text()
    assert "CR weight 0.1" in log
    ckpt = torch.load(checkpoint, weights_only=True)
    assert ckpt["train_config"]["cr_weight"] == 0.1 and ckpt["train_config"]["num_negatives"] == 2
    cr = [float(line.split(" cr ")[1].split()[0]) for line in log.splitlines() if " cr " in line]
    assert cr and all(value > 0 for value in cr), "the contrastive term must be part of the loss"
    # The positive-only ("perceptual") ablation of CR, on FFA-Net too.
    train(data, tmp_path / "perceptual", "ffa", "--cr-weight", "0.1", "--vgg-weights", "random", "--cr-ablation")


def test_resuming_needs_the_same_architecture(data, tmp_path, capsys):
    checkpoint = train(data, tmp_path / "run", "aecr-no-dcn", "--cr-weight", "0")
    code = main(["train", "--data", data, "--out", str(tmp_path / "run"), "--arch", "aecr", "--model-option", "ngf=8",
                 "--steps", "3", "--batch-size", "2", "--crop", "16", "--cr-weight", "0", "--resume", str(checkpoint),
                 "--no-progress"])
    assert code == 2 and "aecr-no-dcn" in capsys.readouterr().err


def test_arch_flags_are_checked(data, tmp_path, capsys):
    checkpoint = train(data, tmp_path / "run", "ffa", "--cr-weight", "0")
    assert main(["evaluate", "--data", data, "--checkpoint", str(checkpoint), "--arch", "aecr"]) == 2
    assert "not 'aecr'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--data", data, "--out", str(tmp_path / "x"), "--steps", "1", "--arch", "resnet"])
    assert main(["train", "--data", data, "--out", str(tmp_path / "x"), "--steps", "1", "--arch", "ffa",
                 "--unshared"]) == 2
    assert "--unshared" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--data", data, "--out", str(tmp_path / "x"), "--steps", "1", "--model-option", "ngf"])


def test_dehaze_tensor_pads_only_what_the_network_needs():
    from aecr_model import build_model
    ffa = build_model("ffa", blocks=1, dim=16).eval()
    x = torch.rand(1, 3, 13, 17)
    torch.testing.assert_close(dehaze_tensor(ffa, x), ffa(x).clamp(0, 1))


def test_profile_prints_the_table_and_writes_json(data, tmp_path, capsys):
    from aecr_model import build_model
    from aecr_model.network import count_parameters
    target = tmp_path / "profile.json"
    assert main(["profile", "--arch", "aecr", "aecr-no-dcn", "--model-option", "ngf=8", "--size", "32x48",
                 "--repeat", "1", "--json", str(target)]) == 0
    out = capsys.readouterr().out
    assert "GMACs" in out and "aecr-no-dcn" in out and "52.2" in out  # the published figure beside ours
    rows = json.loads(target.read_text())
    assert [row["arch"] for row in rows] == ["aecr", "aecr-no-dcn"]
    assert rows[0]["parameters"] == count_parameters(build_model("aecr", ngf=8))
    assert rows[0]["forward_macs"] > rows[1]["forward_macs"] > 0  # the DCN layers are counted
    checkpoint = train(data, tmp_path / "run", "ffa", "--cr-weight", "0")
    assert main(["profile", "--checkpoint", str(checkpoint), "--size", "16", "--repeat", "1"]) == 0
    assert "ffa" in capsys.readouterr().out
    assert main(["profile", "--arch", "aecr", "--size", "30", "--repeat", "1"]) == 2  # not a multiple of 4
    assert "size" in capsys.readouterr().err
