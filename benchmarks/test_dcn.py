"""DCN forward and forward+backward: aecr against torchvision's deform_conv2d and conv2d of the same shape (and in
the CPU forward groups ONNX Runtime's DeformConv, checked against aecr before it is timed), in one group per pass,
device, precision and shape; and aecr's forward+backward when only some gradients are needed, against all of
them."""
import dataclasses

import pytest

from bench_dcn import (GRADIENT_SHAPES, GRADIENT_SUBSETS, ONNXRUNTIME, PASSES, SHAPES, TENSORS, USER_SHAPES, Shape,
                       aecr, baselines_of, conv2d, dcn_path_that_runs, forward_backward, implementation_for,
                       implementations, make_problem, max_abs_diff_vs_aecr, pass_of, torchvision_tensors)
from bench_runtime import (PRECISIONS, aecr_variants, dcn_variant, dtype_of, measure, precision_mode,
                           require_device, selected_devices, skip_unless_path)
from bench_work import count_gflop, record_work


@dataclasses.dataclass(frozen=True)
class Case:
    device: str
    precision: str
    shape: Shape
    impl: str

    def __str__(self):
        return f"{self.device}-{self.precision}-{self.shape}-{self.impl}"


def dcn_cases(devices, size):
    """(case, pass) of every forward and forward+backward group, an implementation's passes one after the other.
    The forward groups have every implementation; onnxruntime, last, has no forward+backward. Then the CPU's
    forward groups of USER_SHAPES, in fp32."""
    return [(Case(device, precision, shape, impl), direction) for device in devices
            for precision in PRECISIONS[device] for shape in SHAPES[size, device]
            for impl in implementations(device, "forward") for direction in PASSES
            if impl in implementations(device, direction)] + [
        (Case("cpu", "fp32", shape, impl), "forward") for shape in USER_SHAPES[size] if "cpu" in devices
        for impl in implementations("cpu", "forward")]


def pytest_generate_tests(metafunc):
    size, devices = metafunc.config.getoption("bench_size"), selected_devices(metafunc.config)
    if "dcn_case" in metafunc.fixturenames:
        cases = dcn_cases(devices, size)
        metafunc.parametrize(("dcn_case", "direction"), cases, ids=[f"{case}-{direction}" for case, direction in cases])
    if "gradient_case" in metafunc.fixturenames:
        cases = [Case(device, PRECISIONS[device][0], GRADIENT_SHAPES[size, device], subset) for device in devices
                 for subset in GRADIENT_SUBSETS]
        metafunc.parametrize("gradient_case", cases, ids=str)


def describe(case, task, **info):
    return dict(task=task, impl=case.impl, device=case.device, precision=case.precision,
                shape=str(case.shape), **info)


def test_deform_conv2d(benchmark, dcn_case, direction):
    case = dcn_case
    require_device(case.device)
    tensors = make_problem(case.shape, dtype_of(case.precision), case.device)
    path, deterministic = aecr_variants(case.device).get(case.impl, (None, False))
    benchmark.group = f"dcn {direction} | {case.device} {case.precision} | {case.shape}"
    benchmark.extra_info.update(describe(case, f"dcn_{direction.replace('+', '_')}",
                                         baselines=baselines_of(case.impl, direction, case.device)))
    with precision_mode(case.device, case.precision), dcn_variant(path, deterministic):
        if case.impl.startswith("aecr"):
            x, offset, weight, _, mask = tensors
            actual = dcn_path_that_runs(x, offset, weight, mask=mask, padding=1)
            skip_unless_path(path, actual)
            benchmark.extra_info.update(path=actual, deterministic=deterministic)
        elif case.impl == "torchvision":
            pytest.importorskip("torchvision")
            tensors, note = torchvision_tensors(tensors)
            if note:
                benchmark.extra_info["note"] = note
        elif case.impl == ONNXRUNTIME:
            pytest.importorskip("onnx")
            pytest.importorskip("onnxruntime")
        benchmark.extra_info["dtype"] = str(tensors[0].dtype).replace("torch.", "")
        counted = conv2d if case.impl == "conv2d" else aecr
        record_work(benchmark, gflop=count_gflop(pass_of(direction, counted, tensors)), images=case.shape.batch,
                    pixels_per_image=case.shape.height * case.shape.width)
        fn = implementation_for(case.impl, tensors)
        if case.impl == ONNXRUNTIME:
            benchmark.extra_info["max_abs_diff_vs_aecr"] = max_abs_diff_vs_aecr(case.impl, fn, tensors)
        measure(benchmark, pass_of(direction, fn, tensors), case.device)


def test_deform_conv2d_gradients(benchmark, gradient_case):
    case = gradient_case
    require_device(case.device)
    tensors = make_problem(case.shape, dtype_of(case.precision), case.device)
    requires = GRADIENT_SUBSETS[case.impl]
    benchmark.group = f"dcn gradients | {case.device} {case.precision} | {case.shape}"
    benchmark.extra_info.update(describe(case, "dcn_gradients", baselines=[] if case.impl == "all" else ["all"],
                                         requires_grad=dict(zip(TENSORS, requires))))
    with precision_mode(case.device, case.precision):
        x, offset, weight, _, mask = tensors
        benchmark.extra_info["path"] = dcn_path_that_runs(x, offset, weight, mask=mask, padding=1)
        record_work(benchmark, gflop=count_gflop(forward_backward(aecr, tensors, requires)), images=case.shape.batch,
                    pixels_per_image=case.shape.height * case.shape.width)
        measure(benchmark, forward_backward(aecr, tensors, requires), case.device)
