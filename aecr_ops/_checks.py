"""Argument normalisation and the exceptions raised for bad arguments.

The exceptions also derive from RuntimeError, the type torchvision raises for the same mistakes, so code written
against torchvision.ops.deform_conv2d keeps catching them.
"""
from typing import Sequence, Tuple, Union

import torch

IntPair = Union[int, Tuple[int, int], Sequence[int]]


class ArgumentError(ValueError, RuntimeError):
    """An argument has a wrong shape or value."""


class ArgumentTypeError(TypeError, RuntimeError):
    """An argument has a wrong type or dtype."""


def pair(value: IntPair, name: str, minimum: int, op: str) -> Tuple[int, int]:
    """Normalises an int or a pair of ints to a tuple, checking that both are >= minimum."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    try:
        items = tuple(value)
    except TypeError:
        raise ArgumentTypeError(f"{op}: `{name}` must be an int or a pair of ints, got {value!r}") from None
    if len(items) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise ArgumentTypeError(f"{op}: `{name}` must be an int or a pair of ints, got {value!r}")
    if min(items) < minimum:
        raise ArgumentError(f"{op}: `{name}` must be >= {minimum}, got {value!r}")
    return items


def tensor(t, name: str, dim: int, op: str, optional: bool = False):
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise ArgumentTypeError(f"{op}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ArgumentError(f"{op}: `{name}` must be {dim}-D, got shape {list(t.shape)}")


def same_dtype_and_device(t, name: str, like: torch.Tensor, op: str, check_dtype: bool = True):
    if t is None:
        return
    if check_dtype and t.dtype != like.dtype:
        raise ArgumentTypeError(f"{op}: `{name}` has dtype {t.dtype} but `input` has {like.dtype}; they must match")
    if t.device != like.device:
        raise ArgumentError(f"{op}: `{name}` is on {t.device} but `input` is on {like.device}")


def floating_dtype(t: torch.Tensor, name: str, op: str):
    if not t.dtype.is_floating_point:
        raise ArgumentTypeError(f"{op}: `{name}` must be a floating-point tensor, got {t.dtype}")
    if t.device.type == "cpu" and t.dtype not in (torch.float32, torch.float64):
        raise ArgumentTypeError(
            f"{op}: `{name}` has dtype {t.dtype}; on the CPU float32 and float64 are supported "
            "(float16 and bfloat16 run on CUDA)")
