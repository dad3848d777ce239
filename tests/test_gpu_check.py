"""The GPU check harness (benchmarks/gpu_check.sh, gpu_check.py) and the robustness of the benchmark scripts.

The fast tests cover the pure-Python pieces: pytest and compute-sanitizer output parsing, targets() on synthetic
suite results, atomic JSON writing, the step plan's limits, bench_dcn's path labelling and its thin entry point.
The slow ones run the whole harness in --dry-run (no GPU needed) and check the JSON it leaves, also when it is
stopped.
"""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import aecr_ops

from bench_modules import BENCH, ROOT, load



gpu_check = load("gpu_check")
bench_dcn = load("bench_dcn")
bench_report = load("bench_report")

STEP_NAMES = ["environment", "build", "cuda_tests_simple_fastdeconv", "cuda_tests_rest", "sanitizer_memcheck",
              "sanitizer_racecheck", "sanitizer_synccheck", "sanitizer_initcheck", "bench_dcn_float32",
              "bench_dcn_tf32", "bench_dcn_bfloat16", "bench_fastdeconv", "bench_model"]


# ---------------------------------------------------------------------------------------------------------------
# The plan

def test_steps_run_in_the_required_order_with_limits_below_the_outer_one():
    assert [name for name, _ in gpu_check.STEPS] == STEP_NAMES
    limits = [limit for _, limit in gpu_check.STEPS]
    assert all(isinstance(limit, int) and limit > 0 for limit in limits)
    assert sum(limits) + gpu_check.HARNESS_MARGIN_S <= gpu_check.OUTER_LIMIT_S
    assert gpu_check.OUTER_LIMIT_S < 600   # the device tool's limit for one command


def test_the_shell_scripts_outer_limit_is_the_harness_one():
    with open(os.path.join(BENCH, "gpu_check.sh")) as f:
        script = f.read()
    match = re.search(r"^OUTER_LIMIT=(\d+)", script, re.M)
    assert match and int(match.group(1)) == gpu_check.OUTER_LIMIT_S
    assert re.search(r'timeout -k \d+ "\$OUTER_LIMIT"', script)
    assert 'OUT="${OUT:-$PWD/gpu_check_out}"' in script


def test_the_plan_has_a_function_for_every_step(tmp_path):
    harness = gpu_check.Harness(str(tmp_path), dry_run=True, outer_limit=gpu_check.OUTER_LIMIT_S)
    assert [name for name, _, _ in harness.plan()] == STEP_NAMES


# ---------------------------------------------------------------------------------------------------------------
# pytest output

def test_parse_pytest_final_summary_and_failures():
    text = """tests/test_a.py::test_one PASSED                                  [ 50%]
tests/test_a.py::test_two FAILED                                  [100%]
=========================== short test summary info ============================
FAILED tests/test_a.py::test_two - AssertionError: assert 1 == 2
ERROR tests/test_b.py::test_three - RuntimeError: CUDA error
== 1 failed, 1 passed, 3 skipped, 432 deselected, 1 error, 2 warnings in 65.12s (0:01:05) ==
"""
    parsed = gpu_check.parse_pytest(text)
    assert parsed["counts"] == {"failed": 1, "passed": 1, "skipped": 3, "deselected": 432, "errors": 1,
                                "warnings": 2}
    assert parsed["failed_tests"] == ["FAILED tests/test_a.py::test_two", "ERROR tests/test_b.py::test_three"]
    assert parsed["partial"] is False and "65.12s" in parsed["line"]


def test_parse_pytest_collection_with_a_marker():
    parsed = gpu_check.parse_pytest("tests/x.py::test_a\n\n70/543 tests collected (473 deselected) in 3.85s\n")
    assert parsed["counts"] == {"collected": 70, "total": 543, "deselected": 473}
    assert gpu_check.parse_pytest("98 tests collected in 0.08s\n")["counts"] == {"collected": 98}
    assert gpu_check.parse_pytest("1 test collected in 0.01s")["counts"] == {"collected": 1}


def test_parse_pytest_cut_short_counts_the_verbose_lines_and_names_the_running_test():
    text = """tests/test_a.py::test_one[0] PASSED                               [  1%]
tests/test_a.py::test_one[1] SKIPPED (needs 24 GiB)               [  2%]
tests/test_a.py::test_two FAILED                                  [  3%]
tests/test_a.py::test_slow
"""
    parsed = gpu_check.parse_pytest(text)
    assert parsed["partial"] is True and parsed["line"] is None
    assert parsed["counts"] == {"passed": 1, "skipped": 1, "failed": 1}
    assert parsed["running"] == "tests/test_a.py::test_slow"


def test_parse_pytest_no_tests():
    parsed = gpu_check.parse_pytest("===== no tests ran in 0.12s =====\n")
    assert parsed["partial"] is False and parsed["counts"] == {}


# ---------------------------------------------------------------------------------------------------------------
# compute-sanitizer output

