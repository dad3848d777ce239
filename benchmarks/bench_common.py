"""Pieces the benchmarks and the GPU check share: device synchronisation, atomic JSON files, freeing CUDA memory
after a failed measurement, running a part of the pytest-benchmark suite. It imports torch and pytest only where
needed: the GPU check runs before the build."""
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def sync(device):
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def write_json_atomic(path, document, **json_options):
    """Writes JSON through a temporary file in the same folder, fsync, then os.replace: never half a file, and no
    temporary file left behind when writing fails."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(document, f, **{"indent": 2, **json_options})
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def release_cuda_memory(device):
    """Frees cached blocks after a failed measurement; never raises (after a sticky CUDA error nothing works)."""
    if device != "cuda":
        return
    try:
        import torch
        torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass


def run_suite(files, pytest_args):
    """Runs these files of the suite (names in benchmarks/) with pytest --benchmark-only and more pytest options:
    what `python benchmarks/bench_dcn.py ...` and its siblings do. Returns pytest's exit code."""
    import pytest
    return int(pytest.main([os.path.join(HERE, name) for name in files] + ["--benchmark-only", *pytest_args]))
