"""The pytest-benchmark suite of aecr: options, machine info, ratios, the summary table, the plot, saved runs.

    pytest benchmarks --benchmark-only                         # every group, full size (CPU; CUDA when present)
    pytest benchmarks --benchmark-only --bench-save            # ... and keep the run: benchmarks/results/<kind>/
    pytest benchmarks --benchmark-only --bench-compare-last    # ... against the last committed run of this kind
    pytest benchmarks --benchmark-disable --bench-size tiny    # CI: every benchmark once, on tiny shapes

The README's test command (`pytest tests`) does not collect this folder (pyproject's testpaths is tests/).
Ratios to the baselines and rates are computed once every benchmark has run (bench_report.annotate), before
pytest-benchmark writes its JSON, so they are in the JSON's extra_info as well as in the summary.
"""
import os

# cuBLAS is deterministic only with a fixed workspace, set before CUDA starts (the deterministic DCN variants).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
from pytest_benchmark.utils import parse_compare_fail  # noqa: E402

import aecr_ops  # noqa: E402
import bench_machine  # noqa: E402
import bench_plot  # noqa: E402
import bench_report  # noqa: E402
from bench_common import write_json_atomic  # noqa: E402
from bench_runtime import selected_devices  # noqa: E402

if not aecr_ops.extension_loaded():
    raise RuntimeError("the compiled kernels are not built: run `make install` (or pip install -e .) first")

REGRESSION_THRESHOLD = "median:25%"


def pytest_addoption(parser):
    group = parser.getgroup("aecr benchmarks")
    group.addoption("--bench-size", choices=("tiny", "full"), default=os.environ.get("AECR_BENCH_SIZE", "full"),
                    help="full: the shapes the README quotes; tiny: the same code on tiny shapes, seconds in all "
                    "(default: $AECR_BENCH_SIZE, else full)")
    group.addoption("--bench-device", choices=("all", "cpu", "cuda"), default="all",
                    help="the devices to benchmark (default all: the CPU, and CUDA where there is a GPU)")
    group.addoption("--bench-save", action="store_true",
                    help="write the run's JSON to <results>/<machine kind>/<date-time>-<size>.json (and its "
                    "scaling plot beside it): the run to commit")
    group.addoption("--bench-compare-last", action="store_true",
                    help="compare with the last committed run of this machine kind and size, and fail on a "
                    f"regression ({REGRESSION_THRESHOLD} unless --benchmark-compare-fail says otherwise)")
    group.addoption("--bench-results", default=bench_machine.RESULTS,
                    help="the folder of saved runs (default: benchmarks/results)")
    group.addoption("--bench-progress-json", default=None, metavar="PATH",
                    help="rewrite PATH after every benchmark with the results so far (the GPU check's record)")


def uses_cuda(config):
    import torch
    return "cuda" in selected_devices(config) and torch.cuda.is_available()


def pytest_configure(config):
    """Turns --bench-save and --bench-compare-last into pytest-benchmark's own options (its session reads them
    in its pytest_configure, which runs after this one)."""
    config._aecr_machine = bench_machine.facts(uses_cuda(config))
    config._aecr_skipped = []
    kind, size = config._aecr_machine["machine_kind"], config.getoption("bench_size")
    root = config.getoption("bench_results")
    if config.getoption("bench_save") and not config.option.benchmark_json:
        from pathlib import Path
        config.option.benchmark_json = Path(bench_machine.new_run_path(root, kind, size))
    if config.option.benchmark_json:  # pytest-benchmark writes it into an existing folder only
        os.makedirs(os.path.dirname(os.path.abspath(config.option.benchmark_json)), exist_ok=True)
    if config.getoption("bench_compare_last"):
        last = bench_machine.last_committed_run(root, kind, size)
        if last is None:
            raise pytest.UsageError(f"--bench-compare-last: no committed {size} run of machine kind {kind!r} "
                                    f"under {root}")
        config.option.benchmark_compare = last
        if not config.option.benchmark_compare_fail:
            config.option.benchmark_compare_fail = [parse_compare_fail(REGRESSION_THRESHOLD)]


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.update(config._aecr_machine)
    machine_info["bench_size"] = config.getoption("bench_size")


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Parameters as their text (the cases are dataclasses, which JSON cannot hold)."""
    for bench in output_json["benchmarks"]:
        bench["params"] = {name: value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
                           for name, value in (bench.get("params") or {}).items()}


def timed_entries(config):
    return bench_report.annotate(bench_report.entries_of(config._benchmarksession.benchmarks))


def write_progress(config, complete):
    path = config.getoption("bench_progress_json")
    if path:
        write_json_atomic(path, {"complete": complete, "machine": config._aecr_machine,
                                 "size": config.getoption("bench_size"), "benchmarks": timed_entries(config),
                                 "skipped": config._aecr_skipped}, default=str)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Keeps the skip reasons (a CUDA variant that does not apply, a missing GPU) for the progress file."""
    report = yield
    if report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        item.config._aecr_skipped.append({"test": report.nodeid, "reason": reason.removeprefix("Skipped: ")})
    return report


@pytest.fixture(autouse=True)
def _record_progress(request):
    yield
    write_progress(request.config, complete=False)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session):
    """Before pytest-benchmark writes its JSON (in its own wrapper of this hook, inside this one): the rates and
    ratios, the progress file, and the scaling plot beside the JSON."""
    config = session.config
    entries = timed_entries(config)
    write_progress(config, complete=True)
    json_path = config.option.benchmark_json
    if json_path and entries:
        machine = config._aecr_machine
        where = machine["gpu"] or f"{machine['cpu_model']}, {machine['cpu_count']} cores"
        path = bench_machine.plot_path(str(json_path))
        try:
            if bench_plot.write_scaling_plot(entries, path, f"DCN forward and forward+backward, median time "
                                             f"against work (log-log); {where}; torch {machine['torch']}"):
                config._aecr_plot = path
        except OSError as error:  # the JSON matters more than its plot
            config._aecr_plot = f"not written: {error}"
    yield


@pytest.hookimpl(wrapper=True)
def pytest_terminal_summary(terminalreporter):
    """The suite's own table after pytest-benchmark's (also when that one raises for a regression)."""
    try:
        return (yield)
    finally:
        config = terminalreporter.config
        entries = timed_entries(config)
        if entries:
            machine = config._aecr_machine
            terminalreporter.section("aecr: work, rates and ratios to the baselines (medians)")
            terminalreporter.write_line(
                f"CPU {machine['cpu_model']} ({machine['cpu_count']} cores, {machine['torch_threads']} threads); "
                f"GPU {machine['gpu'] or 'none'}; torch {machine['torch']}, torchvision {machine['torchvision']}, "
                f"CUDA {machine['cuda']}; size {config.getoption('bench_size')}")
            for line in bench_report.summary_lines(entries):
                terminalreporter.write_line(line)
            if getattr(config, "_aecr_plot", None):
                terminalreporter.write_line(f"scaling plot: {config._aecr_plot}")
