"""The pytest-benchmark suite in benchmarks/: ratios and rates, the summary, the plot, ONNX Runtime's DeformConv
baseline, where runs are kept, and a saved run compared with the next one (tiny shapes, the CPU)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from bench_modules import ROOT, load

bench_report = load("bench_report")
bench_plot = load("bench_plot")
bench_machine = load("bench_machine")
bench_dcn = load("bench_dcn")
bench_onnxruntime = load("bench_onnxruntime")


def entry(impl, median, group="g", shape="1x8x8x8", **info):
    return {"name": impl, "fullname": f"x::{impl}", "group": group, "median_s": median, "rounds": 3,
            "extra_info": {"impl": impl, "shape": shape, "gflop": 2.0, "megapixels": 0.5, "images": 4, **info}}


# ---------------------------------------------------------------------------------------------------------------
# Rates, ratios, summary

def test_annotate_adds_rates_and_the_ratios_to_the_baselines_of_the_same_group_and_shape():
    ours = entry("aecr", 0.5, baselines=["torchvision", "conv2d", "missing"])
    entries = [ours, entry("torchvision", 2.0), entry("conv2d", 0.25),
               entry("torchvision", 0.1, group="other"), entry("torchvision", 0.1, shape="2x8x8x8")]
    bench_report.annotate(entries)
    info = ours["extra_info"]
    assert (info["gflop_per_s"], info["megapixels_per_s"], info["images_per_s"]) == (4.0, 1.0, 8.0)
    assert info["time_ratio"] == {"torchvision": 0.25, "conv2d": 2.0}
    assert info["speedup"] == {"torchvision": 4.0, "conv2d": 0.5}
    assert entries[1]["extra_info"]["time_ratio"] == {} and entries[1]["extra_info"]["gflop_per_s"] == 1.0
    assert bench_report.annotate(entries) == entries and info["speedup"] == {"torchvision": 4.0, "conv2d": 0.5}


def test_summary_names_each_group_and_says_faster_or_slower():
    entries = bench_report.annotate([entry("aecr", 0.5, baselines=["torchvision", "conv2d"], note="a note"),
                                     entry("torchvision", 2.0), entry("conv2d", 0.25)])
    lines = bench_report.summary_lines(entries)
    assert lines[0] == "g" and len(lines) == 4
    assert "500.00 ms" in lines[1] and "4.00x faster than torchvision, 2.00x slower than conv2d (a note)" in lines[1]
    assert "4 GFLOP/s" in lines[1] and "8 img/s" in lines[1]
    assert bench_report.format_seconds(2.5e-5) == "25.0 us" and bench_report.format_seconds(3.0) == "3.000 s"


# ---------------------------------------------------------------------------------------------------------------
# The plot

def sweep_entry(impl, gflop, seconds, sweep, device="cpu"):
    return {"name": impl, "group": sweep, "median_s": seconds, "extra_info": {
        "impl": impl, "gflop": gflop, "sweep": sweep, "sweep_label": f"{sweep} 1 to 16", "device": device,
        "precision": "fp32"}}


def test_the_scaling_plot_has_a_panel_per_sweep_and_device(tmp_path):
    from PIL import Image
    entries = [sweep_entry(impl, g, t * g ** 1.2, sweep, device) for device in ("cpu", "cuda")
               for sweep in ("batch", "channels", "size") for impl, t in (("aecr", 1e-2), ("torchvision", 1e-1))
               for g in (0.1, 0.4, 1.6)]
    path = tmp_path / "plot.png"
    assert bench_plot.write_scaling_plot(entries + [entry("aecr", 1.0)], str(path), "title")
    with Image.open(path) as image:
        assert image.size == (3 * bench_plot.PANEL[0], bench_plot.HEADER + 2 * bench_plot.PANEL[1])
        assert image.getpixel((5, 5)) == (255, 255, 255)
        colours = {colour for _, colour in image.getcolors(maxcolors=1 << 20)}
    assert bench_plot.COLOURS["aecr"] in colours and bench_plot.COLOURS["torchvision"] in colours
    assert not bench_plot.write_scaling_plot([entry("aecr", 1.0)], str(tmp_path / "none.png"), "title")
    assert not (tmp_path / "none.png").exists()


def test_the_scaling_plot_has_a_row_per_pass_and_onnxruntime_in_the_forward_row_only(tmp_path):
    from PIL import Image
    forward = [{**sweep_entry(impl, g, t * g, sweep), "group": f"forward {sweep}"} for sweep in ("batch", "size")
               for impl, t in (("aecr", 1e-2), ("onnxruntime", 3e-2)) for g in (0.1, 0.4)]
    for e in forward:
        e["extra_info"]["pass"] = "forward"
    backward = [sweep_entry("aecr", g, 1e-1 * g, sweep) for sweep in ("batch", "size") for g in (0.1, 0.4)]
    path = tmp_path / "plot.png"
    assert bench_plot.write_scaling_plot(forward + backward, str(path), "title")
    top = bench_plot.HEADER + bench_plot.PANEL[1]
    with Image.open(path) as image:
        assert image.size == (2 * bench_plot.PANEL[0], bench_plot.HEADER + 2 * bench_plot.PANEL[1])
        forward_row = {c for _, c in image.crop((0, bench_plot.HEADER, image.width, top)).getcolors(1 << 20)}
        backward_row = {c for _, c in image.crop((0, top, image.width, image.height)).getcolors(1 << 20)}
    assert bench_plot.COLOURS["onnxruntime"] in forward_row and bench_plot.COLOURS["aecr"] in forward_row
    assert bench_plot.COLOURS["onnxruntime"] not in backward_row and bench_plot.COLOURS["aecr"] in backward_row
    keys = list(bench_plot.sweep_panels(forward + backward))
    assert keys[0] == ("cpu", "fp32", "forward", "batch") and ("cpu", "fp32", "forward+backward", "size") in keys


def test_ticks_are_decades_and_their_halves_and_fifths_over_short_ranges():
    assert bench_plot.decade_ticks(-1.1, 0.9) == [0.1, 0.2, 0.5, 1.0, 2.0, 5.0]
    assert bench_plot.decade_ticks(-3.2, 1.5) == [0.001, 0.01, 0.1, 1.0, 10.0]
    assert [bench_plot.tick_label(v) for v in (2e-6, 5e-4, 0.02, 3.0)] == ["2 us", "500 us", "20 ms", "3 s"]


# ---------------------------------------------------------------------------------------------------------------
# ONNX Runtime's DeformConv, a baseline of the CPU forward groups

def has_onnxruntime():
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))


def needs_onnxruntime():
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")


def grouped_problem():
    """x [2, 8, 9, 11], 2 weight groups (6 outputs), 2 offset groups, stride 2, dilation (1, 2): [2, 6, 5, 5]."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 9, 11, generator=g)
    offset = 1.5 * torch.randn(2, 2 * 2 * 9, 5, 5, generator=g)
    weight, bias = torch.randn(6, 4, 3, 3, generator=g), torch.randn(6, generator=g)
    return x, offset, weight, bias, torch.rand(2, 2 * 9, 5, 5, generator=g)


