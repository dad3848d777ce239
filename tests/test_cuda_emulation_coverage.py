"""Every CUDA kernel of the real build ran under the emulator in this test session, in every instantiation (dtype)
the build has: benchmarks/cuda_resources.json lists the instantiations (tests/test_cuda_resources.py checks that it
covers every __global__ kernel declared in csrc/cuda/), the emulator records each launch. A new kernel, or a new
dtype of one, without an emulated test fails here; so does a session in which no emulated test ran (a coverage check
that skips then would pass a suite that tested nothing). A launch counts only once it completed: one stopped by a
failed check did not cover its kernel."""
import pytest

import emulation


@pytest.mark.after_emulation
@pytest.mark.slow
def test_every_cuda_kernel_ran_under_the_emulator(emulated):
    launched = emulated.launched()
    built = emulation.instantiations()
    assert set(launched) & built, ("no CUDA kernel ran under the emulator in this session: run this test with the "
                                   "emulated tests (tests/test_cuda_emulation_*.py), which are marked slow")
    missing = sorted(built - set(launched))
    assert not missing, f"CUDA kernels with no emulated run in this session: {missing}"
