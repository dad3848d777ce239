"""ONNX export: the DCN op as ONNX DeformConv, the whole model in ONNX Runtime, the export/dehaze CLI.

Skipped when onnx, onnxscript or onnxruntime is missing (`pip install 'aecr[onnx]'`; the test command installs
them)."""

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

import aecr_ops  # noqa: E402
import aecr_ops.onnx  # noqa: E402
from aecr_model import AECRNet, save_checkpoint  # noqa: E402
from aecr_model.cli import main  # noqa: E402
from aecr_model.inference import dehaze_tensor  # noqa: E402
from aecr_model.onnx_export import OnnxDehazer, export_onnx  # noqa: E402


def relative_error(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)


class DeformLayer(torch.nn.Module):
    """ModulatedDeformConv2d whose offsets and mask are inputs of the graph."""

    def __init__(self, **kw):
        super().__init__()
        self.layer = aecr_ops.ModulatedDeformConv2d(**kw)

    def forward(self, x, offset, mask):
        return self.layer(x, offset, mask)


def export_and_run(module, inputs, path, dynamic_shapes=None):
    program = torch.onnx.export(module, inputs, dynamo=True, opset_version=19, dynamic_shapes=dynamic_shapes,
                                custom_translation_table=aecr_ops.onnx.translation_table(), verbose=False)
    program.save(str(path))
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("kw,size", [
    (dict(in_channels=8, out_channels=6, kernel_size=3, padding=1), (11, 13)),
    (dict(in_channels=8, out_channels=4, kernel_size=(3, 2), stride=2, padding=(1, 0), dilation=(1, 2), groups=2,
          deformable_groups=4), (15, 14)),
    (dict(in_channels=4, out_channels=4, kernel_size=1, bias=False), (7, 9)),
])
def test_deform_conv_exports_to_onnx_deformconv(tmp_path, kw, size):
    torch.manual_seed(0)
    module = DeformLayer(**kw).eval()
    if module.layer.bias is not None:
        with torch.no_grad():
            module.layer.bias.normal_()
    x = torch.randn(2, kw["in_channels"], *size)
    kh, kw_ = module.layer.kernel_size
    ho, wo = _out_size(module.layer, size)
    offset = 1.5 * torch.randn(2, 2 * module.layer.deformable_groups * kh * kw_, ho, wo)
    mask = torch.rand(2, module.layer.deformable_groups * kh * kw_, ho, wo)
    session = export_and_run(module, (x, offset, mask), tmp_path / "layer.onnx")
    assert any(node.op_type == "DeformConv" for node in onnx.load(str(tmp_path / "layer.onnx")).graph.node)
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), (x, offset, mask))}
    with torch.no_grad():
        expected = module(x, offset, mask).numpy()
    assert relative_error(session.run(None, feeds)[0], expected) < 1e-4


def _out_size(layer, size):
    return tuple((s + 2 * p - (d * (k - 1) + 1)) // st + 1
                 for s, p, d, k, st in zip(size, layer.padding, layer.dilation, layer.kernel_size, layer.stride))


def test_dcn_module_with_dynamic_shapes(tmp_path):
    torch.manual_seed(1)
    layer = aecr_ops.DCN(8, 8, 3, 1, 1).eval()
    with torch.no_grad():
        layer.conv_offset_mask.weight.normal_(0, 0.1)
    dim = torch.export.Dim
    session = export_and_run(layer, (torch.randn(2, 8, 16, 20),), tmp_path / "dcn.onnx",
                             dynamic_shapes={"input": {0: dim("b"), 2: dim("h"), 3: dim("w")}})
    for shape in ((2, 8, 16, 20), (1, 8, 9, 13), (3, 8, 32, 8)):
        x = torch.randn(shape)
        with torch.no_grad():
            expected = layer(x).numpy()
        assert relative_error(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0], expected) < 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    model = AECRNet(ngf=16).eval()
    with torch.no_grad():  # trained-looking state: offsets in use, FastDeconv buffers moved from their start
        model.dcn_block.dcn.conv_offset_mask.weight.normal_(0, 1e-2)
        model.deconv.running_mean.normal_(0, 0.1)
        model.deconv.running_deconv.add_(0.05 * torch.eye(27))
    path = export_onnx(model, str(base / "model.onnx"))
    return model, path, base


def test_whole_model_agrees_with_pytorch_at_several_sizes(exported):
    model, path, _ = exported
    onnx.checker.check_model(onnx.load(path), full_check=True)
    graph_ops = {node.op_type for node in onnx.load(path).graph.node}
    assert "DeformConv" in graph_ops and not any("aecr" in op for op in graph_ops)
    dehazer = OnnxDehazer(path)
    for shape in ((1, 3, 64, 64), (2, 3, 48, 80), (1, 3, 37, 53), (1, 3, 30, 45)):
        hazy = torch.rand(shape)
        expected = dehaze_tensor(model, hazy)
        got = dehazer(hazy)
        assert got.shape == hazy.shape
        assert relative_error(got, expected) < 1e-4, shape


def test_export_refuses_old_opsets(exported, tmp_path):
    model, _, _ = exported
    with pytest.raises(ValueError, match="opset 19"):
        export_onnx(model, str(tmp_path / "old.onnx"), opset=17)


def test_cli_export_and_dehaze_with_onnx(exported, tmp_path):
    model, _, base = exported
    ckpt = str(tmp_path / "model.pt")
    save_checkpoint(ckpt, model)
    out_onnx = str(tmp_path / "cli.onnx")
    assert main(["export", "--checkpoint", ckpt, "--out", out_onnx]) == 0
    from PIL import Image
    image = (torch.rand(41, 59, 3) * 255).byte().numpy()
    Image.fromarray(image).save(tmp_path / "photo.png")
    assert main(["dehaze", str(tmp_path / "photo.png"), "--onnx", out_onnx, "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 0
    assert main(["dehaze", str(tmp_path / "photo.png"), "--checkpoint", ckpt, "--out", str(tmp_path / "p"),
                 "--no-progress"]) == 0
    a = np.asarray(Image.open(tmp_path / "o" / "photo.png"), dtype=np.int32)
    b = np.asarray(Image.open(tmp_path / "p" / "photo.png"), dtype=np.int32)
    assert a.shape == (41, 59, 3) and np.abs(a - b).max() <= 1  # 8-bit rounding of nearly equal values
    assert main(["dehaze", str(tmp_path / "photo.png"), "--out", str(tmp_path / "q")]) == 2


def test_the_session_uses_the_threads_asked_for_and_does_not_spin(exported):
    _, path, _ = exported
    options = OnnxDehazer(path, threads=3).session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (3, 1)
    for pool in ("intra_op", "inter_op"):
        assert options.get_session_config_entry(f"session.{pool}.allow_spinning") == "0"
