"""How the cost of the DCN grows with the work: sweeps of batch (1 to 16), channels (64 to 256) and image size
(64 x 64 to a 1080p image at AECR-Net's quarter resolution, 270 x 480), each from B1 C64 64x64, of the forward
(aecr, torchvision, conv2d and on the CPU ONNX Runtime's DeformConv, checked against aecr before it is timed) and
of the forward+backward (aecr, torchvision, conv2d). One group per sweep, pass, device and precision; the plot
(bench_plot.py) draws time against work.

Sweeps run in fp32 (torchvision has no bf16 kernel), on aecr's default path. min_rounds=2: a point whose call
takes over half a second runs 2 rounds (after pytest-benchmark's calibration call) rather than 5, since the
largest points take seconds a call for torchvision on the CPU.

The forward+backward points keep the ids they had before the forward sweeps (no pass in them), so that
--bench-compare-last still finds them in earlier runs; the forward points' ids end in "-forward".
"""
import dataclasses

import pytest

from bench_dcn import (ONNXRUNTIME, PASSES, SWEEPS, Shape, aecr, baselines, baselines_of, conv2d, implementation_for,
                       make_problem, max_abs_diff_vs_aecr, pass_of)
from bench_runtime import dtype_of, measure, precision_mode, require_device, selected_devices
from bench_work import count_gflop, record_work


@dataclasses.dataclass(frozen=True)
class Point:
    device: str
    sweep: str
    label: str
    shape: Shape
    impl: str
    direction: str

    def __str__(self):
        name = f"{self.device}-fp32-{self.sweep}-{self.shape}-{self.impl}"
        return name if self.direction == "forward+backward" else f"{name}-{self.direction}"


def sweep_label(sweep, shapes):
    """E.g. "batch 1 to 16 (C64, 64x64)"."""
    first, last = shapes[0], shapes[-1]
    if sweep == "batch":
        return f"batch {first.batch} to {last.batch} (C{first.channels}, {first.height}x{first.width})"
    if sweep == "channels":
        return f"channels {first.channels} to {last.channels} (B{first.batch}, {first.height}x{first.width})"
    return (f"size {first.height}x{first.width} to {last.height}x{last.width} "
            f"(B{first.batch}, C{first.channels})")


def pytest_generate_tests(metafunc):
    if "point" in metafunc.fixturenames:
        sweeps = SWEEPS[metafunc.config.getoption("bench_size")]
        points = [Point(device, sweep, sweep_label(sweep, shapes), shape, impl, direction)
                  for device in selected_devices(metafunc.config) for sweep, shapes in sweeps.items()
                  for direction in PASSES for shape in shapes for impl in ("aecr", *baselines(direction, device))]
        metafunc.parametrize("point", points, ids=str)


@pytest.mark.benchmark(min_rounds=2)
def test_deform_conv2d_scaling(benchmark, point):
    require_device(point.device)
    if point.impl == "torchvision":
        pytest.importorskip("torchvision")
    if point.impl == ONNXRUNTIME:
        pytest.importorskip("onnx")
        pytest.importorskip("onnxruntime")
    tensors = make_problem(point.shape, dtype_of("fp32"), point.device)
    benchmark.group = f"dcn scaling {point.direction}: {point.label} | {point.device} fp32"
    benchmark.extra_info.update(task="dcn_scaling", impl=point.impl, device=point.device, precision="fp32",
                                shape=str(point.shape), sweep=point.sweep, sweep_label=point.label,
                                baselines=baselines_of(point.impl, point.direction, point.device))
    benchmark.extra_info["pass"] = point.direction
    with precision_mode(point.device, "fp32"):
        counted = conv2d if point.impl == "conv2d" else aecr
        record_work(benchmark, gflop=count_gflop(pass_of(point.direction, counted, tensors)),
                    images=point.shape.batch, pixels_per_image=point.shape.height * point.shape.width)
        fn = implementation_for(point.impl, tensors)
        if point.impl == ONNXRUNTIME:
            benchmark.extra_info["max_abs_diff_vs_aecr"] = max_abs_diff_vs_aecr(point.impl, fn, tensors)
        measure(benchmark, pass_of(point.direction, fn, tensors), point.device)
