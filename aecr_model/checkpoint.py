"""Checkpoints: this project's (written atomically), official AECR-Net files, and plain state dicts."""
import os
import tempfile
from typing import Any, Dict, Optional

import torch

from .network import AECRNet, config_from_state_dict

FORMAT = "aecr-net-checkpoint"
FORMAT_VERSION = 1
# The released AECR-Net weights name the two mixups mix4 and mix5.
_RENAMES = {"mix4.": "mix1.", "mix5.": "mix2."}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or is not an AECR-Net checkpoint."""


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


def save_checkpoint(path: str, model: AECRNet, **training_state: Any) -> None:
    """Writes `model` (and any training state: optimizer, step, metrics, ...) to `path` atomically."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    save_atomic({"format": FORMAT, "version": FORMAT_VERSION, "config": dict(model.config),
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


def normalise_state_dict(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Strips DataParallel's `module.` prefixes and maps the official mix4/mix5 names to mix1/mix2."""
    out = {}
    for key, value in state.items():
        while key.startswith("module."):
            key = key[len("module."):]
        for old, new in _RENAMES.items():
            if key.startswith(old):
                key = new + key[len(old):]
        out[key] = value
    return out


def read_checkpoint(path: str, map_location=None) -> Dict[str, Any]:
    """The checkpoint as a dict with at least "model" (a normalised state dict) and "config"."""
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
    try:
        inferred = config_from_state_dict(ckpt["model"])
    except ValueError as error:
        raise CheckpointError(f"{path}: {error}") from None
    ckpt["config"] = {**inferred, **ckpt.get("config", {})}
    return ckpt


def load_checkpoint(path: str, map_location: Optional[Any] = None) -> AECRNet:
    """Loads an AECRNet from this project's checkpoints, official AECR-Net files (the state dict under
    "model", `module.` prefixes, `mix4`/`mix5` names) or a plain state dict. Returns it in eval mode."""
    ckpt = read_checkpoint(path, map_location)
    model = AECRNet(**ckpt["config"])
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit AECRNet({_describe(ckpt['config'])}): missing keys "
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
