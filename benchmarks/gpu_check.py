"""The GPU check: build, CUDA tests, compute-sanitizer, the benchmark suite, in that order; one JSON of results.

Run by benchmarks/gpu_check.sh (which sets the environment and an outer time limit); see there for the usage.
Correctness comes before speed: the build, then the CUDA tests (the simple DCN path and FastDeconv first), then
the four compute-sanitizer tools on benchmarks/sanitizer_case.py, then the pytest-benchmark suite on CUDA
(benchmarks/test_*.py with --bench-device cuda, in five parts: the DCN groups and sweeps in fp32, the DCN groups in
TF32 and in bf16, FastDeconv, AECR-Net), each part writing its results after every benchmark
(--bench-progress-json), so that a part stopped at its limit keeps what it measured.

Every step runs as a subprocess with its own time limit (its whole process group is killed at the limit); the
limits add up to less than the run's outer limit. OUT/gpu_check.json is rewritten atomically (a temporary file in
OUT, then os.replace) after every step, with the targets recomputed, so a timeout or a crash keeps everything
measured before it. All step output goes to one log, OUT/gpu_check.log; nothing else is written to OUT.

--dry-run walks the same steps on a machine without a GPU, with the CUDA work left out: the build step imports
aecr_ops instead of building, the test steps collect the same selections (pytest --collect-only), the sanitizer
steps look for compute-sanitizer and run sanitizer_case.py on the CPU, the benchmark steps run the same parts of
the suite on tiny shapes with one round, on the CPU (the CUDA cases collected and skipped), so that their
selection, the results file and targets() run. Their status is then "dry-run" (or "failed": an error found before
a GPU is spent on it).

This file uses the standard library only: it never imports torch itself, so it runs before the build.
"""
import argparse
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import bench_common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA_VERSION = 2
OUTER_LIMIT_S = 590          # gpu_check.sh's timeout around this script (the device tool allows 600 s a command)
HARNESS_MARGIN_S = 8         # kept back from the outer limit for the final JSON and the summary
STATUSES = ("ok", "failed", "timeout", "unsupported", "skipped", "dry-run")
TAIL_CHARS = 1500
LOG_NAME = "gpu_check.log"
JSON_NAME = "gpu_check.json"
MAX_LOG_BYTES = 15 * 2**20   # files that come back from the GPU machine: 16 MiB each at most

CORE_TESTS = ["tests/test_deform_conv_cuda.py", "tests/test_fastdeconv_cuda.py"]
REST_TESTS = ["tests"] + [f"--ignore={path}" for path in CORE_TESTS]
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")
SANITIZER_GROUPS = ["simple", "fastdeconv", "implicit"]
# memcheck, racecheck and synccheck check only the project's kernels (their mangled names hold the namespace
# aecr): cuBLAS/cuDNN/ATen kernels are not ours and are slow under the tools. initcheck checks every kernel: it
# follows which bytes were written, and writes by kernels it does not instrument would look uninitialised.
# Retried without the filter if this compute-sanitizer refuses it.
SANITIZER_KERNEL_FILTER = "kns=aecr"
SANITIZER_FILTERED = ("memcheck", "racecheck", "synccheck")
DCN_SHAPE = "16x256x64x64"   # AECR-Net's DCN layer: B16, 256 -> 256 channels, 64 x 64, 3 x 3
# The suite's parts, one step each: (kind of results, test files, -k selection).
SUITE_PARTS = {
    "bench_dcn_float32": ("dcn", ["benchmarks/test_dcn.py", "benchmarks/test_dcn_scaling.py"], "fp32"),
    "bench_dcn_tf32": ("dcn", ["benchmarks/test_dcn.py"], "tf32"),
    "bench_dcn_bfloat16": ("dcn", ["benchmarks/test_dcn.py"], "bf16"),
    "bench_fastdeconv": ("fastdeconv", ["benchmarks/test_fastdeconv.py"], None),
    "bench_model": ("model", ["benchmarks/test_model.py"], None),
}
# pytest-benchmark's rounds on the GPU: as many as fit in 0.2 s a benchmark (at least 5; the network's: 3).
SUITE_REAL = ["--bench-device", "cuda", "--bench-size", "full", "--benchmark-max-time=0.2"]
# The dry run: tiny shapes, one round, every device (the CUDA cases skip); ONNX Runtime's export (CPU only,
# seconds) is left to CI's run of the suite.
SUITE_DRY = ["--bench-device", "all", "--bench-size", "tiny", "--benchmark-min-rounds=1", "--benchmark-max-time=0"]

# (name, limit in seconds): the order in which the steps run. The sum stays below OUTER_LIMIT_S - margin.
STEPS = [
    ("environment", 20),
    ("build", 195),
    ("cuda_tests_simple_fastdeconv", 80),
    ("cuda_tests_rest", 40),
    ("sanitizer_memcheck", 25),
    ("sanitizer_racecheck", 25),
    ("sanitizer_synccheck", 20),
    ("sanitizer_initcheck", 35),
    ("bench_dcn_float32", 40),
    ("bench_dcn_tf32", 20),
    ("bench_dcn_bfloat16", 20),
    ("bench_fastdeconv", 20),
    ("bench_model", 35),
]

ENV_SNIPPET = r"""
import json, platform, sys
info = {"python": platform.python_version(), "executable": sys.executable}
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), capability=f"{p.major}.{p.minor}",
                    multiprocessors=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                    device_count=torch.cuda.device_count())
except Exception as error:
    info["torch_error"] = f"{type(error).__name__}: {error}"
try:
    import torchvision
    info["torchvision"] = torchvision.__version__
except Exception as error:
    info["torchvision"] = None
    info["torchvision_error"] = f"{type(error).__name__}: {error}"
try:
    import pytest_benchmark
    info["pytest_benchmark"] = pytest_benchmark.__version__
except Exception as error:
    info["pytest_benchmark"] = None   # the benchmark steps will fail: the suite runs on it
print("GPU_CHECK_ENV " + json.dumps(info), flush=True)
"""