def test_onnxruntime_agrees_with_aecr_with_offset_groups_weight_groups_stride_and_dilation():
    needs_onnxruntime()
    import aecr_ops
    geometry = dict(stride=2, padding=1, dilation=(1, 2))
    tensors = grouped_problem()
    fn = bench_onnxruntime.deform_conv2d_for(tensors, groups=2, offset_groups=2, **geometry)
    expected = aecr_ops.deform_conv2d(*tensors[:4], mask=tensors[4], **geometry)
    assert expected.shape == (2, 6, 5, 5)
    scale = expected.abs().max().item()
    torch.testing.assert_close(fn(*tensors), expected, rtol=1e-4, atol=1e-4 * scale)
    # other tensors of the same shapes: converted at the call, not the arrays made for the first ones
    others = [t.flip(-1).contiguous() for t in tensors]
    torch.testing.assert_close(fn(*others), aecr_ops.deform_conv2d(*others[:4], mask=others[4], **geometry),
                               rtol=1e-4, atol=1e-4 * scale)
    assert not torch.allclose(fn(*others), expected, rtol=1e-2, atol=1e-2 * scale)


def test_the_check_against_aecr_measures_the_difference_and_fails_loudly():
    needs_onnxruntime()
    tensors = bench_dcn.make_problem(bench_dcn.Shape(1, 8, 8, 8), torch.float32, "cpu")
    fn = bench_dcn.implementation_for("onnxruntime", tensors)
    assert 0 <= bench_dcn.max_abs_diff_vs_aecr("onnxruntime", fn, tensors) < 1e-4
    with pytest.raises(AssertionError, match="onnxruntime disagrees with aecr_ops.deform_conv2d"):
        bench_dcn.max_abs_diff_vs_aecr("onnxruntime", lambda *t: fn(*t) * 1.01, tensors)


def test_the_onnxruntime_session_uses_torchs_thread_count_and_does_not_spin():
    needs_onnxruntime()
    tensors = bench_dcn.make_problem(bench_dcn.Shape(1, 4, 6, 6), torch.float32, "cpu")
    previous = torch.get_num_threads()
    sessions = {}
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            sessions[threads] = bench_onnxruntime.deform_conv2d_for(tensors, padding=1).session
            options = sessions[threads].get_session_options()
            assert (options.intra_op_num_threads, options.inter_op_num_threads) == (threads, 1)
            for pool in ("intra_op", "inter_op"):
                assert options.get_session_config_entry(f"session.{pool}.allow_spinning") == "0"
        torch.set_num_threads(1)
        assert bench_onnxruntime.deform_conv2d_for(tensors, padding=1).session is sessions[1]  # cached
    finally:
        torch.set_num_threads(previous)
    assert sessions[1] is not sessions[3]


