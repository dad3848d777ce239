import atexit
import os
import shutil
import sys
import tempfile

import pytest
import torch

# cuBLAS is deterministic only with a fixed workspace; set before CUDA starts (deterministic-mode tests).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
# torch.compile's on-disk cache can hand back a graph compiled against another build of the ops (another schema,
# same op names): the tests compile into a cache of their own, removed at exit.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="aecr-tests-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

sys.path.insert(0, os.path.dirname(__file__))

import aecr_ops  # noqa: E402

if not aecr_ops.extension_loaded():
    raise RuntimeError("the compiled kernels are not built: run `pip install --no-build-isolation -e .` first")

HAS_CUDA = torch.cuda.is_available() and aecr_ops.cuda_kernels_built()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU and the CUDA kernels")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)
    # Tests of what the emulated tests did (marked after_emulation) run once they all have.
    items.sort(key=lambda item: item.get_closest_marker("after_emulation") is not None)


@pytest.fixture(scope="session")
def emulated(tmp_path_factory):
    """Every CUDA kernel and its driver built for the CPU emulator (tests/emulation.py), with the launch check
    on the registers and launch bounds of the real build."""
    import emulation
    module = emulation.build(tmp_path_factory.mktemp("cuda_emulation"))
    module.set_resources(emulation.resource_table(), True)
    return module


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
