"""The GPU check, after the build: CUDA tests, compute-sanitizer, benchmarks; one JSON of results.

Run by benchmarks/gpu_check.sh on a GPU machine. Writes OUT/gpu_check.json and the logs beside it.
"""
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.environ.get("OUT") or os.path.join(ROOT, "gpu_check_out")


def run(name, command, timeout, env=None):
    """Runs a command, logs it to OUT/<name>.log; returns (exit code, seconds, log tail)."""
    start = time.time()
    log_path = os.path.join(OUT, f"{name}.log")
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                                env={**os.environ, **(env or {})}).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    with open(log_path) as log:
        tail = log.read()[-3000:]
    print(f"[{name}] rc={rc} in {time.time() - start:.0f}s", flush=True)
    return rc, round(time.time() - start, 1), tail


def pytest_summary(tail):
    match = re.findall(r"^=*\s*(\d+ (?:passed|failed|errors?|skipped|deselected).*?) in [\d.]+s", tail, re.M)
    return match[-1] if match else None


def main():
    os.makedirs(OUT, exist_ok=True)
    import aecr_ops
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cuda_kernels_built": aecr_ops.cuda_kernels_built(),
    }
    try:
        import torchvision
        result["torchvision"] = torchvision.__version__
    except ImportError:
        result["torchvision"] = None

    rc, secs, tail = run("cuda_tests", [sys.executable, "-m", "pytest", "tests", "-m", "cuda", "-q", "-rfE",
                                        "-p", "no:cacheprovider"], timeout=240)
    result["cuda_tests"] = {"exit_code": rc, "seconds": secs, "summary": pytest_summary(tail)}

    sanitizer = shutil.which("compute-sanitizer")
    if sanitizer:
        rc, secs, tail = run("memcheck", [sanitizer, "--tool", "memcheck", "--error-exitcode", "7",
                                          sys.executable, "benchmarks/sanitizer_case.py"], timeout=180)
        errors = re.findall(r"ERROR SUMMARY: (\d+) error", tail)
        result["memcheck"] = {"exit_code": rc, "seconds": secs, "errors": int(errors[-1]) if errors else None,
                              "tail": tail[-600:]}
    else:
        result["memcheck"] = {"exit_code": None, "note": "compute-sanitizer not on the PATH"}

    result["benchmarks"] = []
    for label, dtype, extra in (("float32", "float32", []), ("tf32", "float32", ["--tf32"]),
                                ("bfloat16", "bfloat16", [])):
        path = os.path.join(OUT, f"bench_dcn_{label}.json")
        rc, secs, tail = run(f"bench_dcn_{label}", [sys.executable, "benchmarks/bench_dcn.py", "--device", "cuda",
                                                     "--dtype", dtype, "--shapes", "16x256x64", "--warmup", "3",
                                                     "--repeat", "15", "--json", path] + extra, timeout=120)
        print(tail[-1200:], flush=True)
        if rc == 0 and os.path.exists(path):
            with open(path) as f:
                result["benchmarks"].extend(json.load(f)["results"])
        else:
            result["benchmarks"].append({"dtype": dtype, "exit_code": rc, "tail": tail[-600:]})

    path = os.path.join(OUT, "bench_fastdeconv.json")
    rc, secs, tail = run("bench_fastdeconv", [sys.executable, "benchmarks/bench_fastdeconv.py", "--device", "cuda",
                                              "--warmup", "3", "--repeat", "20", "--json", path], timeout=120)
    print(tail[-1200:], flush=True)
    if rc == 0 and os.path.exists(path):
        with open(path) as f:
            result["fastdeconv"] = json.load(f)["results"]
    else:
        result["fastdeconv"] = {"exit_code": rc, "tail": tail[-600:]}

    path = os.path.join(OUT, "bench_model.json")
    rc, secs, tail = run("bench_model", [sys.executable, "benchmarks/bench_model.py", "--device", "cuda",
                                         "--warmup", "2", "--repeat", "10", "--inference-repeat", "5", "--json", path],
                         timeout=200)
    print(tail[-1200:], flush=True)
    if rc == 0 and os.path.exists(path):
        with open(path) as f:
            result["model"] = json.load(f)
    else:
        result["model"] = {"exit_code": rc, "tail": tail[-600:]}

    result["targets"] = targets(result)
    with open(os.path.join(OUT, "gpu_check.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k not in ("benchmarks", "fastdeconv", "model")}, indent=1))


def targets(result):
    """The GPU targets of the performance issue, each with its measured value and whether it is met."""
    rows = []

    def add(what, measured, goal, higher_is_better):
        met = None if measured is None else (measured >= goal if higher_is_better else measured <= goal)
        rows.append({"target": what, "goal": goal, "measured": measured, "met": met})

    for bench in result.get("benchmarks", []):
        if "aecr_ops_implicit" not in bench:
            continue
        label = bench["dtype"] + ("+tf32" if bench.get("tf32") else "")
        for impl in ("aecr_ops_implicit", "aecr_ops_simple"):
            ours = bench[impl]
            add(f"DCN {bench['shape']} {label} {impl}: fwd+bwd speed-up vs torchvision",
                ours.get("speedup_vs_torchvision_forward_backward"), 3.0, True)
            add(f"DCN {bench['shape']} {label} {impl}: fwd+bwd time / cuDNN conv2d",
                ours.get("ratio_to_conv2d_forward_backward"), 1.5, False)
            det = bench.get(impl + "_deterministic", {})
            add(f"DCN {bench['shape']} {label} {impl}: deterministic / default fwd+bwd",
                det.get("ratio_to_default_forward_backward"), 2.0, False)
    for row in result.get("fastdeconv", []) if isinstance(result.get("fastdeconv"), list) else []:
        if row["shape"] == "aecr_16x3x256":
            add("FastDeconv step 16x3x256x256: speed-up vs the original", row["speedup"], 3.0, True)
    model = result.get("model", {})
    for row in model.get("training", []) if isinstance(model, dict) else []:
        for impl, value in row["speedup"].items():
            add(f"AECR-Net training step {row['precision']} {impl}: speed-up vs torchvision + original FastDeconv",
                value, 1.5, True)
    return rows


if __name__ == "__main__":
    main()