BUILD_CHECK_SNIPPET = r"""
import json
info = {}
try:
    import aecr_ops
    from aecr_ops import _extension
    info.update(extension_loaded=aecr_ops.extension_loaded(), cuda_kernels_built=aecr_ops.cuda_kernels_built(),
                location=aecr_ops.__file__)
    if _extension._load_error is not None:
        info["load_error"] = str(_extension._load_error)[:500]
except Exception as error:
    info.update(extension_loaded=False, error=f"{type(error).__name__}: {error}"[:500])
print("GPU_CHECK_BUILD " + json.dumps(info), flush=True)
"""


class Interrupted(BaseException):
    """SIGTERM (gpu_check.sh's outer timeout) or SIGINT: stop the step, keep what was measured."""


# ---------------------------------------------------------------------------------------------------------------
# Pure pieces (unit-tested in tests/test_gpu_check.py)

def json_safe(value):
    """The same data with NaN and infinities as None (strict JSON has neither)."""
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json_atomic(path, document):
    """The result file, atomically (bench_common.write_json_atomic) and strictly JSON (no NaN)."""
    bench_common.write_json_atomic(path, json_safe(document), indent=1, allow_nan=False, default=str)


_PYTEST_WORDS = {"passed": "passed", "failed": "failed", "error": "errors", "errors": "errors",
                 "skipped": "skipped", "deselected": "deselected", "xfailed": "xfailed", "xpassed": "xpassed",
                 "warning": "warnings", "warnings": "warnings", "rerun": "rerun", "selected": "selected"}
_PYTEST_RESULT = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_PYTEST_STATUS_KEY = {"PASSED": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped",
                      "XFAIL": "xfailed", "XPASS": "xpassed"}


def parse_pytest(text):
    """What a pytest run printed: counts from its final line (or, cut short, from its -v result lines).

    Returns {"counts": {...}, "line": the final line or None, "failed_tests": [...], "partial": bool, and when
    partial "running": the test that was running}. Collection (--collect-only -q) gives counts["collected"] and,
    with a marker, counts["total"] and counts["deselected"].
    """
    lines = [line.rstrip() for line in text.splitlines()]
    final, counts = None, {}
    for line in reversed(lines):
        body = line.strip().strip("=").strip()
        if not re.search(r"\bin [\d.]+s\b", body):
            continue
        found = {}
        collected = re.search(r"(\d+)(?:/(\d+))? tests? collected", body)
        if collected:
            found["collected"] = int(collected.group(1))
            if collected.group(2):
                found["total"] = int(collected.group(2))
        for number, word in re.findall(r"(\d+) ([a-z]+)", body):
            if word in _PYTEST_WORDS:
                found[_PYTEST_WORDS[word]] = int(number)
        if found or body.startswith("no tests ran"):
            final, counts = line.strip(), found
            break
    failed_tests = [line.split(" - ")[0] for line in lines if re.match(r"^(FAILED|ERROR) \S", line)][:20]
    result = {"counts": counts, "line": final, "failed_tests": failed_tests, "partial": final is None}
    if final is None:
        for line in lines:
            match = _PYTEST_RESULT.match(line)
            if match:
                key = _PYTEST_STATUS_KEY[match.group(2)]
                counts[key] = counts.get(key, 0) + 1
        for line in reversed(lines):
            if line.strip():
                if re.match(r"^\S+::\S+\s*$", line.strip()):
                    result["running"] = line.strip()
                break
    return result


_SANITIZER_REFUSAL = re.compile(r"not supported|unsupported", re.I)          # on a "========= " line
_DEVICE_REFUSAL = re.compile(r"device (is )?not supported|unsupported (device|gpu)", re.I)   # on any line
_CUDA_UNKNOWN = re.compile(r"error 999|cudaErrorUnknown|CUDA error: unknown error", re.I)
_OPTION_ERROR = re.compile(r"unrecognized option|unknown option|invalid option|invalid value|"
                           r"error parsing|option .* is not", re.I)


