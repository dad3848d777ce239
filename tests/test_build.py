"""The build script's messages when it cannot build (run as subprocesses; nothing is compiled)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_setup(**env):
    return subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_missing_compiler_is_named():
    result = run_setup(CXX="no-such-compiler-xyz")
    assert result.returncode != 0
    assert "no C++ compiler found (no-such-compiler-xyz)" in result.stderr


def test_forced_cuda_without_a_usable_toolkit_says_why():
    result = run_setup(FORCE_CUDA="1", CUDA_HOME=os.path.join(ROOT, "no-such-toolkit"))
    assert result.returncode != 0
    assert "FORCE_CUDA=1 but the CUDA kernels cannot be built" in result.stderr