MEMCHECK_ERRORS = """========= COMPUTE-SANITIZER
[1/48] dcn simple A fp32 atomic: simple
========= Invalid __global__ read of size 4 bytes
=========     at void aecr::im2col_kernel<float>(aecr::DeformConvShape, long)+0x1c0 in deform_conv_cuda.cu:50
=========     by thread (3,0,0) in block (0,0,0)
=========     Address 0x7f00 is out of bounds
========= Invalid __global__ read of size 4 bytes
=========     at void aecr::im2col_kernel<float>(aecr::DeformConvShape, long)+0x1c0 in deform_conv_cuda.cu:50
SANITIZER_CASE_SUMMARY {"cases": 48, "ran": 48, "skipped": 0, "failed": [], "paths": {"simple->simple": 18}}
========= ERROR SUMMARY: 2 errors
"""


def test_parse_sanitizer_counts_errors_and_names_the_kernel():
    parsed = gpu_check.parse_sanitizer(MEMCHECK_ERRORS)
    assert parsed["errors"] == 2 and parsed["summary"] == "ERROR SUMMARY: 2 errors"
    assert len(parsed["first_errors"]) == 1   # the same error twice is listed once
    assert "Invalid __global__ read" in parsed["first_errors"][0]
    assert "im2col_kernel" in parsed["first_errors"][0]
    assert parsed["case"]["ran"] == 48 and parsed["unsupported"] is None
    assert gpu_check.sanitizer_status(7, parsed) == "failed"


def test_parse_sanitizer_clean_run_and_racecheck_summary():
    clean = gpu_check.parse_sanitizer("========= COMPUTE-SANITIZER\nSANITIZER_CASE_SUMMARY {\"ran\": 3}\n"
                                      "========= ERROR SUMMARY: 0 errors\n")
    assert clean["errors"] == 0 and clean["first_errors"] == []
    assert gpu_check.sanitizer_status(0, clean) == "ok"
    race = gpu_check.parse_sanitizer("========= Error: Race reported between Write access at k+0x10 in a.cu:3\n"
                                     "=========     and Read access at k+0x20 in a.cu:4\n"
                                     "========= RACECHECK SUMMARY: 3 hazards displayed (1 error, 2 warnings)\n")
    assert (race["hazards"], race["errors"], race["warnings"]) == (3, 1, 2)
    assert race["first_errors"][0].startswith("Error: Race reported")
    assert gpu_check.sanitizer_status(7, race) == "failed"
    # a clean run whose case raised (exit code 1) is not ok
    assert gpu_check.sanitizer_status(1, clean) == "failed"


def test_parse_sanitizer_device_refused_is_unsupported():
    refused = gpu_check.parse_sanitizer("========= COMPUTE-SANITIZER\n========= Error: Device not supported\n"
                                        "RuntimeError: CUDA error: unknown error\n"
                                        "========= ERROR SUMMARY: 0 errors\n")
    assert refused["unsupported"] == "Error: Device not supported"
    assert gpu_check.sanitizer_status(1, refused) == "unsupported"
    bare = gpu_check.parse_sanitizer("Device not supported\nsanitizer_case: no CUDA device\n")
    assert bare["unsupported"] == "Device not supported" and gpu_check.sanitizer_status(2, bare) == "unsupported"
    # error 999 at the first allocation and no case ran: the tool did not take the device either
    unknown = gpu_check.parse_sanitizer("Traceback ...\ntorch.AcceleratorError: CUDA error 999: unknown error\n")
    assert "999" in unknown["unsupported"] and gpu_check.sanitizer_status(1, unknown) == "unsupported"
    # ... but an unknown error after cases ran, with errors reported, is a failure
    late = gpu_check.parse_sanitizer('SANITIZER_CASE_SUMMARY {"ran": 5}\nCUDA error: unknown error\n'
                                     "========= ERROR SUMMARY: 4 errors\n")
    assert late["unsupported"] is None and gpu_check.sanitizer_status(7, late) == "failed"


def test_parse_sanitizer_timeout_and_refused_option():
    cut = gpu_check.parse_sanitizer(MEMCHECK_ERRORS.rsplit("SANITIZER_CASE_SUMMARY", 1)[0])
    assert cut["errors"] is None and cut["reported_lines"] == 1
    assert gpu_check.sanitizer_status("timeout", cut) == "timeout"
    option = gpu_check.parse_sanitizer("========= Error: unrecognized option '--kernel-name'\n")
    assert option["option_error"] and "kernel-name" in option["option_error"]


# ---------------------------------------------------------------------------------------------------------------
# targets()

def entry(task, impl, median, group, precision="fp32", shape="16x256x64x64", **info):
    """One benchmark as the suite's progress file records it (bench_report's entry)."""
    return {"name": f"test[{impl}]", "fullname": f"benchmarks/x.py::test[{impl}]", "group": group,
            "median_s": median, "rounds": 5,
            "extra_info": {"task": task, "impl": impl, "device": "cuda", "precision": precision, "shape": shape,
                           **info}}