def test_onnxruntime_is_a_baseline_of_aecr_in_cpu_forward_groups_only():
    assert bench_dcn.baselines_of("aecr", "forward", "cpu") == ["torchvision", "conv2d", "onnxruntime"]
    assert bench_dcn.baselines_of("aecr", "forward+backward", "cpu") == ["torchvision", "conv2d"]
    assert bench_dcn.baselines_of("aecr-simple", "forward", "cuda") == ["torchvision", "conv2d"]
    assert bench_dcn.baselines_of("aecr-implicit-deterministic", "forward", "cuda")[-1] == "aecr-implicit"
    assert bench_dcn.baselines_of("onnxruntime", "forward", "cpu") == []
    assert bench_dcn.implementations("cpu", "forward") == ["aecr", "torchvision", "conv2d", "onnxruntime"]


def collected_ids(*files):
    done = subprocess.run([sys.executable, "-m", "pytest", *files, "--collect-only", "-q", "--bench-size", "tiny",
                           "--bench-device", "all", "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    return [line for line in done.stdout.splitlines() if "::" in line]


def test_onnxruntime_rows_are_generated_in_every_cpu_forward_group_and_nowhere_else():
    ids = collected_ids("benchmarks/test_dcn.py", "benchmarks/test_dcn_scaling.py")
    ours = sorted(i for i in ids if "onnxruntime" in i)
    assert all("[cpu-fp32-" in i and i.endswith("-onnxruntime-forward]") for i in ours)
    # one beside every CPU forward aecr row, of the DCN groups and of the sweeps
    beside_aecr = sorted(i.replace("-aecr-forward]", "-onnxruntime-forward]") for i in ids
                         if "[cpu-" in i and i.endswith("-aecr-forward]"))
    assert ours == beside_aecr
    assert any("test_deform_conv2d[" in i for i in ours) and any("test_deform_conv2d_scaling[" in i for i in ours)
    assert any("[cuda-" in i for i in ids) and any(i.endswith("-forward+backward]") for i in ids)
    # the forward+backward sweeps keep their ids (--bench-compare-last finds them in earlier runs)
    assert "benchmarks/test_dcn_scaling.py::test_deform_conv2d_scaling[cpu-fp32-batch-1x8x8x8-aecr]" in ids


# ---------------------------------------------------------------------------------------------------------------
# Where runs are kept

def test_machine_kinds_name_the_gpu_or_the_cpu_and_its_cores():
    assert bench_machine.kind({"gpu": "NVIDIA H200", "cpu_model": "x"}) == "cuda-nvidia-h200"
    assert bench_machine.kind({"gpu": None, "cpu_model": "AMD EPYC", "cpu_family": "25", "cpu_model_number": "17",
                               "cpu_count": 2}) == "cpu-amd-epyc-f25m17-2-cores"
    assert bench_machine.kind({"gpu": None, "cpu_model": "Intel(R) Xeon(R) Processor", "cpu_family": None,
                               "cpu_count": 2}) == "cpu-intel-xeon-processor-2-cores"


def test_new_runs_sort_by_time_and_never_overwrite(tmp_path):
    import datetime
    now = datetime.datetime(2026, 12, 2, 10, 30, 5)
    first = bench_machine.new_run_path(str(tmp_path), "k", "full", now)
    open(first, "w").close()
    second = bench_machine.new_run_path(str(tmp_path), "k", "full", now)
    assert os.path.basename(first) == "2026-12-02-103005-full.json"
    assert os.path.basename(second) == "2026-12-02-103006-full.json"
    assert bench_machine.plot_path(first).endswith("2026-12-02-103005-full-scaling.png")


def test_the_last_committed_run_of_a_kind_and_size(tmp_path):
    folder = tmp_path / "k"
    folder.mkdir()
    for name in ("2026-12-01-090000-full.json", "2026-12-02-090000-full.json", "2026-12-03-090000-tiny.json"):
        (folder / name).write_text("{}")
    # outside a git checkout: every run counts
    assert bench_machine.last_committed_run(str(tmp_path), "k", "full") == str(folder / "2026-12-02-090000-full.json")
    assert bench_machine.last_committed_run(str(tmp_path), "other", "full") is None
    # in a git checkout: only the runs git tracks
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    assert bench_machine.last_committed_run(str(tmp_path), "k", "full") is None
    subprocess.run(["git", "-C", str(tmp_path), "add", "k/2026-12-01-090000-full.json"], check=True)
    assert bench_machine.last_committed_run(str(tmp_path), "k", "full") == str(folder / "2026-12-01-090000-full.json")


# ---------------------------------------------------------------------------------------------------------------
# A saved run, compared with the next one

SELECTION = ["benchmarks/test_dcn.py", "benchmarks/test_dcn_scaling.py", "-k",
             "(test_deform_conv2d and not backward and not gradients) or (scaling and batch)"]


def run_suite(results, *options):
    command = [sys.executable, "-m", "pytest", *SELECTION, "--benchmark-only", "--bench-size", "tiny",
               "--bench-device", "cpu", "--bench-results", str(results), "-p", "no:cacheprovider",
               "--benchmark-min-rounds=2", "--benchmark-max-time=0", *options]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_a_saved_run_is_compared_with_the_next_and_a_regression_fails(tmp_path):
    saved = run_suite(tmp_path, "--bench-save")
    assert saved.returncode == 0, saved.stdout[-4000:] + saved.stderr[-2000:]
    (kind,) = os.listdir(tmp_path)
    files = sorted(os.listdir(tmp_path / kind))
    assert len(files) == 2 and files[0].endswith("-tiny-scaling.png") and files[1].endswith("-tiny.json")
    document = json.loads((tmp_path / kind / files[1]).read_text())
    machine = document["machine_info"]
    assert machine["machine_kind"] == kind and machine["bench_size"] == "tiny"
    assert machine["cpu_model"] and machine["torch"] and "torchvision" in machine and "cuda" in machine
    benchmarks = document["benchmarks"]
    onnxruntime = ["onnxruntime"] if has_onnxruntime() else []
    assert {b["extra_info"]["impl"] for b in benchmarks} == {"aecr", "torchvision", "conv2d", *onnxruntime}
    for bench in benchmarks:
        info = bench["extra_info"]
        assert info["gflop"] > 0 and info["gflop_per_s"] > 0 and info["megapixels_per_s"] > 0
        assert info["images_per_s"] > 0 and all(isinstance(v, str) for v in bench["params"].values())
        forward = bench["group"].startswith(("dcn forward |", "dcn scaling forward:"))
        if info["impl"] == "aecr":
            assert set(info["speedup"]) == {"torchvision", "conv2d", *(onnxruntime if forward else [])}
            assert info["time_ratio"]["conv2d"] == pytest.approx(1 / info["speedup"]["conv2d"])
        if info["impl"] == "onnxruntime":
            assert forward and "| cpu fp32" in bench["group"] and info["max_abs_diff_vs_aecr"] < 1e-4
    assert "aecr: work, rates and ratios to the baselines" in saved.stdout
    assert "faster than torchvision" in saved.stdout or "slower than torchvision" in saved.stdout

    # the next run, compared with the saved one: within a (generous) threshold it passes ...
    compared = run_suite(tmp_path, "--bench-compare-last", "--benchmark-compare-fail=median:100000%")
    assert compared.returncode == 0, compared.stdout[-4000:] + compared.stderr[-2000:]
    assert "Comparing against benchmarks from" in compared.stdout + compared.stderr
    assert "(NOW)" in compared.stdout

    # ... and against a run 100 times faster, the default threshold (median:25%) flags a regression
    for bench in document["benchmarks"]:
        for key in ("min", "max", "mean", "median"):
            bench["stats"][key] /= 100
    (tmp_path / kind / files[1]).write_text(json.dumps(document))
    regressed = run_suite(tmp_path, "--bench-compare-last")
    assert regressed.returncode != 0
    assert "Performance has regressed" in regressed.stdout + regressed.stderr
    assert "aecr: work, rates and ratios to the baselines" in regressed.stdout


def test_comparing_without_a_saved_run_is_a_usage_error(tmp_path):
    done = run_suite(tmp_path, "--bench-compare-last")
    assert done.returncode == 4 and "no committed tiny run of machine kind" in done.stdout + done.stderr


def test_a_saved_runs_groups_become_markdown_tables():
    document = {"benchmarks": [
        {"name": n, "fullname": n, "group": "g", "stats": {"median": m, "rounds": 3}, "extra_info": info}
        for n, m, info in (("a", 0.5, {"impl": "aecr", "shape": "s", "gflop": 2.0, "baselines": ["torchvision"]}),
                           ("b", 2.0, {"impl": "torchvision", "shape": "s", "gflop": 2.0}))]}
    lines = bench_report.markdown_tables(bench_report.annotate(bench_report.entries_of_json(document)))
    assert lines[0] == "**g**" and lines[2].startswith("| implementation | median |")
    assert lines[4] == "| aecr | 500.00 ms | 2 | 4 | 0 | 0 | 4.00x faster than torchvision |"
    assert lines[5].endswith("| - |")