def parse_sanitizer(text):
    """What compute-sanitizer printed: {"errors", "warnings", "hazards", "summary", "first_errors", "unsupported",
    "option_error", "case"}. errors is None when no summary line was printed (a crash or a timeout)."""
    result = {"errors": None, "summary": None, "first_errors": [], "unsupported": None, "option_error": None,
              "case": None}
    matches = re.findall(r"ERROR SUMMARY: (\d+) errors?", text)
    if matches:
        result["errors"] = int(matches[-1])
        result["summary"] = f"ERROR SUMMARY: {matches[-1]} errors"
    race = re.findall(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", text)
    if race:
        hazards, errors, warnings = (int(v) for v in race[-1])
        result.update(hazards=hazards, errors=errors, warnings=warnings,
                      summary=f"RACECHECK SUMMARY: {hazards} hazards displayed ({errors} errors, {warnings} warnings)")
    lines = text.splitlines()
    headers = []
    for i, line in enumerate(lines):
        if not line.startswith("========= ") or line.startswith("=========  "):
            continue
        body = line[len("========= "):].strip()
        if not body or any(k in body for k in ("COMPUTE-SANITIZER", "ERROR SUMMARY", "RACECHECK SUMMARY")):
            continue
        if _SANITIZER_REFUSAL.search(body) and result["unsupported"] is None:
            result["unsupported"] = body[:300]
        where = next((l.strip("= ").strip() for l in lines[i + 1:i + 4] if l.startswith("=========     at")), "")
        entry = f"{body} | {where}" if where else body
        if entry[:300] not in headers:
            headers.append(entry[:300])
    result["first_errors"] = headers[:8]
    result["reported_lines"] = len(headers)
    for line in reversed(lines):
        if line.startswith("SANITIZER_CASE_SUMMARY "):
            try:
                result["case"] = json.loads(line[len("SANITIZER_CASE_SUMMARY "):])
            except ValueError:
                pass
            break
    case_ran = (result["case"] or {}).get("ran", 0)
    if result["unsupported"] is None:
        refusal = next((l.strip() for l in lines if _DEVICE_REFUSAL.search(l)), None)
        if refusal:
            result["unsupported"] = refusal[:300]
    unknown = _CUDA_UNKNOWN.search(text)
    if result["unsupported"] is None and unknown and not case_ran and not result["errors"]:
        line = next((l for l in lines if _CUDA_UNKNOWN.search(l)), unknown.group(0))
        result["unsupported"] = line.strip()[:300]
    if result["errors"] is None and result["case"] is None:
        option = next((l.strip() for l in lines if _OPTION_ERROR.search(l)), None)
        result["option_error"] = option[:300] if option else None
    return result


def sanitizer_status(rc, parsed):
    """Status of one sanitizer step from its exit code ("timeout" or an int) and parse_sanitizer's result."""
    if parsed["unsupported"] and not parsed["errors"]:
        return "unsupported"
    if rc == "timeout":
        return "timeout"
    if parsed["errors"] is None:
        return "failed"
    return "ok" if rc == 0 and parsed["errors"] == 0 else "failed"


TARGET_GOALS = {
    "dcn_vs_torchvision": (">=", 3.0, "DCN fwd+bwd speed-up vs torchvision"),
    "dcn_vs_cudnn": ("<=", 1.5, "DCN fwd+bwd time / cuDNN conv2d"),
    "dcn_deterministic": ("<=", 2.0, "DCN deterministic / default fwd+bwd"),
    "fastdeconv": (">=", 3.0, "FastDeconv training step 16x3x256x256 speed-up vs the original"),
    "model_training": (">=", 1.5, "AECR-Net training step speed-up vs torchvision DCN + original FastDeconv"),
}
DCN_CONFIGS = ("float32", "float32+tf32", "bfloat16")
PRECISION_CONFIGS = {"fp32": "float32", "tf32": "float32+tf32", "bf16": "bfloat16"}


def suite_entries(result):
    """Every benchmark the suite's parts recorded (bench_report's entries, each with its step and size)."""
    bench = result.get("benchmarks") or {}
    return [entry for kind in ("dcn", "fastdeconv", "model") for entry in bench.get(kind) or []]


def targets(result):
    """Each GPU target of the performance issue: {"target", "kind", "goal", "comparison", "measured", "met", ...}.

    Only benchmarks that were measured, labelled with the path that really ran, give rows; a target with no
    measurement at all gets one row with measured None and met None ("not measured").
    """
    rows = []

    def add(kind, label, measured, **extra):
        comparison, goal, what = TARGET_GOALS[kind]
        if measured is not None:
            measured = round(float(measured), 3)
        met = None if measured is None else (measured >= goal if comparison == ">=" else measured <= goal)
        rows.append({"target": what + label, "kind": kind, "goal": goal, "comparison": comparison,
                     "measured": measured, "met": met, **extra})

    entries = suite_entries(result)
    by_group_and_impl = {(e.get("group"), (e.get("extra_info") or {}).get("impl")): e for e in entries}
    seen = set()
    for entry in entries:
        info = entry.get("extra_info") or {}
        impl = str(info.get("impl", ""))
        if info.get("task") != "dcn_forward_backward" or not impl.startswith("aecr") or not info.get("path"):
            continue
        config = PRECISION_CONFIGS.get(info.get("precision"), str(info.get("precision")))
        device = "" if info.get("device") == "cuda" else f" ({info.get('device')})"
        path = info["path"]
        where = f": {info.get('shape')} {config}, {path} path{device}"
        extra = dict(config=config, path=path, impl=impl)
        ratios, speedups = info.get("time_ratio") or {}, info.get("speedup") or {}
        if info.get("deterministic"):
            add("dcn_deterministic", where, ratios.get(impl[:-len("-deterministic")]), **extra)
            seen.add(("dcn_deterministic", config))
            continue
        torchvision = (by_group_and_impl.get((entry.get("group"), "torchvision")) or {}).get("extra_info") or {}
        note = ", torchvision in float32" if torchvision.get("dtype") not in (None, info.get("dtype")) else ""
        add("dcn_vs_torchvision", where + note, speedups.get("torchvision"), **extra)
        add("dcn_vs_cudnn", where, ratios.get("conv2d"), **extra)
        seen.update({("dcn_vs_torchvision", config), ("dcn_vs_cudnn", config)})
    for kind in ("dcn_vs_torchvision", "dcn_vs_cudnn", "dcn_deterministic"):
        for config in DCN_CONFIGS:
            if (kind, config) not in seen:
                add(kind, f": {DCN_SHAPE} {config}", None, config=config, note="not measured")

    found = False
    for entry in entries:
        info = entry.get("extra_info") or {}
        if (info.get("task"), info.get("layer"), info.get("impl")) == ("fastdeconv_training_step", "aecrnet", "aecr") \
                and (info.get("speedup") or {}).get("original") is not None:
            tiny = f" (measured on {info.get('shape')}, a tiny dry-run input)" if entry.get("size") == "tiny" else ""
            add("fastdeconv", tiny, info["speedup"]["original"])
            found = True
    if not found:
        add("fastdeconv", "", None, note="not measured")

    found = False
    for entry in entries:
        info = entry.get("extra_info") or {}
        speedup = (info.get("speedup") or {}).get("baseline")
        if info.get("task") == "model_training_step" and str(info.get("impl", "")).startswith("aecr") \
                and speedup is not None:
            add("model_training", f": {info.get('precision')}, {info.get('path')} path", speedup,
                precision=info.get("precision"), path=info.get("path"), impl=info["impl"])
            found = True
    if not found:
        add("model_training", "", None, note="not measured")
    return rows


MODEL_PATH = os.path.join(ROOT, "benchmarks", "cuda_model.json")
# The suite's precision label -> the model's dtype (the model has no fp32-without-TF32 DCN case apart from the
# simple path's float32, whose GEMMs are FP32: that is the suite's "fp32").
MODEL_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
MODEL_TASKS = {"dcn_forward": ("deform_conv2d", "forward"), "dcn_forward_backward": ("deform_conv2d", "both")}


def predictions(result, model_path=MODEL_PATH):
    """Each modelled case (benchmarks/cuda_model.json) beside the CUDA measurement of the same op, path, pass,
    dtype and shape, so that the first GPU run calibrates the model: {"case", "predicted_ms", "measured_ms",
    "measured_over_predicted", "benchmark"}; measured_ms is None where the suite measured nothing matching (as in
    a dry run). A forward+backward measurement is compared with the sum of the forward and backward cases."""
    try:
        with open(model_path) as f:
            cases = json.load(f)["cases"]
    except (OSError, ValueError, KeyError) as error:
        return [{"error": f"no model: {type(error).__name__}: {error}"}]
    by_key = {(c["op"], c["path"], c["pass"], c["dtype"], c["shape"]): c for c in cases}
    measured = {}
    for entry in suite_entries(result):
        info = entry.get("extra_info") or {}
        if info.get("device") != "cuda" or info.get("deterministic") or entry.get("median_s") is None:
            continue
        op_pass = MODEL_TASKS.get(info.get("task"))
        impl = str(info.get("impl", ""))
        if op_pass is None or not (impl.startswith("aecr") or impl == "conv2d"):
            continue
        op = "conv2d" if impl == "conv2d" else op_pass[0]
        path = "cudnn" if impl == "conv2d" else info.get("path")
        dtype = MODEL_DTYPES.get(info.get("precision"))
        measured[(op, path, op_pass[1], dtype, info.get("shape"))] = (1e3 * entry["median_s"], entry.get("name"))
    rows = []
    for c in cases:
        key = (c["op"], c["path"], c["pass"], c["dtype"], c["shape"])
        ms, name = measured.get(key, (None, None))
        rows.append(_prediction_row(f"{c['op']} {c['path']} {c['pass']} {c['dtype']} {c['shape']}",
                                    c["predicted_ms"], ms, name))
    for (op, path, pass_, dtype, shape), (ms, name) in sorted(measured.items(), key=str):
        forward, backward = by_key.get((op, path, "forward", dtype, shape)), by_key.get((op, path, "backward", dtype, shape))
        if pass_ == "both" and forward and backward:
            both = {d: forward["predicted_ms"][d] + backward["predicted_ms"][d] for d in forward["predicted_ms"]}
            rows.append(_prediction_row(f"{op} {path} forward+backward {dtype} {shape}", both, ms, name))
    return rows


def _prediction_row(case, predicted, measured_ms, benchmark):
    row = {"case": case, "predicted_ms": {d: round(v, 4) for d, v in predicted.items()},
           "measured_ms": None if measured_ms is None else round(measured_ms, 4), "benchmark": benchmark}
    if measured_ms is not None:
        row["measured_over_predicted"] = {d: round(measured_ms / v, 3) for d, v in predicted.items() if v > 0}
    else:
        row["note"] = "not measured"
    return row


def tail_of(text, chars=TAIL_CHARS):
    return text[-chars:]


# ---------------------------------------------------------------------------------------------------------------
# The run

class Harness:
    def __init__(self, out, dry_run, outer_limit, selected=None):
        self.out = out
        self.dry_run = dry_run
        self.outer_limit = outer_limit
        self.selected = selected
        self.start = time.time()
        self.deadline = self.start + outer_limit - HARNESS_MARGIN_S
        self.log_path = os.path.join(out, LOG_NAME)
        self.json_path = os.path.join(out, JSON_NAME)
        self.work = tempfile.mkdtemp(prefix="gpu_check_")   # bench JSONs: merged into gpu_check.json, not in OUT
        self.child = None
        self.interrupted = False
        self.python = sys.executable
        self.sanitizer_refused = None
        self.build_failed = None
        self.result = {
            "schema_version": SCHEMA_VERSION,
            "dry_run": dry_run,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "finished": False,
            "exit_code": None,
            "host": platform.node(),
            "python": platform.python_version(),
            "python_executable": sys.executable,
            "torch": None, "cuda": None, "torchvision": None, "cudnn": None,
            "device": None, "capability": None, "nvidia_smi": None,
            "cuda_kernels_built": None,
            **git_info(),
            "source_digest": source_digest(),
            "outer_limit_s": outer_limit,
            "step_limits_total_s": sum(limit for _, limit in STEPS),
            "plan": [{"name": name, "limit_s": limit} for name, limit in STEPS],
            "log": LOG_NAME,
            "steps": [],
            "benchmarks": {"dcn": [], "fastdeconv": [], "model": []},
            "suite": None,
            "targets": [],
            "predictions": [],
        }
        with open(self.log_path, "w") as log:
            log.write(f"gpu_check {'dry run ' if dry_run else ''}started {self.result['date']} in {ROOT}\n")

    # -- output ---------------------------------------------------------------------------------------------

    def write(self):
        """Rewrites OUT/gpu_check.json (targets recomputed); a failure here is reported, never fatal."""
        self.result["updated"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
        self.result["elapsed_s"] = round(time.time() - self.start, 1)
        try:
            self.result["targets"] = targets(self.result)
            self.result["predictions"] = predictions(self.result)
            self.result.pop("targets_error", None)
        except Exception as error:  # noqa: BLE001 - unexpected benchmark data must not stop the run
            self.result["targets_error"] = f"{type(error).__name__}: {error}"
        try:
            write_json_atomic(self.json_path, self.result)
        except (OSError, TypeError, ValueError) as error:
            print(f"gpu_check: could not write {self.json_path}: {error}", flush=True)

    def log(self, text):
        with open(self.log_path, "a") as log:
            log.write(text)

    # -- subprocesses ---------------------------------------------------------------------------------------

    def run(self, command, limit, env=None):
        """Runs command in its own process group, output appended to the log; returns (rc, seconds, output).

        rc is the exit code, or "timeout" (the group was killed at the limit). In a dry run the children use one
        CPU thread: tiny problems gain nothing from more, and OpenMP threads on a busy machine lose a lot."""
        if self.dry_run:
            env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
        self.log(f"\n$ {shlex.join(command)}   (limit {limit:.0f} s)\n")
        offset = os.path.getsize(self.log_path)
        start = time.time()
        with open(self.log_path, "ab") as log:
            try:
                self.child = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
                                              start_new_session=True)
            except OSError as error:
                log.write(f"cannot start: {error}\n".encode())
                return 127, 0.0, f"cannot start: {error}\n"
            try:
                rc = self.child.wait(timeout=max(1.0, limit))
            except subprocess.TimeoutExpired:
                self.kill_child()
                rc = "timeout"
            except Interrupted:
                # The outer limit: stop the child, let the step record what it got, then stop the run.
                self.interrupted = True
                self.kill_child()
                rc = "timeout"
            finally:
                self.kill_child()   # also what the child left behind in its group (e.g. a sanitizer's target)
                self.child = None
        seconds = round(time.time() - start, 1)
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            output = log.read().decode("utf-8", "replace")
        self.log(f"[exit {rc} after {seconds} s]\n")
        return rc, seconds, output

    def kill_child(self):
        child = self.child
        if child is None:
            return
        try:
            os.killpg(child.pid, signal.SIGKILL)   # the process group this harness created for the child
        except (ProcessLookupError, PermissionError):
            pass   # nothing left in it
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    # -- steps ----------------------------------------------------------------------------------------------

    def step(self, name, limit, fn):
        entry = {"name": name, "status": None, "exit_code": None, "seconds": 0.0, "limit_s": limit,
                 "command": None, "summary": None, "tail": ""}
        self.result["steps"].append(entry)
        started = time.time()
        effective = min(limit, self.deadline - started)
        if self.selected is not None and name not in self.selected:
            entry.update(status="skipped", summary={"reason": "not selected (--steps)"})
        elif effective < 1:
            entry.update(status="skipped", summary={"reason": "the run's time limit was reached"})
        elif self.build_failed and name != "environment" and name != "build":
            entry.update(status="skipped", summary={"reason": f"the build failed ({self.build_failed})"})
        else:
            if effective < limit:
                entry["effective_limit_s"] = round(effective, 1)
            print(f"[{name}] running (limit {effective:.0f} s)", flush=True)
            try:
                fn(entry, effective)
                if self.interrupted:
                    raise Interrupted("SIGTERM")
            except Interrupted:
                entry.update(status="timeout", summary={**(entry.get("summary") or {}),
                                                        "note": "stopped by the run's outer limit (SIGTERM)"})
                entry["seconds"] = round(time.time() - started, 1)
                raise
            except Exception as error:  # noqa: BLE001 - a harness bug in one step must not lose the others
                entry.update(status="failed", summary={**(entry.get("summary") or {}),
                                                       "harness_error": f"{type(error).__name__}: {error}"})
            finally:
                entry["seconds"] = round(time.time() - started, 1)
                if entry["status"] not in STATUSES:
                    entry["status"] = "failed"
                self.write()
        if entry["status"] in ("skipped",):
            self.write()
        brief = summary_line(entry)
        print(f"[{name}] {entry['status']} in {entry['seconds']:.0f}/{limit} s{': ' + brief if brief else ''}",
              flush=True)
        if entry["status"] in ("failed", "timeout") and entry.get("tail"):
            print("    | " + "\n    | ".join(entry["tail"][-700:].splitlines()[-10:]), flush=True)

    def environment(self, entry, limit):
        end = time.time() + limit
        command = [self.python, "-c", ENV_SNIPPET]
        entry["command"] = "python3 -c <environment probe>"
        rc, seconds, output = self.run(command, max(1, limit - 5))
        info = {}
        for line in output.splitlines():
            if line.startswith("GPU_CHECK_ENV "):
                info = json.loads(line[len("GPU_CHECK_ENV "):])
        for key in ("torch", "cuda", "torchvision", "cudnn", "device", "capability", "python"):
            if key in info:
                self.result[key] = info[key]
        smi = shutil.which("nvidia-smi")
        if smi:
            try:
                done = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                      capture_output=True, text=True, timeout=max(1, min(5, end - time.time())))
                self.result["nvidia_smi"] = (done.stdout.strip() or done.stderr.strip())[:300]
            except (subprocess.TimeoutExpired, OSError) as error:
                self.result["nvidia_smi"] = f"nvidia-smi did not answer: {error}"[:300]
        else:
            self.result["nvidia_smi"] = None
            info["nvidia_smi_note"] = "nvidia-smi not found"
        self.log(f"nvidia-smi: {self.result['nvidia_smi']}\n")
        entry.update(exit_code=rc, summary=info, tail=tail_of(output, 600),
                     status="ok" if rc == 0 and info and "torch_error" not in info else
                     ("timeout" if rc == "timeout" else "failed"))

    def build(self, entry, limit):
        end = time.time() + limit
        check = [self.python, "-c", BUILD_CHECK_SNIPPET]
        summary = {}
        pip_output = ""
        if self.dry_run:
            entry["command"] = "python3 -c 'import aecr_ops' (dry run: no build)"
        else:
            pip = [self.python, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "-e", "."]
            entry["command"] = shlex.join(["python3"] + pip[1:])
            rc, seconds, pip_output = self.run(pip, limit - 25)
            progress = re.findall(r"^\[(\d+)/(\d+)\]", pip_output, re.M)
            summary.update(pip_exit_code=rc, pip_seconds=seconds,
                           ninja_progress=f"{progress[-1][0]}/{progress[-1][1]}" if progress else None)
            if rc != 0:
                self.build_failed = "timeout" if rc == "timeout" else f"pip exit code {rc}"
                entry.update(status="timeout" if rc == "timeout" else "failed", exit_code=rc, summary=summary,
                             tail=tail_of(pip_output))
                return
        rc, seconds, output = self.run(check, max(1, min(25, end - time.time())))
        info = {}
        for line in output.splitlines():
            if line.startswith("GPU_CHECK_BUILD "):
                info = json.loads(line[len("GPU_CHECK_BUILD "):])
        summary.update(info)
        self.result["cuda_kernels_built"] = info.get("cuda_kernels_built")
        good = rc == 0 and info.get("extension_loaded") and (self.dry_run or info.get("cuda_kernels_built"))
        if not good:
            self.build_failed = "aecr_ops does not import" if not info.get("extension_loaded") else \
                "built without the CUDA kernels"
        entry.update(exit_code=rc, summary=summary, tail=tail_of((pip_output + output) if not good else output),
                     status=("dry-run" if self.dry_run else "ok") if good else "failed")

    def tests(self, selection):
        def run(entry, limit):
            base = [self.python, "-m", "pytest", *selection, "-m", "cuda", "-p", "no:cacheprovider"]
            if self.dry_run:
                command = base + ["--collect-only", "-q"]
            else:
                command = base + ["-v", "-rfE", "--durations=8", "--color=no"]
            entry["command"] = shlex.join(["python3"] + command[1:])
            rc, seconds, output = self.run(command, limit)
            parsed = parse_pytest(output)
            if rc == "timeout":
                status = "timeout"
            elif rc == 0 and (not self.dry_run or parsed["counts"].get("collected")):
                status = "dry-run" if self.dry_run else "ok"
            else:
                status = "failed"
            entry.update(status=status, exit_code=rc, summary=parsed, tail=tail_of(output))
        return run

    def sanitizer(self, tool):
        def run(entry, limit):
            exe = find_sanitizer()
            cases = ["benchmarks/sanitizer_case.py", "--groups", *SANITIZER_GROUPS]
            tool_args = ["--tool", tool, "--error-exitcode", "7", "--print-limit", "30"]
            if tool in SANITIZER_FILTERED:
                tool_args += ["--kernel-name", SANITIZER_KERNEL_FILTER]
            entry["command"] = shlex.join([exe or "compute-sanitizer", *tool_args, "python3", *cases])
            summary = {"tool": exe, "kernel_filter": SANITIZER_KERNEL_FILTER if tool in SANITIZER_FILTERED else None}
            if self.dry_run:
                # The tool's presence, and the same cases on the CPU (the first tool) or their list (the others).
                dry = [self.python, *cases, "--device", "cpu"] if tool == SANITIZER_TOOLS[0] else \
                    [self.python, *cases, "--list"]
                rc, seconds, output = self.run(dry, limit)
                summary["dry_command"] = shlex.join(["python3"] + dry[1:])
                if exe is None:
                    summary["note"] = "compute-sanitizer not found here"
                summary["case"] = parse_sanitizer(output)["case"]
                entry.update(status="dry-run" if rc == 0 else ("timeout" if rc == "timeout" else "failed"),
                             exit_code=rc, summary=summary, tail=tail_of(output))
                return
            if self.sanitizer_refused:
                entry.update(status="unsupported", summary={**summary, "unsupported": self.sanitizer_refused,
                                                            "note": "not run: the device was refused before"})
                return
            if exe is None:
                entry.update(status="skipped", summary={**summary, "note": "compute-sanitizer not found"})
                return
            env = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1", "CUDA_MODULE_LOADING": "LAZY"}
            command = [exe, *tool_args, self.python, *cases]
            start = time.time()
            rc, seconds, output = self.run(command, limit, env)
            parsed = parse_sanitizer(output)
            if rc not in (0, "timeout") and parsed["option_error"] and seconds < 15:
                # This compute-sanitizer refuses an option (the kernel filter, most likely): the plainest form.
                summary["kernel_filter"] = None
                summary["filter_refused"] = parsed["option_error"]
                tool_args = ["--tool", tool, "--error-exitcode", "7"]
                command = [exe, *tool_args, self.python, *cases]
                entry["command"] = shlex.join([exe, *tool_args, "python3", *cases])
                rc, seconds, output = self.run(command, limit - (time.time() - start), env)
                parsed = parse_sanitizer(output)
            status = sanitizer_status(rc, parsed)
            if status == "unsupported":
                self.sanitizer_refused = parsed["unsupported"]
            summary.update(parsed)
            entry.update(status=status, exit_code=rc, summary=summary, tail=tail_of(output, 1000))
        return run

    def bench(self, kind, files, selection):
        """A part of the suite: its progress file is merged into result["benchmarks"][kind] and its pytest-benchmark
        JSON (without the raw timings) into result["suite"]."""
        def run(entry, limit):
            progress = os.path.join(self.work, f"{entry['name']}.json")
            suite = os.path.join(self.work, f"{entry['name']}-suite.json")
            for path in (progress, suite):
                if os.path.exists(path):
                    os.unlink(path)
            options = SUITE_DRY if self.dry_run else SUITE_REAL
            chosen = selection
            if self.dry_run:
                chosen = f"({selection}) and not onnxruntime" if selection else "not onnxruntime"
            command = [self.python, "-m", "pytest", *files, "--benchmark-only", "-p", "no:cacheprovider", "-q",
                       "--color=no", *options, *(["-k", chosen] if chosen else [])]
            entry["command"] = shlex.join(["python3"] + command[1:])
            command += ["--bench-progress-json", progress, "--benchmark-json", suite]
            rc, seconds, output = self.run(command, limit)
            document = read_json(progress, entry)
            self.merge(kind, entry["name"], document, read_json(suite, entry))
            summary = {"json": document is not None, "complete": bool(document and document.get("complete"))}
            if document:
                reasons = {}
                for skipped in document.get("skipped", []):
                    reasons[skipped["reason"]] = reasons.get(skipped["reason"], 0) + 1
                summary.update(measured=len(document.get("benchmarks", [])), skipped=sum(reasons.values()),
                               skip_reasons=reasons)
            ok = rc == 0 and summary["complete"]
            status = ("dry-run" if self.dry_run else "ok") if ok else ("timeout" if rc == "timeout" else "failed")
            entry.update(status=status, exit_code=rc, summary={**(entry.get("summary") or {}), **summary},
                         tail=tail_of(output))
        return run

    def merge(self, kind, step, document, suite):
        bench = self.result["benchmarks"]
        bench[kind] = [e for e in bench[kind] if e.get("step") != step]
        for e in (document or {}).get("benchmarks", []):
            bench[kind].append({"step": step, "size": document.get("size"), **e})
        if suite:
            for b in suite.get("benchmarks", []):
                b.get("stats", {}).pop("data", None)   # the raw timings: up to thousands a benchmark on a GPU
            merged = self.result["suite"] or {**suite, "benchmarks": []}
            merged["benchmarks"] = [b for b in merged["benchmarks"] if b.get("step") != step]
            merged["benchmarks"] += [{"step": step, **b} for b in suite.get("benchmarks", [])]
            self.result["suite"] = merged

    def plan(self):
        """(name, limit, fn) in order."""
        fns = {
            "environment": self.environment,
            "build": self.build,
            "cuda_tests_simple_fastdeconv": self.tests(CORE_TESTS),
            "cuda_tests_rest": self.tests(REST_TESTS),
        }
        for tool in SANITIZER_TOOLS:
            fns[f"sanitizer_{tool}"] = self.sanitizer(tool)
        for name, (kind, files, selection) in SUITE_PARTS.items():
            fns[name] = self.bench(kind, files, selection)
        assert list(fns) == [name for name, _ in STEPS]
        return [(name, limit, fns[name]) for name, limit in STEPS]

    def main(self):
        exit_code = 0
        steps = self.plan()
        self.write()
        try:
            for name, limit, fn in steps:
                self.step(name, limit, fn)
        except Interrupted:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)   # the final JSON and summary are written next
            exit_code = 124
            recorded = {s["name"] for s in self.result["steps"]}
            for name, limit, _ in [s for s in steps if s[0] not in recorded]:
                self.result["steps"].append({"name": name, "status": "skipped", "exit_code": None, "seconds": 0.0,
                                             "limit_s": limit, "command": None, "tail": "",
                                             "summary": {"reason": "the run was stopped by its outer limit"}})
        bad = [s["name"] for s in self.result["steps"] if s["status"] in ("failed", "timeout")]
        if bad and exit_code == 0:
            exit_code = 1
        self.result.update(finished=True, exit_code=exit_code, problems=bad)
        self.write()
        trim_log(self.log_path)
        shutil.rmtree(self.work, ignore_errors=True)
        print_summary(self.result)
        return exit_code


