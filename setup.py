"""Build of aecr: one extension, aecr_ops._C, with CPU kernels always and CUDA kernels when possible.

Environment:
  FORCE_CUDA=1            build the CUDA kernels even without a visible GPU (fail if that is impossible)
  FORCE_CUDA=0            never build them
  TORCH_CUDA_ARCH_LIST    CUDA architectures, e.g. "9.0" (default: the visible GPUs, else a short list)
  CUDA_HOME               the CUDA toolkit (default: found from nvcc on the PATH, wrapper scripts included)
  MAX_JOBS                parallel compile jobs (ninja)
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "7.5;8.0;9.0+PTX"
# nvcc flags of the CUDA sources (benchmarks/cuda_resources.py reads both constants from this file).
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr"]


def fail(message):
    sys.exit(f"\naecr build error: {message}\n")


def toolkit_root(nvcc):
    """The toolkit folder of an nvcc, following symlinks and small wrapper scripts (`exec /x/bin/nvcc "$@"`)."""
    real = os.path.realpath(nvcc)
    home = os.path.dirname(os.path.dirname(real))
    if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
        return home
    try:
        with open(real, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if b"\0" in head:  # a real binary whose folder has no headers
        return None
    for target in re.findall(rb"(/[^\s\"']+/bin/nvcc)\b", head):
        target = target.decode()
        if os.path.realpath(target) != real and os.path.isfile(target):
            return toolkit_root(target)
    return None


def find_cuda_home():
    """The CUDA toolkit to build with, or None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = toolkit_root(nvcc)
        if home:
            return home
    for home in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return home
    return None


def nvcc_version(cuda_home):
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def cuda_plan(torch):
    """(build_cuda, cuda_home, why): whether to build the CUDA sources and why not."""
    force = os.environ.get("FORCE_CUDA")
    if force == "0":
        return False, None, "FORCE_CUDA=0"
    forced = force == "1"
    problem = None
    cuda_home = find_cuda_home()
    if torch.version.cuda is None:
        problem = f"torch {torch.__version__} is a CPU-only build"
    elif cuda_home is None:
        problem = "no CUDA toolkit found (set CUDA_HOME to the folder holding bin/nvcc)"
    elif not os.path.isfile(os.path.join(cuda_home, "include", "cuda_runtime.h")):
        problem = f"CUDA_HOME={cuda_home} has no include/cuda_runtime.h: not a usable CUDA toolkit"
    else:
        version = nvcc_version(cuda_home)
        torch_major = int(torch.version.cuda.split(".")[0])
        if version is None:
            problem = f"{cuda_home}/bin/nvcc does not run"
        elif version[0] != torch_major:
            problem = (f"nvcc {version[0]}.{version[1]} in {cuda_home} does not match the CUDA {torch.version.cuda} "
                       f"that torch {torch.__version__} was built with")
    if problem:
        if forced:
            fail(f"FORCE_CUDA=1 but the CUDA kernels cannot be built: {problem}")
        return False, cuda_home, problem
    return True, cuda_home, None


def main():
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        fail(f"no C++ compiler found ({os.environ.get('CXX', 'c++')}); install g++ (e.g. apt install g++) or set CXX")
    try:
        import torch
    except ImportError:
        fail("PyTorch must be installed before building aecr: pip install torch, then "
             "pip install --no-build-isolation -e .")

    build_cuda, cuda_home, why_not = cuda_plan(torch)
    if build_cuda:
        os.environ["CUDA_HOME"] = cuda_home  # read when torch.utils.cpp_extension is imported
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = ["csrc/ops.cpp", "csrc/autocast.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")]
    # at::parallel_for only runs in parallel when the extension itself is compiled with OpenMP (it links the
    # libgomp that torch already loaded: one runtime).
    cxx_flags = ["-O3", "-fopenmp"]
    link_flags = ["-fopenmp"]
    if build_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        # Toolkits without the cuBLAS/cuSPARSE headers: those of the pip CUDA packages, when present.
        for pip_cuda in glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu*", "include")):
            include_dirs.append(os.path.abspath(pip_cuda))
        extension = CUDAExtension(
            "aecr_ops._C", sources, include_dirs=include_dirs, extra_link_args=link_flags,
            extra_compile_args={"cxx": cxx_flags, "nvcc": list(NVCC_FLAGS)})
    else:
        extension = CppExtension("aecr_ops._C", sources, include_dirs=include_dirs, extra_link_args=link_flags,
                                 extra_compile_args={"cxx": cxx_flags})

    print("aecr build configuration:")
    print(f"  torch {torch.__version__} (CUDA {torch.version.cuda}), python {sys.version.split()[0]}")
    if build_cuda:
        print(f"  CUDA kernels: yes, toolkit {cuda_home}, archs {os.environ.get('TORCH_CUDA_ARCH_LIST', 'visible GPUs')}")
    else:
        print(f"  CUDA kernels: no ({why_not})")

    setup(
        packages=find_packages(include=["aecr_ops", "aecr_ops.*", "aecr_model", "aecr_model.*"]),
        # The demo's reference network and its training log (aecr_model/demo.py: REFERENCE).
        package_data={"aecr_model": ["assets/*.pt", "assets/*.log"]},
        ext_modules=[extension],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
    )


main()
