"""The machine a run measured, and where its saved runs live.

Runs are kept per machine kind, ``benchmarks/results/<kind>/<YYYY-MM-DD-HHMMSS>-<size>.json`` (pytest-benchmark's
``--benchmark-json`` output), each with its scaling plot beside it (``...-<size>-scaling.png``). The kind names
the hardware whose figures can be compared: ``cpu-<lscpu model>-f<family>m<model>-<cores>-cores`` or
``cuda-<GPU name>``.
``last_committed_run`` is the run a new one is compared with: the latest run of the same kind and size that git
tracks (every run there, outside a git checkout).

torch is imported only inside functions: bench_memory.py's parent process must not import it.
"""
import datetime
import os
import platform
import re
import subprocess

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def lscpu():
    """lscpu's fields ({} where lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    fields = (line.split(":", 1) for line in out.splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in fields}


def cpu_model(fields=None):
    """lscpu's "Model name" (platform.processor() where lscpu is missing)."""
    fields = lscpu() if fields is None else fields
    return fields.get("Model name") or platform.processor() or platform.machine()


def facts(uses_cuda):
    """What pytest-benchmark's machine_info lacks: the CPU as lscpu names it, the libraries, the GPU."""
    import torch

    import aecr_ops
    fields = lscpu()
    info = {"cpu_model": cpu_model(fields), "cpu_family": fields.get("CPU family"),
            "cpu_model_number": fields.get("Model"), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "aecr_cuda_kernels": aecr_ops.cuda_kernels_built(), "gpu": None, "cudnn": None}
    try:
        import torchvision
        info["torchvision"] = torchvision.__version__
    except ImportError:
        info["torchvision"] = None
    if uses_cuda and torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_capability=f"{properties.major}.{properties.minor}",
                    cudnn=torch.backends.cudnn.version())
    info["machine_kind"] = kind(info)
    return info


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower().replace("(r)", "").replace("(tm)", "")).strip("-")


def kind(info):
    """The machine kind of facts(): the GPU's when the run used one, else the CPU's, with its family and model
    numbers (a virtual machine's model name may be only "AMD EPYC": the numbers tell its generation) and cores."""
    if info.get("gpu"):
        return f"cuda-{slug(info['gpu'])}"
    generation = f"-f{info['cpu_family']}m{info['cpu_model_number']}" if info.get("cpu_family") else ""
    return f"cpu-{slug(info['cpu_model'])}{generation}-{info['cpu_count']}-cores"


def new_run_path(root, machine_kind, size, now=None):
    """A fresh file name for this run's JSON: root/<kind>/<date-time>-<size>.json (names sort by time)."""
    now = now or datetime.datetime.now()
    folder = os.path.join(root, machine_kind)
    os.makedirs(folder, exist_ok=True)
    while True:
        path = os.path.join(folder, f"{now:%Y-%m-%d-%H%M%S}-{size}.json")
        if not os.path.exists(path):
            return path
        now += datetime.timedelta(seconds=1)  # a run in the same second: the next second keeps the order


def plot_path(json_path):
    """The scaling plot beside a run's JSON."""
    return os.path.splitext(json_path)[0] + "-scaling.png"


def tracked_files(folder):
    """The names git tracks in folder, or None where folder is not in a git checkout."""
    try:
        inside = subprocess.run(["git", "-C", folder, "rev-parse", "--is-inside-work-tree"], capture_output=True,
                                text=True, timeout=10)
        if inside.returncode != 0 or inside.stdout.strip() != "true":
            return None
        listed = subprocess.run(["git", "-C", folder, "ls-files", "--", "."], capture_output=True, text=True,
                                timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return {os.path.basename(line) for line in listed.stdout.splitlines()}


def last_committed_run(root, machine_kind, size):
    """The latest committed run of this kind and size (see the module's docstring), or None."""
    folder = os.path.join(root, machine_kind)
    if not os.path.isdir(folder):
        return None
    runs = sorted(name for name in os.listdir(folder) if name.endswith(f"-{size}.json"))
    tracked = tracked_files(folder)
    if tracked is not None:
        runs = [name for name in runs if name in tracked]
    return os.path.join(folder, runs[-1]) if runs else None
