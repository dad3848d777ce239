"""The aecr-net command line end to end on tiny data."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from aecr_model.cli import main
from model_helpers import tiny_reside

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    data = tiny_reside(base / "data", scenes=3, size=(32, 36), hazes=2)
    out = base / "run"
    try:
        import torchvision  # noqa: F401  (VGG19 for the contrastive loss)
        cr = ["--cr-weight", "0.1", "--vgg-weights", "random"]
    except ImportError:
        cr = ["--cr-weight", "0"]
    code = main(["train", "--data", data, "--out", str(out), "--steps", "3", "--batch-size", "2", "--crop", "16",
                 "--lr", "1e-3", "--device", "cpu", *cr, "--seed", "1", "--no-progress"])
    assert code == 0
    return base, data, out


def test_train_writes_last_and_best(trained):
    _, _, out = trained
    assert (out / "last.pt").exists() and (out / "best.pt").exists() and (out / "train.log").exists()


def test_evaluate_prints_and_writes_json(trained, capsys, tmp_path):
    _, data, out = trained
    target = tmp_path / "scores.json"
    assert main(["evaluate", "--data", data, "--checkpoint", str(out / "last.pt"), "--device", "cpu",
                 "--json", str(target), "--no-progress"]) == 0
    scores = json.loads(target.read_text())
    assert scores["n"] == 6 and 0 < scores["psnr"] < 100 and -1 <= scores["ssim"] <= 1
    assert "PSNR" in capsys.readouterr().out


def test_evaluate_dcp_and_hazy_need_no_checkpoint(trained, tmp_path):
    _, data, _ = trained
    results = {}
    for method in ("dcp", "hazy"):
        target = tmp_path / f"{method}.json"
        assert main(["evaluate", "--data", data, "--method", method, "--device", "cpu", "--json", str(target),
                     "--no-progress"]) == 0
        results[method] = json.loads(target.read_text())
    assert results["dcp"]["psnr"] != results["hazy"]["psnr"]


def test_dehaze_any_size_keeps_names_and_sizes(trained, tmp_path):
    _, _, out = trained
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name, size in (("a.png", (37, 53)), ("b.jpg", (20, 31))):
        Image.fromarray((torch.rand(size[0], size[1], 3) * 255).byte().numpy()).save(inputs / name)
    assert main(["dehaze", str(inputs / "a.png"), str(inputs / "b.jpg"), "--checkpoint", str(out / "last.pt"),
                 "--out", str(tmp_path / "out"), "--device", "cpu", "--no-progress"]) == 0
    assert Image.open(tmp_path / "out" / "a.png").size == (53, 37)
    assert Image.open(tmp_path / "out" / "b.png").size == (31, 20)


def test_errors_are_clear_and_exit_2(trained, tmp_path, capsys):
    _, data, out = trained
    assert main(["evaluate", "--data", str(tmp_path / "missing"), "--method", "dcp"]) == 2
    assert "data folder not found" in capsys.readouterr().err
    assert main(["dehaze", str(tmp_path / "nope.png"), "--checkpoint", str(out / "last.pt"),
                 "--out", str(tmp_path)]) == 2
    assert "input not found" in capsys.readouterr().err
    assert main(["evaluate", "--data", data, "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["evaluate", "--data", data]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    pytest.importorskip("torchvision")
    assert main(["train", "--data", data, "--out", str(tmp_path / "r"), "--steps", "1", "--cr-weight", "0.1",
                 "--vgg-weights", str(tmp_path / "no_vgg.pth"), "--crop", "16", "--batch-size", "1"]) == 2
    assert "VGG19" in capsys.readouterr().err


def test_python_dash_m_entry_point(tmp_path):
    result = subprocess.run([sys.executable, "-m", "aecr_model", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and "train" in result.stdout and "demo" in result.stdout


@pytest.mark.slow
def test_demo_end_to_end_tiny_with_a_reference_it_wrote(tmp_path):
    from aecr_model.demo import run_demo
    lines = []
    first = run_demo(str(tmp_path / "a"), steps=3, batch_size=2, crop=32, train_scenes=2, test_scenes=2,
                     size=(40, 48), progress=False, echo=lines.append, reference=None,
                     write_reference=str(tmp_path / "ref.pt"))
    assert set(first["results"]) == {"hazy input", "Dark Channel Prior", "AECR-Net (this run, 3 steps)"}
    for name in ("comparison.png", "loss_curve.png", "results.json"):
        assert (tmp_path / "a" / name).exists()
    assert Image.open(tmp_path / "a" / "comparison.png").size[0] > 4 * 48
    assert any("PSNR" in line for line in lines) and any(line.startswith("demo time: ") for line in lines)
    assert (tmp_path / "ref.log").read_text().count("step 3/3") == 1

    # The reference holds float16 weights that load into the float32 network.
    reference = torch.load(tmp_path / "ref.pt", weights_only=True)
    assert reference["weights_dtype"] == "float16" and reference["arch"] == "aecr" and reference["step"] == 3
    assert "optimizer" not in reference
    trained = torch.load(tmp_path / "a" / "run" / "last.pt", weights_only=True)["model"]
    for key, value in reference["model"].items():
        if value.is_floating_point():
            assert value.dtype == torch.float16
            torch.testing.assert_close(value.float(), trained[key], rtol=1e-3, atol=1e-4)
    second = run_demo(str(tmp_path / "b"), steps=2, batch_size=2, crop=32, train_scenes=2, test_scenes=2,
                      size=(40, 48), progress=False, echo=lines.append, reference=str(tmp_path / "ref.pt"))
    assert list(second["results"]) == ["hazy input", "Dark Channel Prior", "AECR-Net (shipped, 3 steps)",
                                       "AECR-Net (this run, 2 steps)"]
    assert second["reference"] == str(tmp_path / "ref.pt")
    # Five columns: hazy | DCP | reference | this run | clear.
    assert Image.open(tmp_path / "b" / "comparison.png").size[0] == 5 * 48 + 4 * 4


def test_best_in_both():
    from aecr_model.demo import best_in_both
    assert best_in_both({"a": {"psnr": 20, "ssim": 0.8}, "b": {"psnr": 19, "ssim": 0.7}}) == "a"
    assert best_in_both({"a": {"psnr": 20, "ssim": 0.7}, "b": {"psnr": 19, "ssim": 0.8}}) is None


@pytest.mark.slow
def test_distributed_training_with_torchrun_on_cpu(trained, tmp_path):
    _, data, _ = trained
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         "-m", "aecr_model", "train", "--data", data, "--out", str(tmp_path / "ddp"), "--steps", "2",
         "--batch-size", "2", "--crop", "16", "--cr-weight", "0", "--no-progress"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    from aecr_model.checkpoint import read_checkpoint
    assert read_checkpoint(str(tmp_path / "ddp" / "last.pt"))["step"] == 2