# ---------------------------------------------------------------------------------------------------------------
# Helpers

def read_json(path, entry):
    """The JSON document at path, or None (missing; unreadable: the error goes into the step's summary)."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as error:
        entry["summary"] = {**(entry.get("summary") or {}), "json_error": f"{os.path.basename(path)}: {error}"}
        return None


def find_sanitizer():
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    homes += sorted((os.path.join("/usr/local", d) for d in os.listdir("/usr/local") if d.startswith("cuda-")),
                    reverse=True) if os.path.isdir("/usr/local") else []
    for home in homes:
        if home:
            for candidate in (os.path.join(home, "bin", "compute-sanitizer"),
                              os.path.join(home, "compute-sanitizer", "compute-sanitizer")):
                if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                    return candidate
    return None


def git_info():
    info = {"git_commit": None, "git_dirty": None}
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
        if head.returncode == 0:
            info["git_commit"] = head.stdout.strip()
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True, timeout=5)
            info["git_dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


def source_digest():
    """sha256 over the sources that decide the results (the GPU machine's copy may have no .git)."""
    digest = hashlib.sha256()
    paths = ["setup.py"]
    for folder, suffixes in (("csrc", (".h", ".cpp", ".cu", ".cuh")), ("aecr_ops", (".py",)),
                             ("benchmarks", (".py", ".sh"))):
        for base, _, files in os.walk(os.path.join(ROOT, folder)):
            paths += [os.path.relpath(os.path.join(base, f), ROOT) for f in files if f.endswith(suffixes)]
    for path in sorted(paths):
        try:
            with open(os.path.join(ROOT, path), "rb") as f:
                digest.update(path.encode() + b"\0" + f.read() + b"\0")
        except OSError:
            pass
    return digest.hexdigest()[:16]


def trim_log(path):
    """Keeps the log under the 16 MiB that a file coming back from the GPU machine may have."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return
    if size <= MAX_LOG_BYTES:
        return
    with open(path, "rb") as f:
        head = f.read(2**20)
        f.seek(size - (MAX_LOG_BYTES - 2**20 - 200))
        tail = f.read()
    with open(path, "wb") as f:
        f.write(head + f"\n... [{size - len(head) - len(tail)} bytes cut] ...\n".encode() + tail)


def summary_line(entry):
    s = entry.get("summary") or {}
    name = entry["name"]
    if "reason" in s:
        return s["reason"]
    if name == "environment":
        return f"torch {s.get('torch')}, CUDA {s.get('cuda')}, {s.get('device') or 'no GPU'}"
    if name == "build":
        return f"cuda_kernels_built={s.get('cuda_kernels_built')}" + (
            f", pip {s.get('pip_seconds')} s" if "pip_seconds" in s else "") + (
            f", ninja {s['ninja_progress']}" if s.get("ninja_progress") else "")
    if name.startswith("cuda_tests"):
        counts = ", ".join(f"{v} {k}" for k, v in (s.get("counts") or {}).items())
        running = f"; was running {s['running']}" if s.get("running") else ""
        return (counts or (s.get("line") or "")) + running
    if name.startswith("sanitizer"):
        if entry["status"] == "unsupported":
            return f"unsupported: {s.get('unsupported')}"
        case = s.get("case") or {}
        if "dry_command" in s:
            found = s.get("tool") or "compute-sanitizer not found"
            if case.get("listed") is not None:
                return f"{found}; the {case['listed']} cases listed"
            return f"{found}; CPU dry case ran {case.get('ran')}/{case.get('cases')} (the others need CUDA)" if case \
                else f"{found}; the dry case did not finish"
        ran = f"{case.get('ran')}/{case.get('cases')} cases" if case else "cases did not finish"
        return f"{s.get('summary') or 'no summary'}; {ran}" + (f"; {s['note']}" if s.get("note") else "")
    if name.startswith("bench"):
        counts = f"; {s['measured']} measured, {s['skipped']} skipped" if "measured" in s else ""
        return ("complete" if s.get("complete") else "partial" if s.get("json") else "no results") + counts + (
            f"; {s['json_error']}" if s.get("json_error") else "")
    return ""


def print_summary(result):
    """A short table at the end of the output (the device tool returns only its last 12,000 characters)."""
    print("\n==== gpu_check summary" + (" (dry run)" if result.get("dry_run") else "") + " ====")
    print(f"device {result.get('device')} | {result.get('nvidia_smi')} | torch {result.get('torch')} CUDA "
          f"{result.get('cuda')} torchvision {result.get('torchvision')} python {result.get('python')} | "
          f"commit {(result.get('git_commit') or 'n/a')[:12]} digest {result.get('source_digest')}")
    print(f"{'step':<30} {'status':<12} {'s/limit':>9}  summary")
    for s in result["steps"]:
        print(f"{s['name']:<30} {s['status']:<12} {s['seconds']:>4.0f}/{s['limit_s']:<4} {summary_line(s)[:150]}")
    print(f"\n{'target':<100} {'goal':>7} {'measured':>9} {'met':>5}")
    for t in result["targets"]:
        goal = f"{t['comparison']}{t['goal']}"
        measured = "-" if t["measured"] is None else f"{t['measured']:.2f}"
        met = "-" if t["met"] is None else ("yes" if t["met"] else "NO")
        print(f"{t['target'][:100]:<100} {goal:>7} {measured:>9} {met:>5}")
    print(f"\nexit code {result.get('exit_code')}, {result.get('elapsed_s')} s of {result.get('outer_limit_s')} s; "
          f"results in {JSON_NAME}, output of every step in {LOG_NAME}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="walk the steps without a GPU (see above)")
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "gpu_check_out"))
    parser.add_argument("--outer-limit", type=float, default=OUTER_LIMIT_S,
                        help="the whole run's limit (gpu_check.sh's timeout); steps never run past it")
    parser.add_argument("--steps", nargs="*", choices=[name for name, _ in STEPS],
                        help="run only these steps (the others are recorded as skipped)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for key, value in (("FORCE_CUDA", "1"), ("TORCH_CUDA_ARCH_LIST", "9.0"), ("MAX_JOBS", "16"),
                       ("CUBLAS_WORKSPACE_CONFIG", ":4096:8"), ("PYTHONUNBUFFERED", "1"),
                       ("PIP_NO_INDEX", "1"), ("PIP_DISABLE_PIP_VERSION_CHECK", "1"), ("PIP_NO_INPUT", "1")):
        os.environ.setdefault(key, value)

    def interrupt(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    harness = Harness(os.path.abspath(args.out), args.dry_run, args.outer_limit,
                      set(args.steps) if args.steps is not None else None)
    return harness.main()


if __name__ == "__main__":
    sys.exit(main())
