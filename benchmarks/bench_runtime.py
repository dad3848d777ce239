"""Where and how a benchmark of the suite runs: its device and precision, the CUDA variant of aecr's DCN, and
`measure`, the suite's one timer (pytest-benchmark's, with CUDA synchronised).

Precisions: "fp32" (float32, TF32 off), "tf32" (float32 with TF32 allowed in matmuls and cuDNN) and "bf16"
(bfloat16 tensors, or bf16 autocast for the network). The CPU runs fp32 only: aecr's CPU kernels are float32 and
float64, and torchvision has no bf16 CPU kernel.
"""
import contextlib
import os

import pytest
import torch

DEVICES = ("cpu", "cuda")
PRECISIONS = {"cpu": ("fp32",), "cuda": ("fp32", "tf32", "bf16")}

# aecr's variants on CUDA: name -> (AECR_DCN_CUDA_PATH, torch.use_deterministic_algorithms). On the CPU there
# is one implementation, "aecr" (deterministic by construction).
CUDA_VARIANTS = {
    "aecr-simple": ("simple", False),
    "aecr-simple-deterministic": ("simple", True),
    "aecr-implicit": ("implicit", False),
    "aecr-implicit-deterministic": ("implicit", True),
}


def selected_devices(config):
    """The devices --bench-device asks for (a CUDA case without a GPU is generated, then skipped)."""
    choice = config.getoption("bench_device")
    return DEVICES if choice == "all" else (choice,)


def require_device(device):
    """Skips the calling benchmark when its device is missing here."""
    if device == "cuda":
        import aecr_ops
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
        if not aecr_ops.cuda_kernels_built():
            pytest.skip("aecr_ops was built without its CUDA kernels")


def dtype_of(precision):
    return torch.bfloat16 if precision == "bf16" else torch.float32


def aecr_variants(device):
    """aecr's implementation names on this device, each with (CUDA path, deterministic)."""
    return dict(CUDA_VARIANTS) if device == "cuda" else {"aecr": (None, False)}


@contextlib.contextmanager
def precision_mode(device, precision):
    """TF32 on for "tf32", off otherwise (CUDA); the previous settings come back afterwards."""
    if device != "cuda":
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


@contextlib.contextmanager
def dcn_variant(path=None, deterministic=False):
    """AECR_DCN_CUDA_PATH (None: left alone) and deterministic mode, both restored afterwards."""
    previous_path = os.environ.get("AECR_DCN_CUDA_PATH")
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    if path is not None:
        os.environ["AECR_DCN_CUDA_PATH"] = path
    torch.use_deterministic_algorithms(deterministic)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous_deterministic)
        if previous_path is None:
            os.environ.pop("AECR_DCN_CUDA_PATH", None)
        else:
            os.environ["AECR_DCN_CUDA_PATH"] = previous_path


def skip_unless_path(requested, actual):
    """A CUDA variant whose path would not run here (implicit in fp32 without TF32, or below compute capability
    8.0) is skipped rather than measured under a name it does not deserve."""
    if requested is not None and actual != requested:
        pytest.skip(f"not applicable: runs the {actual} path")


def synchronised(fn):
    """fn, then torch.cuda.synchronize()."""
    def call():
        result = fn()
        torch.cuda.synchronize()
        return result
    return call


def measure(benchmark, fn, device, rounds=None, warmup_rounds=0):
    """Times fn() with pytest-benchmark; returns fn's result.

    rounds=None: pytest-benchmark decides: one call to calibrate, then max(min_rounds, 1 s / call) timed rounds
    (--benchmark-min-rounds, --benchmark-max-time, or the test's benchmark mark), then one more call for the
    result. rounds=N: exactly N timed calls after warmup_rounds untimed ones and nothing else (pedantic mode), for
    calls of tens of seconds, where the calibration and the extra call would triple the cost.

    On CUDA every call ends with torch.cuda.synchronize(), and the queue is drained before the first, so that a
    round lasts until the GPU has finished its work rather than until the host has queued it."""
    call = fn
    if device == "cuda":
        call = synchronised(fn)
        torch.cuda.synchronize()
    if rounds is None:
        return benchmark(call)
    return benchmark.pedantic(call, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)


class ProcessCosts:
    """Wraps fn so that each completed call's process costs are summed (getrusage of the whole process, every thread):
    minor page faults and system CPU time, which the wall-clock timer alone does not explain. The first
    ``skip`` calls (untimed warm-ups) are not counted. ``record(benchmark)`` puts the means per counted call into
    its extra_info."""

    def __init__(self, fn, skip=0):
        self.fn, self.skip, self.calls, self.minor_faults, self.system_s = fn, skip, 0, 0, 0.0

    def __call__(self):
        import resource
        before = resource.getrusage(resource.RUSAGE_SELF)
        result = self.fn()
        after = resource.getrusage(resource.RUSAGE_SELF)
        if self.skip:
            self.skip -= 1
        else:
            self.calls += 1
            self.minor_faults += after.ru_minflt - before.ru_minflt
            self.system_s += after.ru_stime - before.ru_stime
        return result

    def record(self, benchmark):
        if self.calls:
            benchmark.extra_info["minor_faults_per_call"] = round(self.minor_faults / self.calls)
            benchmark.extra_info["system_s_per_call"] = round(self.system_s / self.calls, 3)