def dcn_group(precision, timings):
    """The forward+backward group of one precision: {impl: (median, extra_info)}, annotated with the ratios."""
    group = f"dcn forward+backward | cuda {precision} | 16x256x64x64"
    dtype = "bfloat16" if precision == "bf16" else "float32"
    entries = [entry("dcn_forward_backward", impl, median, group, precision,
                     **{"baselines": bench_dcn.baselines_of(impl), "dtype": dtype, **info})
               for impl, (median, info) in timings.items()]
    return bench_report.annotate(entries)


def synthetic_result():
    simple, implicit = {"path": "simple", "deterministic": False}, {"path": "implicit", "deterministic": False}
    # fp32 without TF32: the implicit variants did not apply (skipped, so absent)
    fp32 = dcn_group("fp32", {"aecr-simple": (6e-3, simple),
                              "aecr-simple-deterministic": (15e-3, {"path": "simple", "deterministic": True}),
                              "torchvision": (24e-3, {}), "conv2d": (3e-3, {})})
    # TF32: the implicit path ran, its deterministic variant failed (so absent)
    tf32 = dcn_group("tf32", {"aecr-simple": (4e-3, simple), "aecr-implicit": (5e-3, implicit),
                              "torchvision": (20e-3, {}), "conv2d": (2e-3, {})})
    bf16 = dcn_group("bf16", {"aecr-simple": (3e-3, simple),
                              "torchvision": (30e-3, {"dtype": "float32", "note": "no torch.bfloat16 kernel"}),
                              "conv2d": (1e-3, {})})
    model = []
    for precision, timings in (("fp32", {"aecr-simple": 1.0, "baseline": 2.0}),
                               ("bf16", {"aecr-simple": 1.0, "aecr-implicit": 1.5, "baseline": 1.8})):
        group = f"aecr-net training step | cuda {precision} | 16x3x240x240-l1+cr"
        model += bench_report.annotate([
            entry("model_training_step", impl, median, group, precision, shape="16x3x240x240-l1+cr",
                  baselines=[] if impl == "baseline" else ["baseline"],
                  **({} if impl == "baseline" else {"path": impl.split("-")[1]}))
            for impl, median in timings.items()])
    fastdeconv = []
    for layer, shape, aecr in (("aecrnet", "16x3x256x256", 1 / 3.5), ("c64", "8x64x64x64", 1 / 1.9)):
        group = f"fastdeconv training step | cuda fp32 | {layer} {shape}"
        fastdeconv += bench_report.annotate([
            entry("fastdeconv_training_step", "aecr", aecr, group, shape=shape, layer=layer, baselines=["original"]),
            entry("fastdeconv_training_step", "original", 1.0, group, shape=shape, layer=layer, baselines=[])])
    return {"benchmarks": {"dcn": fp32 + tf32 + bf16, "fastdeconv": fastdeconv, "model": model}}


def by_target(rows):
    return {row["target"]: row for row in rows}


def test_targets_label_rows_by_the_path_that_ran_and_only_those():
    rows = gpu_check.targets(synthetic_result())
    measured = [r for r in rows if r["measured"] is not None]
    # fp32 without TF32: the implicit variant did not apply, so no implicit row for it anywhere
    assert not [r for r in rows if r.get("config") == "float32" and r.get("path") == "implicit"]
    fp32 = by_target(r for r in measured if r.get("config") == "float32")
    assert set(fp32) == {
        "DCN fwd+bwd speed-up vs torchvision: 16x256x64x64 float32, simple path",
        "DCN fwd+bwd time / cuDNN conv2d: 16x256x64x64 float32, simple path",
        "DCN deterministic / default fwd+bwd: 16x256x64x64 float32, simple path"}
    assert fp32["DCN fwd+bwd speed-up vs torchvision: 16x256x64x64 float32, simple path"]["measured"] == 4.0
    assert fp32["DCN fwd+bwd speed-up vs torchvision: 16x256x64x64 float32, simple path"]["met"] is True
    assert fp32["DCN fwd+bwd time / cuDNN conv2d: 16x256x64x64 float32, simple path"]["measured"] == 2.0
    assert fp32["DCN fwd+bwd time / cuDNN conv2d: 16x256x64x64 float32, simple path"]["met"] is False
    assert fp32["DCN deterministic / default fwd+bwd: 16x256x64x64 float32, simple path"]["measured"] == 2.5
    assert fp32["DCN deterministic / default fwd+bwd: 16x256x64x64 float32, simple path"]["met"] is False
    # TF32: the implicit path ran, its deterministic variant failed: no deterministic row for implicit
    tf32 = [r for r in measured if r.get("config") == "float32+tf32"]
    assert {(r["kind"], r["path"]) for r in tf32} == {("dcn_vs_torchvision", "simple"), ("dcn_vs_cudnn", "simple"),
                                                    ("dcn_vs_torchvision", "implicit"), ("dcn_vs_cudnn", "implicit")}
    implicit = by_target(r for r in tf32 if r["path"] == "implicit")
    assert implicit["DCN fwd+bwd speed-up vs torchvision: 16x256x64x64 float32+tf32, implicit path"]["measured"] == 4.0
    assert implicit["DCN fwd+bwd time / cuDNN conv2d: 16x256x64x64 float32+tf32, implicit path"]["measured"] == 2.5
    placeholder = [r for r in rows if r["kind"] == "dcn_deterministic" and r.get("config") == "float32+tf32"]
    assert len(placeholder) == 1 and placeholder[0]["measured"] is None and placeholder[0]["met"] is None
    assert "path" not in placeholder[0]


