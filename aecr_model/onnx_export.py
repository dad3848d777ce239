"""AECR-Net (or any network of ARCHITECTURES) as a standard ONNX model, and dehazing with ONNX Runtime (no compiled code of this project needed).

Export uses PyTorch's current exporter (torch.onnx.export(..., dynamo=True)) with aecr_ops' translation of the
DCN op to ONNX DeformConv (opset >= 19); FastDeconv exports as the plain convolution it is in eval mode. Batch,
height and width are dynamic (height and width multiples of 4, as the network needs; `OnnxDehazer` pads any
size). Needs `pip install onnx onnxscript onnxruntime` (or `pip install 'aecr[onnx]'`).
"""
import os
from typing import Iterable, List, Optional

import numpy as np
import torch
from torch import Tensor

from .data import DataError, load_image, save_image


class OnnxUnavailable(RuntimeError):
    pass


def _require(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise OnnxUnavailable(f"ONNX export and inference need `{module}`: pip install onnx onnxscript onnxruntime "
                              f"(or pip install 'aecr[onnx]')") from None


def export_onnx(model: torch.nn.Module, path: str, opset: int = 19, example_size=(64, 64)) -> str:
    """Writes `model` (eval mode) to `path` as ONNX with dynamic batch, height and width; checks it with
    onnx.checker. Returns path."""
    import aecr_ops.onnx
    if opset < aecr_ops.onnx.MIN_OPSET:
        raise ValueError(f"export: ONNX DeformConv needs opset {aecr_ops.onnx.MIN_OPSET} or later, got {opset}")
    onnx = _require("onnx")
    _require("onnxscript")
    model = model.eval().cpu()
    example = torch.rand(1, getattr(model, "config", {}).get("in_channels", 3), *example_size)
    # Height and width: multiples of what the network needs (4 for AECR-Net, which halves them twice).
    multiple = getattr(model, "size_multiple", 1)
    if multiple > 1:
        height = multiple * torch.export.Dim("height_units", min=2)
        width = multiple * torch.export.Dim("width_units", min=2)
    else:
        height, width = torch.export.Dim("height", min=2), torch.export.Dim("width", min=2)
    dynamic = {"x": {0: torch.export.Dim("batch", min=1), 2: height, 3: width}}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with torch.no_grad():
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset, input_names=["hazy"],
                                    output_names=["dehazed"], dynamic_shapes=dynamic,
                                    custom_translation_table=aecr_ops.onnx.translation_table(), verbose=False)
    tmp = os.path.join(folder, ".tmp-" + os.path.basename(path))
    program.save(tmp)
    onnx.checker.check_model(onnx.load(tmp), full_check=True)
    os.replace(tmp, path)
    return path


class OnnxDehazer:
    """An exported AECR-Net run by ONNX Runtime: ``dehazer(hazy [B, 3, H, W] in [0, 1]) -> [B, 3, H, W]`` for any
    H and W (reflection-padded to multiples of 4, cropped back, clamped to [0, 1])."""

    def __init__(self, path: str, threads: Optional[int] = None):
        """threads: ONNX Runtime's intra-op threads (None: its default, one per core)."""
        ort = _require("onnxruntime")
        if not os.path.isfile(path):
            raise DataError(f"ONNX model not found: {path}")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1  # sequential execution: the inter-op pool has nothing to run
        # ONNX Runtime's pool threads otherwise spin after each run, waiting for more work, and take the cores
        # from whatever runs next in the process (PyTorch, in a benchmark: aecr's own call slowed down).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, hazy: Tensor) -> Tensor:
        from .inference import pad_to_multiple
        h, w = hazy.shape[-2:]
        x = pad_to_multiple(hazy.float().cpu()).numpy()
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(x)})[0]
        return torch.from_numpy(out[..., :h, :w]).clamp(0, 1)


def dehaze_files_onnx(onnx_path: str, inputs: Iterable[str], out_dir: str, progress: bool = False) -> List[str]:
    """Dehazes image files (or folders of them) with an exported model into out_dir/<input name>.png."""
    from .inference import expand_inputs
    dehazer = OnnxDehazer(onnx_path)
    files = expand_inputs(inputs)
    iterator = files
    if progress:
        from tqdm import tqdm
        iterator = tqdm(files, desc="dehaze (onnx)", unit="image")
    written = []
    for path in iterator:
        out = dehazer(load_image(path)[None])
        target = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + ".png")
        save_image(out[0], target)
        written.append(target)
    return written
