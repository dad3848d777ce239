"""Keeping freed host memory inside the process while a large CPU forward runs (glibc only).

Why: glibc serves every block above its mmap threshold (at most 32 MB) with a fresh mmap and unmaps it on free,
and trims the top of its heap when more than the trim threshold (128 KB by default) is free there. A 720 x 1280
AECR-Net forward makes dozens of tensors of 59 to 240 MB, so each of them came back as fresh pages that the kernel
had to fault in and zero: 1.85 million minor faults (7 GB) and 6 to 15 s of system time per call on a 2-core EPYC.
Inside :func:`retain_freed_memory`, freed blocks stay in the heap and are reused by the next tensors instead.

glibc's settings are process-wide and have no getter, so the scope is counted (nested and concurrent scopes share
one) and the outermost exit sets them back, then gives the retained memory back with ``malloc_trim(0)``. Set back
to what: where the environment sets any of them (``GLIBC_TUNABLES``, ``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_MAX_``), glibc's thresholds were fixed from the start, and they get the
environment's values, or glibc's defaults for those it leaves out. Otherwise glibc's thresholds were dynamic, which
no mallopt call can turn back on; they are then fixed where the dynamic ones settle once the process has freed a
block of 32 MiB or more (as any PyTorch process working on images has): mmap threshold 32 MiB, trim threshold
64 MiB. (Fixing them at the 128 KiB start values instead would mmap, and fault in afresh, every tensor above
128 KiB for the rest of the process.) Everywhere but glibc (musl, macOS, Windows) the scope does nothing.
"""
import contextlib
import ctypes
import os
import sys
import threading
from typing import Dict, Iterator, Mapping, Optional

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
_INT_MAX = 2 ** 31 - 1  # mallopt takes a C int
_RETAINING = {M_TRIM_THRESHOLD: _INT_MAX, M_MMAP_MAX: 0}
_GLIBC_DEFAULTS = {M_MMAP_THRESHOLD: 128 * 1024, M_TRIM_THRESHOLD: 128 * 1024, M_MMAP_MAX: 65536}
_DYNAMIC_SETTLED = {M_MMAP_THRESHOLD: 32 * 2 ** 20, M_TRIM_THRESHOLD: 64 * 2 ** 20, M_MMAP_MAX: 65536}
_ENVIRONMENT = {M_MMAP_THRESHOLD: ("MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold"),
                M_TRIM_THRESHOLD: ("MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold"),
                M_MMAP_MAX: ("MALLOC_MMAP_MAX_", "glibc.malloc.mmap_max")}

_lock = threading.Lock()
_depth = 0
_libc = None
_libc_probed = False


def glibc() -> Optional[ctypes.CDLL]:
    """The process's C library when it is glibc (it has ``gnu_get_libc_version``), else None."""
    global _libc, _libc_probed
    if not _libc_probed:
        _libc_probed = True
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None)
                for name in ("gnu_get_libc_version", "mallopt", "malloc_trim"):  # AttributeError: not glibc
                    getattr(libc, name)
                libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                libc.malloc_trim.argtypes = [ctypes.c_size_t]
                _libc = libc
            except (OSError, AttributeError):
                _libc = None
    return _libc


def _tunables(text: str) -> Dict[str, str]:
    """``GLIBC_TUNABLES`` ("name=value:name=value") as a dict."""
    pairs = (item.split("=", 1) for item in text.split(":") if "=" in item)
    return {name.strip(): value.strip() for name, value in pairs}


def _environment_value(param: int, environ, tunables: Dict[str, str]) -> Optional[int]:
    variable, tunable = _ENVIRONMENT[param]
    text = tunables.get(tunable, environ.get(variable))
    try:
        return None if text is None else min(int(text, 0), _INT_MAX)
    except ValueError:  # glibc ignores it too
        return None


def restored_settings(environ: Optional[Mapping[str, str]] = None) -> Dict[int, int]:
    """{mallopt parameter: the value the outermost scope sets back} (see the module docstring); environ:
    os.environ by default."""
    environ = os.environ if environ is None else environ
    tunables = _tunables(environ.get("GLIBC_TUNABLES", ""))
    given = {param: _environment_value(param, environ, tunables) for param in _ENVIRONMENT}
    fallback = _DYNAMIC_SETTLED if all(value is None for value in given.values()) else _GLIBC_DEFAULTS
    return {param: fallback[param] if value is None else value for param, value in given.items()}


def retaining() -> bool:
    """Whether a :func:`retain_freed_memory` scope is active (in any thread)."""
    return _depth > 0


@contextlib.contextmanager
def retain_freed_memory(enabled: bool = True) -> Iterator[None]:
    """While inside: glibc keeps freed memory in the process (no mmap'ed blocks, no heap trimming), so large
    temporaries reuse pages already faulted in. On leaving the outermost scope: glibc's settings set back (see
    the module docstring), and the kept memory returned to the system. Re-entrant and thread-safe; a no-op
    unless ``enabled`` and on glibc."""
    global _depth
    libc = glibc() if enabled else None
    if libc is None:
        yield
        return
    with _lock:
        if _depth == 0:
            for param, value in _RETAINING.items():
                libc.mallopt(param, value)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for param, value in restored_settings().items():
                    libc.mallopt(param, value)
                libc.malloc_trim(0)
