"""Loading of the compiled kernels (aecr_ops._C).

The package imports without them, so that `aecr_ops.reference` works on a machine with no compiler; every op
that needs them raises a RuntimeError saying how to build them.
"""
import torch

try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.aecr_ops.*)

    _load_error = None
except ImportError as error:  # not built, or built against another torch
    _load_error = error


def extension_loaded() -> bool:
    """Whether the compiled kernels are available."""
    return _load_error is None


def require_extension() -> None:
    if _load_error is not None:
        raise RuntimeError(
            f"aecr_ops: the compiled kernels (aecr_ops._C) could not be loaded: {_load_error}. Build them in the "
            "repository with `pip install --no-build-isolation -e .` against the torch you run "
            f"(this is torch {torch.__version__}). aecr_ops.reference works without them.")


def cuda_kernels_built() -> bool:
    """Whether the extension was compiled with its CUDA kernels."""
    return extension_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "aecr_ops::deform_conv2d", "CUDA")
