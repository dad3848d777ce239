"""The pytest-benchmark suite in benchmarks/: ratios and rates, the summary, the plot, where runs are kept, and a
saved run compared with the next one (tiny shapes, the CPU)."""
import json
import os
import subprocess
import sys

import pytest

from bench_modules import ROOT, load



bench_report = load("bench_report")
bench_plot = load("bench_plot")
bench_machine = load("bench_machine")


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


def test_ticks_are_decades_and_their_halves_and_fifths_over_short_ranges():
    assert bench_plot.decade_ticks(-1.1, 0.9) == [0.1, 0.2, 0.5, 1.0, 2.0, 5.0]
    assert bench_plot.decade_ticks(-3.2, 1.5) == [0.001, 0.01, 0.1, 1.0, 10.0]
    assert [bench_plot.tick_label(v) for v in (2e-6, 5e-4, 0.02, 3.0)] == ["2 us", "500 us", "20 ms", "3 s"]


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
    assert {b["extra_info"]["impl"] for b in benchmarks} == {"aecr", "torchvision", "conv2d"}
    for bench in benchmarks:
        info = bench["extra_info"]
        assert info["gflop"] > 0 and info["gflop_per_s"] > 0 and info["megapixels_per_s"] > 0
        assert info["images_per_s"] > 0 and all(isinstance(v, str) for v in bench["params"].values())
        if info["impl"] == "aecr":
            assert set(info["speedup"]) == {"torchvision", "conv2d"}
            assert info["time_ratio"]["conv2d"] == pytest.approx(1 / info["speedup"]["conv2d"])
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