def test_targets_bf16_speedup_is_against_torchvision_in_float32():
    result = synthetic_result()
    rows = [r for r in gpu_check.targets(result) if r.get("config") == "bfloat16" and r["measured"] is not None]
    vs_tv = [r for r in rows if r["kind"] == "dcn_vs_torchvision"]
    assert len(vs_tv) == 1
    assert vs_tv[0]["measured"] == 10.0 and vs_tv[0]["met"] is True   # 30 ms (tv fp32) / 3 ms
    assert "torchvision in float32" in vs_tv[0]["target"]
    vs_conv = [r for r in rows if r["kind"] == "dcn_vs_cudnn"]
    assert vs_conv[0]["measured"] == 3.0 and vs_conv[0]["met"] is False


def test_targets_fastdeconv_and_model_rows():
    rows = gpu_check.targets(synthetic_result())
    fastdeconv = [r for r in rows if r["kind"] == "fastdeconv"]
    assert [(r["measured"], r["met"]) for r in fastdeconv] == [(3.5, True)]   # only AECR-Net's shape is a target
    model = [(r["precision"], r["path"], r["measured"], r["met"]) for r in rows if r["kind"] == "model_training"]
    assert sorted(model) == [("bf16", "implicit", 1.2, False), ("bf16", "simple", 1.8, True),
                             ("fp32", "simple", 2.0, True)]


def test_targets_of_an_empty_result_are_all_not_measured():
    rows = gpu_check.targets({"benchmarks": {"dcn": [], "fastdeconv": [], "model": []}})
    assert rows and all(r["measured"] is None and r["met"] is None for r in rows)
    assert {r["kind"] for r in rows} == set(gpu_check.TARGET_GOALS)
    assert len([r for r in rows if r["kind"].startswith("dcn")]) == 9   # 3 targets x fp32, TF32, bf16


# ---------------------------------------------------------------------------------------------------------------
# Atomic JSON

def test_write_json_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "gpu_check.json"
    gpu_check.write_json_atomic(str(path), {"a": 1, "nan": float("nan"), "inf": [float("inf"), 2.5]})
    assert json.loads(path.read_text()) == {"a": 1, "nan": None, "inf": [None, 2.5]}
    gpu_check.write_json_atomic(str(path), {"b": 2})
    assert json.loads(path.read_text()) == {"b": 2}
    assert os.listdir(tmp_path) == ["gpu_check.json"]


def test_write_json_atomic_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "gpu_check.json"
    gpu_check.write_json_atomic(str(path), {"steps": ["build"]})
    circular = {"steps": []}
    circular["steps"].append(circular)
    with pytest.raises((ValueError, RecursionError)):
        gpu_check.write_json_atomic(str(path), circular)
    assert json.loads(path.read_text()) == {"steps": ["build"]}
    assert os.listdir(tmp_path) == ["gpu_check.json"]


# ---------------------------------------------------------------------------------------------------------------
# bench_dcn: path labels, unsupported dtypes, partial results

def test_rows_are_labelled_by_the_op_that_reports_the_path():
    x, o, w = torch.randn(1, 4, 6, 6), torch.randn(1, 18, 6, 6), torch.randn(3, 4, 3, 3)
    assert bench_dcn.dcn_path_that_runs(x, o, w, padding=1) == aecr_ops.deform_conv2d_path(x, o, w, padding=1) == "cpu"


def test_unsupported_dtype_errors_are_told_apart_from_failures():
    assert bench_dcn.unsupported_dtype(NotImplementedError("\"deformable_im2col\" not implemented for 'BFloat16'"))
    assert bench_dcn.unsupported_dtype(RuntimeError("x not implemented for 'BFloat16'"))
    assert not bench_dcn.unsupported_dtype(RuntimeError("CUDA error: an illegal memory access"))


def test_torchvision_runs_in_float32_where_it_has_no_kernel_for_the_dtype():
    pytest.importorskip("torchvision")
    shape = bench_dcn.Shape(1, 4, 6, 6)
    tensors, note = bench_dcn.torchvision_tensors(bench_dcn.make_problem(shape, torch.bfloat16, "cpu"))
    assert [t.dtype for t in tensors] == [torch.float32] * 5 and "float32" in note
    tensors, note = bench_dcn.torchvision_tensors(bench_dcn.make_problem(shape, torch.float32, "cpu"))
    assert note is None


