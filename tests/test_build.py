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


def setup_constant(name):
    import ast
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"setup.py has no {name}")


def test_default_architectures_run_on_t4_to_hopper():
    # Review D9: without a visible GPU the build used "8.0;9.0+PTX", which has no image for T4-class GPUs
    # (compute capability 7.5): every kernel failed there with "no kernel image is available".
    archs = setup_constant("DEFAULT_ARCH_LIST").split(";")
    assert {"7.5", "8.0"} <= set(archs) and archs[-1].endswith("+PTX")


def test_tensor_core_kernels_trap_where_they_are_not_built():
    # Review D9: below sm_80 the implicit path's kernels compile without their body; run anyway (a build JIT-
    # compiled from older PTX), they must trap rather than return garbage. The host also checks what was loaded.
    with open(os.path.join(ROOT, "csrc", "cuda", "deform_conv_implicit_kernels.cuh")) as f:
        source = f.read()
    kernels = [k for k in source.split("__global__")[1:] if "#ifdef AECR_TENSOR_CORES" in k.split("\n}\n")[0]]
    assert len(kernels) == 3  # forward, input gradient, weight gradient
    for kernel in kernels:
        assert "#else\n  __trap();\n#endif\n}" in kernel, kernel[:200]
    with open(os.path.join(ROOT, "csrc", "cuda", "deform_conv_implicit.cu")) as f:
        assert "binaryVersion >= 80 && attributes.ptxVersion >= 80" in f.read()
