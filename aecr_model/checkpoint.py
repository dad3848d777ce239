"""Checkpoints: this project's (written atomically, recording the architecture), official AECR-Net and FFA-Net
files, and plain state dicts."""
import os
import re
import tempfile
from typing import Any, Dict, Optional

import torch

from torch import nn

from .architectures import ARCHITECTURES, arch_of, build_model, check_arch, infer_from_state_dict

FORMAT = "aecr-net-checkpoint"
FORMAT_VERSION = 1
# The released AECR-Net weights name the two mixups mix4 and mix5.
_RENAMES = {"mix4.": "mix1.", "mix5.": "mix2."}
# AECR-Net built on mmcv's DCNv2 (mmcv.ops.ModulatedDeformConv2dPack) instead of CharlesShang/DCNv2's DCN names the
# offset/mask convolution `dcn.conv_offset` where DCN (and aecr_ops.DCN) name it `dcn.conv_offset_mask`; mmcv's
# version-1 layers kept it beside the layer, as `dcn_offset`. The tensors are the same: both layers are
# Conv2d(C_in, 3*dg*kh*kw, kernel, stride, padding) whose output goes through torch.chunk(out, 3, dim=1) into
# (o1, o2, m), offset = cat(o1, o2), mask = sigmoid(m) (CharlesShang/DCNv2 dcn_v2.py DCN.forward at 65b936e5;
# mmcv/ops/modulated_deform_conv.py ModulatedDeformConv2dPack.forward at f127a737 and 0093647e), and both
# kernels read offset channel 2*(g*kh*kw + k) as dy, the next as dx, and mask channel g*kh*kw + k
# (modulated_deformable_im2col_gpu_kernel in DCNv2's src/cuda/dcn_v2_im2col_cuda.cu and in mmcv's
# modulated_deform_conv_cuda_kernel.cuh). So the keys are renamed and the tensors kept as they are.
_MMCV_DCN_KEYS = (re.compile(r"^(.*\.)?dcn\.conv_offset\.(weight|bias)$"),
                  re.compile(r"^(.*\.)?dcn_offset\.(weight|bias)$"))


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or holds none of this package's networks."""


def save_atomic(obj: Any, path: str) -> None:
    """torch.save to a temporary file in the same folder, then rename it over `path`: a crash or a full disk
    midway leaves the previous file intact."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path), dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path: str, model: nn.Module, **training_state: Any) -> None:
    """Writes `model` (with its architecture and constructor arguments, and any training state: optimizer,
    step, metrics, ...) to `path` atomically."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    save_atomic({"format": FORMAT, "version": FORMAT_VERSION, "arch": arch_of(model), "config": dict(model.config),
                 "model": model.state_dict(), **training_state}, path)


def _torch_load(path: str, map_location) -> Any:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure to read is reported the same way
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error


def _numpy_globals():
    """What official files pickle beside tensors (numpy scalars and arrays of metrics), under the names of
    numpy 1 and numpy 2, for torch.load's safe (weights_only) unpickler."""
    import numpy as np
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1
        from numpy.core import multiarray
    out = [np.dtype, np.ndarray]
    for name in ("scalar", "_reconstruct"):
        fn = getattr(multiarray, name)
        out += [fn, (fn, f"numpy.core.multiarray.{name}"), (fn, f"numpy._core.multiarray.{name}")]
    out += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    return out


def _mmcv_dcn_key(key: str) -> str:
    for pattern in _MMCV_DCN_KEYS:
        match = pattern.match(key)
        if match:
            return f"{match.group(1) or ''}dcn.conv_offset_mask.{match.group(2)}"
    return key


def normalise_state_dict(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Strips DataParallel's `module.` prefixes, maps the official mix4/mix5 names to mix1/mix2, and the DCN
    layers' mmcv names (`dcn.conv_offset.*`, mmcv's older `dcn_offset.*`) to `dcn.conv_offset_mask.*`."""
    out = {}
    for key, value in state.items():
        while key.startswith("module."):
            key = key[len("module."):]
        for old, new in _RENAMES.items():
            if key.startswith(old):
                key = new + key[len(old):]
        out[key] = value
    renamed = {}
    for key, value in out.items():
        new = _mmcv_dcn_key(key)
        # A file holding two names of one tensor keeps the extra one, so that loading reports it instead of
        # picking one silently.
        if new != key and (new in out or new in renamed):
            new = key
        renamed[new] = value
    return renamed


def read_checkpoint(path: str, map_location=None, arch: Optional[str] = None) -> Dict[str, Any]:
    """The checkpoint as a dict with at least "model" (a normalised state dict), "arch" and "config".

    The architecture is the one the file records; files that record none (official releases, plain state
    dicts) are recognised by their keys, or taken as `arch` when given. An `arch` that contradicts the file's
    record is refused."""
    if arch is not None:
        check_arch(arch)
    obj = _torch_load(path, map_location)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint or a state dict")
    if "model" in obj and isinstance(obj["model"], dict):
        ckpt = dict(obj)
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        ckpt = {"model": obj}
    else:
        raise CheckpointError(f"{path} is neither a checkpoint (a dict with 'model') nor a state dict; keys: "
                              f"{sorted(obj)[:8]}")
    ckpt["model"] = normalise_state_dict(ckpt["model"])
    recorded = ckpt.get("arch")
    if recorded is not None and recorded not in ARCHITECTURES:
        raise CheckpointError(f"{path} records the architecture {recorded!r}, which this version does not know "
                              f"({', '.join(ARCHITECTURES)})")
    if recorded is not None and arch is not None and arch != recorded:
        raise CheckpointError(f"{path} holds a {recorded!r} network, not {arch!r} (leave out the architecture: "
                              f"the file names its own)")
    try:
        inferred_arch, inferred = infer_from_state_dict(ckpt["model"])
    except ValueError as error:
        raise CheckpointError(f"{path}: {error}") from None
    if recorded is None and arch is not None and arch != inferred_arch:
        raise CheckpointError(f"{path} holds, by its keys, a {inferred_arch!r} network, not {arch!r}")
    ckpt["arch"] = recorded or inferred_arch
    ckpt["config"] = {**inferred, **ckpt.get("config", {})}
    return ckpt



def load_checkpoint(path: str, map_location: Optional[Any] = None, arch: Optional[str] = None) -> nn.Module:
    """Loads the network of this project's checkpoints (of any architecture in ARCHITECTURES), official
    AECR-Net files (the state dict under "model", `module.` prefixes, `mix4`/`mix5` names), AECR-Net files whose
    DCN layers were mmcv's ModulatedDeformConv2dPack (`dcn.conv_offset` keys), official FFA-Net files
    (`its_train_ffa_3_19.pk`: the DataParallel state dict under "model") or a plain state dict. `arch` names
    the architecture of a file that does not record it (it is otherwise recognised by its keys). Returns the
    model in eval mode."""
    ckpt = read_checkpoint(path, map_location, arch)
    try:
        model = build_model(ckpt["arch"], **ckpt["config"])
    except ValueError as error:
        raise CheckpointError(f"{path}: cannot build its {ckpt['arch']!r} network: {error}") from None
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit {ckpt['arch']} ({_describe(ckpt['config'])}): missing keys "
                              f"{missing[:6]}, unexpected keys {unexpected[:6]}")
    if map_location is not None:
        model.to(_device_of(map_location))
    return model.eval()


def _describe(config: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items())


def _device_of(map_location):
    if isinstance(map_location, (str, torch.device)):
        return torch.device(map_location)
    return "cpu"