def test_the_baselines_of_each_implementation():
    assert bench_dcn.baselines_of("aecr") == ["torchvision", "conv2d"]
    assert bench_dcn.baselines_of("aecr-implicit-deterministic") == ["torchvision", "conv2d", "aecr-implicit"]
    assert bench_dcn.baselines_of("torchvision") == bench_dcn.baselines_of("conv2d") == []
    assert bench_dcn.implementations("cuda")[:4] == ["aecr-simple", "aecr-simple-deterministic", "aecr-implicit",
                                                     "aecr-implicit-deterministic"]


def test_bench_dcn_is_a_thin_entry_point_over_the_suite(tmp_path):
    path = tmp_path / "progress.json"
    done = subprocess.run([sys.executable, os.path.join(BENCH, "bench_dcn.py"), "--bench-size", "tiny",
                           "--bench-device", "cpu", "-k", "forward and not backward and not scaling",
                           "-p", "no:cacheprovider", "--bench-progress-json", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    document = json.loads(path.read_text())
    assert document["complete"] is True
    assert {e["extra_info"]["impl"] for e in document["benchmarks"]} == {"aecr", "torchvision", "conv2d", "onnxruntime"}
    (ours,) = [e for e in document["benchmarks"]  # the forward group's shape (the users' shapes have groups too)
               if e["extra_info"]["impl"] == "aecr" and e["extra_info"]["shape"] == "1x8x8x8"]
    assert ours["extra_info"]["path"] == "cpu" and ours["median_s"] > 0
    assert "aecr: work, rates and ratios to the baselines" in done.stdout


# ---------------------------------------------------------------------------------------------------------------
# The whole harness, dry run

def out_files(folder):
    found = []
    for base, dirs, files in os.walk(folder):
        found += [os.path.relpath(os.path.join(base, f), folder) for f in files]
    return found


@pytest.mark.slow
def test_dry_run_walks_every_step_and_leaves_a_valid_json(tmp_path):
    pytest.importorskip("torchvision", reason="the benchmarks' baselines need torchvision (the GPU machine has it)")
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    start = time.time()
    done = subprocess.run(["bash", os.path.join(BENCH, "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    seconds = time.time() - start
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    with open(tmp_path / "gpu_check.json") as f:
        result = json.load(f)
    assert result["dry_run"] is True and result["finished"] is True and result["exit_code"] == 0
    steps = result["steps"]
    assert [s["name"] for s in steps] == STEP_NAMES == [p["name"] for p in result["plan"]]
    for step in steps:
        assert step["status"] in ("dry-run", "ok"), step
        assert step["status"] in gpu_check.STATUSES
        assert isinstance(step["limit_s"], int) and step["limit_s"] > 0
        assert 0 <= step["seconds"] <= step["limit_s"] + 2
        assert step["command"] and isinstance(step["tail"], str) and len(step["tail"]) <= gpu_check.TAIL_CHARS
    assert steps[0]["status"] == "ok"   # the environment probe runs for real
    assert sum(s["limit_s"] for s in steps) == result["step_limits_total_s"] < result["outer_limit_s"]
    for key in ("date", "git_commit", "device", "torch", "cuda", "torchvision", "python", "nvidia_smi",
                "cuda_kernels_built", "benchmarks", "targets"):
        assert key in result
    assert result["torch"] == torch.__version__
    # the test steps collected the same selections, the benchmarks wrote their JSON and targets() ran on it
    assert steps[2]["summary"]["counts"]["collected"] > 0 and steps[3]["summary"]["counts"]["collected"] > 0
    assert steps[4]["summary"]["case"]["ran"] > 0
    # the suite's parts: the CPU cases measured on tiny shapes, the CUDA ones (all of TF32's and bf16's) skipped
    assert {e["step"] for e in result["benchmarks"]["dcn"]} == {"bench_dcn_float32"}
    bench_steps = {s["name"]: s["summary"] for s in steps if s["name"].startswith("bench")}
    assert all(s["complete"] and s["skipped"] > 0 for s in bench_steps.values())
    assert bench_steps["bench_dcn_tf32"]["measured"] == bench_steps["bench_dcn_bfloat16"]["measured"] == 0
    assert set(bench_steps["bench_dcn_tf32"]["skip_reasons"]) == {"needs a CUDA GPU"}
    assert result["benchmarks"]["fastdeconv"] and result["benchmarks"]["model"]
    assert all(e["size"] == "tiny" and e["median_s"] > 0 for e in result["benchmarks"]["model"])
    assert {b["step"] for b in result["suite"]["benchmarks"]} == {"bench_dcn_float32", "bench_fastdeconv",
                                                                 "bench_model"}
    assert all("data" not in b["stats"] for b in result["suite"]["benchmarks"])
    assert any(t["measured"] is not None for t in result["targets"])
    assert any(t["kind"] == "model_training" and t["measured"] is not None for t in result["targets"])
    # what comes back from a GPU machine: at most 8 files, 16 MiB each, plain names
    files = out_files(tmp_path)
    assert sorted(files) == ["gpu_check.json", "gpu_check.log"]
    for name in files:
        assert re.fullmatch(r"[A-Za-z0-9._-]+", name) and os.path.getsize(tmp_path / name) < 16 * 2**20
    assert "gpu_check summary (dry run)" in done.stdout
    assert seconds < 240


@pytest.mark.slow
def test_a_stopped_run_still_leaves_its_json(tmp_path):
    # SIGTERM (gpu_check.sh's outer timeout) during the third step: that step is "timeout", the ones after it
    # "skipped", the JSON is complete and valid, and the harness exits 124.
    process = subprocess.Popen([sys.executable, os.path.join(BENCH, "gpu_check.py"), "--dry-run", "--out",
                                str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        for line in process.stdout:
            if line.startswith("[cuda_tests_simple_fastdeconv] running"):
                time.sleep(0.5)
                process.send_signal(signal.SIGTERM)
                break
        output = process.communicate(timeout=60)[0]
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 124, output
    with open(tmp_path / "gpu_check.json") as f:
        result = json.load(f)
    statuses = [(s["name"], s["status"]) for s in result["steps"]]
    assert [name for name, _ in statuses] == STEP_NAMES
    assert statuses[:3] == [("environment", "ok"), ("build", "dry-run"), ("cuda_tests_simple_fastdeconv", "timeout")]
    assert all(status == "skipped" for _, status in statuses[3:])
    assert result["finished"] is True and result["exit_code"] == 124
    assert not math.isnan(result["elapsed_s"])


# ---------------------------------------------------------------------------------------------------------------
# The whole harness in its real (GPU) mode, with stand-ins for python, pip, pytest, compute-sanitizer and the
# benchmarks: the code paths a GPU slot takes, without a GPU.

FAKE_PYTHON = r'''#!{python}
import json, os, sys, time
args = sys.argv[1:]
DOCS = json.loads({docs!r})
def value(flag):
    return args[args.index(flag) + 1]
if args[:1] == ["-c"]:
    if "GPU_CHECK_ENV" in args[1]:
        print("GPU_CHECK_ENV " + json.dumps({{"python": "3.12.3", "torch": "2.11.0+cu130", "cuda": "13.0",
                                             "torchvision": "0.26.0", "device": "NVIDIA H200", "capability": "9.0"}}))
    elif "GPU_CHECK_BUILD" in args[1]:
        print("GPU_CHECK_BUILD " + json.dumps({{"extension_loaded": True, "cuda_kernels_built": True,
                                               "deform_conv2d_path": True}}))
elif args[:2] == ["-m", "pip"]:
    assert args[2:] == ["install", "-v", "--no-build-isolation", "--no-deps", "-e", "."], args
    assert os.environ["FORCE_CUDA"] == "1" and os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0", os.environ
    print("[1/2] nvcc -c csrc/cuda/deform_conv_cuda.cu\n[2/2] c++ -shared\nSuccessfully installed aecr-0.1.0")
elif args[:2] == ["-m", "pytest"] and "--benchmark-only" in args:
    assert args[args.index("--bench-device") + 1] == "cuda" and "--bench-size" in args, args
    progress = value("--bench-progress-json")
    if "benchmarks/test_model.py" in args:   # one benchmark written, then it hangs: the benchmark must survive
        with open(progress, "w") as f:
            json.dump({{"complete": False, "size": "full", "benchmarks": DOCS["model"], "skipped": []}}, f)
        time.sleep(120)
    key = "fastdeconv" if "benchmarks/test_fastdeconv.py" in args else value("-k")
    with open(progress, "w") as f:
        json.dump({{"complete": True, "size": "full", "benchmarks": DOCS[key],
                   "skipped": [{{"test": "x", "reason": "not applicable: runs the simple path"}}]}}, f)
    with open(value("--benchmark-json"), "w") as f:
        json.dump({{"machine_info": {{"gpu": "NVIDIA H200"}}, "benchmarks": [
            {{"fullname": "benchmarks/x.py::" + key, "stats": {{"median": 1.0, "data": [1.0, 1.0]}}}}]}}, f)
elif args[:2] == ["-m", "pytest"]:
    assert "-m" in args[2:] and "cuda" in args and "-rfE" in args, args
    if "tests/test_deform_conv_cuda.py" in args:
        print("tests/test_deform_conv_cuda.py::test_a PASSED  [ 50%]")
        print("tests/test_fastdeconv_cuda.py::test_b FAILED  [100%]")
        print("FAILED tests/test_fastdeconv_cuda.py::test_b - AssertionError: not close")
        print("========== 1 failed, 1 passed in 1.00s ==========")
        sys.exit(1)
    assert "--ignore=tests/test_deform_conv_cuda.py" in args and "--ignore=tests/test_fastdeconv_cuda.py" in args
    print("tests/test_model_train.py::test_fast PASSED  [ 50%]")
    print("tests/test_model_train.py::test_hangs", flush=True)
    time.sleep(120)
elif args[0].endswith("sanitizer_case.py"):
    print('SANITIZER_CASE_SUMMARY {{"cases": 48, "ran": 48, "skipped": 0, "failed": []}}', flush=True)
else:
    sys.exit("fake python: unexpected arguments %r" % args)
'''

FAKE_SANITIZER = r'''#!{python}
import subprocess, sys
args = sys.argv[1:]
tool = args[args.index("--tool") + 1]
print("========= COMPUTE-SANITIZER", flush=True)
if tool == "racecheck" and "--kernel-name" in args:
    print("========= Error: unrecognized option '--kernel-name'")
    sys.exit(1)
if tool == "synccheck":
    print("========= Error: Device not supported")
    print("RuntimeError: CUDA error: unknown error")
    sys.exit(1)
assert tool != "initcheck", "initcheck must not run once the device was refused"
target = args.index("benchmarks/sanitizer_case.py") - 1
subprocess.run(args[target:], check=True)
if tool == "racecheck":
    print("========= Error: Race reported between Write access at aecr::patch_moments_kernel+0x10 in p.cuh:60")
    print("=========     and Read access at aecr::patch_moments_kernel+0x20 in p.cuh:61")
    print("========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)")
    sys.exit(7)
print("========= ERROR SUMMARY: 0 errors")
'''


def fake_suite_documents():
    """The progress files' benchmarks of the suite's parts, as a GPU run might write them: {step key: entries}."""
    result = synthetic_result()["benchmarks"]
    by_precision = {p: [e for e in result["dcn"] if e["extra_info"]["precision"] == p]
                    for p in ("fp32", "tf32", "bf16")}
    (aecrnet,) = [e for e in result["fastdeconv"] if e["extra_info"]["layer"] == "aecrnet" and
                  e["extra_info"]["impl"] == "aecr"]
    aecrnet["extra_info"]["speedup"] = {"original": 2.5}
    model = [e for e in result["model"] if e["extra_info"]["precision"] == "bf16"
             and e["extra_info"]["impl"] == "aecr-simple"]
    model[0]["extra_info"]["speedup"] = {"baseline": 1.7}
    return {**by_precision, "fastdeconv": [aecrnet], "model": model}


def executable(path, text):
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


def test_real_mode_with_stand_in_tools_records_every_outcome(tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    fake_python = executable(bin_dir / "python3", FAKE_PYTHON.format(python=sys.executable,
                                                                     docs=json.dumps(fake_suite_documents())))
    executable(bin_dir / "compute-sanitizer", FAKE_SANITIZER.format(python=sys.executable))
    executable(bin_dir / "nvidia-smi", "#!/bin/sh\necho 'NVIDIA H200, 580.159.04, 143771 MiB'\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for key, value in (("FORCE_CUDA", "1"), ("TORCH_CUDA_ARCH_LIST", "9.0")):
        monkeypatch.setenv(key, value)
    limits = {"cuda_tests_rest": 2, "bench_model": 2}
    monkeypatch.setattr(gpu_check, "STEPS", [(name, limits.get(name, 20)) for name, _ in gpu_check.STEPS])
    harness = gpu_check.Harness(str(out), dry_run=False, outer_limit=400)
    harness.python = fake_python
    start = time.time()
    assert harness.main() == 1
    assert time.time() - start < 60   # the hanging children were killed at their limits
    with open(out / "gpu_check.json") as f:
        result = json.load(f)
    steps = {s["name"]: s for s in result["steps"]}
    assert list(steps) == STEP_NAMES
    status = {name: s["status"] for name, s in steps.items()}
    assert status == {
        "environment": "ok", "build": "ok", "cuda_tests_simple_fastdeconv": "failed", "cuda_tests_rest": "timeout",
        "sanitizer_memcheck": "ok", "sanitizer_racecheck": "failed", "sanitizer_synccheck": "unsupported",
        "sanitizer_initcheck": "unsupported", "bench_dcn_float32": "ok", "bench_dcn_tf32": "ok",
        "bench_dcn_bfloat16": "ok", "bench_fastdeconv": "ok", "bench_model": "timeout"}
    assert result["device"] == "NVIDIA H200" and result["nvidia_smi"].startswith("NVIDIA H200")
    assert result["torch"] == "2.11.0+cu130" and result["cuda_kernels_built"] is True
    assert steps["build"]["summary"]["ninja_progress"] == "2/2"
    assert steps["build"]["command"] == "python3 -m pip install -v --no-build-isolation --no-deps -e ."
    core = steps["cuda_tests_simple_fastdeconv"]["summary"]
    assert core["counts"] == {"failed": 1, "passed": 1}
    assert core["failed_tests"] == ["FAILED tests/test_fastdeconv_cuda.py::test_b"]
    rest = steps["cuda_tests_rest"]["summary"]
    assert rest["partial"] and rest["counts"] == {"passed": 1} and rest["running"].endswith("test_hangs")
    memcheck = steps["sanitizer_memcheck"]["summary"]
    assert memcheck["errors"] == 0 and memcheck["kernel_filter"] == "kns=aecr" and memcheck["case"]["ran"] == 48
    race = steps["sanitizer_racecheck"]["summary"]
    assert race["kernel_filter"] is None and "kernel-name" in race["filter_refused"]   # retried without it
    assert race["errors"] == 1 and "patch_moments_kernel" in race["first_errors"][0]
    assert "Device not supported" in steps["sanitizer_synccheck"]["summary"]["unsupported"]
    assert steps["sanitizer_initcheck"]["exit_code"] is None                            # not run
    assert "--kernel-name" not in steps["sanitizer_initcheck"]["command"]
    # the benchmark results, the model's benchmark from the part that hung included, and the targets from them
    assert len(result["benchmarks"]["dcn"]) == 11 and {e["step"] for e in result["benchmarks"]["dcn"]} == {
        "bench_dcn_float32", "bench_dcn_tf32", "bench_dcn_bfloat16"}
    assert [e["extra_info"]["speedup"] for e in result["benchmarks"]["model"]] == [{"baseline": 1.7}]
    assert steps["bench_dcn_float32"]["summary"]["skip_reasons"] == {"not applicable: runs the simple path": 1}
    assert [b["fullname"] for b in result["suite"]["benchmarks"]] == [
        "benchmarks/x.py::fp32", "benchmarks/x.py::tf32", "benchmarks/x.py::bf16", "benchmarks/x.py::fastdeconv"]
    assert all("data" not in b["stats"] for b in result["suite"]["benchmarks"])
    rows = result["targets"]
    assert not [r for r in rows if r.get("config") == "float32" and r.get("path") == "implicit"]
    assert [r["measured"] for r in rows if r.get("config") == "float32+tf32" and r.get("path") == "implicit"
            and r["kind"] == "dcn_vs_torchvision"] == [4.0]
    assert [r["measured"] for r in rows if r["kind"] == "fastdeconv"] == [2.5]
    assert [(r["measured"], r["met"]) for r in rows if r["kind"] == "model_training"] == [(1.7, True)]
    assert result["finished"] is True and result["exit_code"] == 1
    assert set(result["problems"]) == {"cuda_tests_simple_fastdeconv", "cuda_tests_rest", "sanitizer_racecheck",
                                       "bench_model"}
    assert sorted(os.listdir(out)) == ["gpu_check.json", "gpu_check.log"]
    printed = capsys.readouterr().out
    assert "==== gpu_check summary ====" in printed and "sanitizer_synccheck" in printed
    assert len(printed[printed.index("==== gpu_check summary"):]) < 8000   # fits the device tool's 12,000


# ---------------------------------------------------------------------------------------------------------------
# The model's predictions beside the measurements

def test_predictions_put_each_modelled_case_beside_its_cuda_measurement(tmp_path):
    model = {"cases": [
        {"op": "deform_conv2d", "path": "simple", "pass": "forward", "dtype": "bfloat16", "shape": "16x256x64x64",
         "predicted_ms": {"H100 SXM": 2.0, "H200": 1.5}},
        {"op": "deform_conv2d", "path": "simple", "pass": "backward", "dtype": "bfloat16", "shape": "16x256x64x64",
         "predicted_ms": {"H100 SXM": 4.0, "H200": 3.0}},
        {"op": "conv2d", "path": "cudnn", "pass": "forward", "dtype": "float32", "shape": "16x256x64x64",
         "predicted_ms": {"H100 SXM": 0.5, "H200": 0.5}}]}
    path = tmp_path / "model.json"
    path.write_text(json.dumps(model))

    def entry(task, impl, median_s, precision="bf16", device="cuda"):
        return {"name": f"{task}-{impl}", "median_s": median_s,
                "extra_info": {"task": task, "impl": impl, "path": "simple", "precision": precision,
                               "shape": "16x256x64x64", "device": device, "deterministic": False}}

    result = {"benchmarks": {"dcn": [entry("dcn_forward", "aecr", 3e-3), entry("dcn_forward_backward", "aecr", 9e-3),
                                     entry("dcn_forward", "aecr", 1.0, device="cpu"),
                                     entry("dcn_forward", "conv2d", 1e-3, precision="fp32")]}}
    rows = {r["case"]: r for r in gpu_check.predictions(result, str(path))}
    forward = rows["deform_conv2d simple forward bfloat16 16x256x64x64"]
    assert forward["measured_ms"] == 3.0 and forward["measured_over_predicted"] == {"H100 SXM": 1.5, "H200": 2.0}
    assert rows["deform_conv2d simple backward bfloat16 16x256x64x64"]["measured_ms"] is None  # no such benchmark
    both = rows["deform_conv2d simple forward+backward bfloat16 16x256x64x64"]
    assert both["predicted_ms"] == {"H100 SXM": 6.0, "H200": 4.5} and both["measured_ms"] == 9.0
    assert rows["conv2d cudnn forward float32 16x256x64x64"]["measured_ms"] == 1.0


def test_predictions_without_a_model_say_so(tmp_path):
    rows = gpu_check.predictions({"benchmarks": {}}, str(tmp_path / "missing.json"))
    assert len(rows) == 1 and "no model" in rows[0]["error"]
