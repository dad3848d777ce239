"""The CPU emulator of CUDA (tests/cuda_emulation) for the emulated tests: the module of every CUDA kernel with
its real driver, built once per session, and the kernels' resources from the real build.

The fixture `emulated` (conftest.py) builds the module (under a minute on 2 cores) and loads benchmarks/cuda_resources.json:
registers and launch bounds of each kernel, which the emulator's launch check uses; with it loaded, a kernel the
table does not know may not launch (so no new kernel runs untried by that check).
"""
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMULATOR = os.path.join(ROOT, "tests", "cuda_emulation")
RESOURCES = os.path.join(ROOT, "benchmarks", "cuda_resources.json")
SOURCES = ["emulated_kernels.cpp", "broken_kernels.cpp", "textbook_kernels.cpp", "emulator.cpp", "memory.cpp", "workspaces.cpp", "traffic.cpp"]


def build(build_directory):
    from torch.utils.cpp_extension import load
    return load("aecr_cuda_emulation", [os.path.join(EMULATOR, f) for f in SOURCES],
                extra_include_paths=[os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include"), EMULATOR],
                extra_cflags=["-O2", "-std=c++20"], build_directory=str(build_directory), verbose=False)


def resource_table(path=RESOURCES):
    """Kernel name -> (registers, launch bound, static shared bytes), the most over the build's architectures."""
    with open(path) as f:
        kernels = json.load(f)["kernels"]
    table = {}
    for name, entry in kernels.items():
        archs = [v for k, v in entry.items() if k.startswith("sm_")]
        bounds = [a["max_threads"] for a in archs if a["max_threads"]]
        table[name] = (max(a["registers"] for a in archs), min(bounds) if bounds else -1,
                       max(a["shared_bytes"] for a in archs))
    return table


def instantiations(path=RESOURCES):
    """Every kernel instantiation of the real build (`im2col_kernel<c10::Half>`)."""
    with open(path) as f:
        return set(json.load(f)["kernels"])
