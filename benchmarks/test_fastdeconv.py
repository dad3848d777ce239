"""FastDeconv: aecr's ops (patch statistics, inverse square root) and layer (a training step) against the original
algorithm, one group per step, device and layer. fp32 only (TF32 off): FastDeconv's ops take float32 and float64
(bf16 appears in the network's groups, under autocast)."""
import dataclasses

import pytest

from bench_fastdeconv import IMPLS, LAYERS, STEPS, Layer, make_layer, training_step
from bench_runtime import measure, precision_mode, require_device, selected_devices
from bench_work import count_gflop, record_work


@dataclasses.dataclass(frozen=True)
class Case:
    device: str
    layer: Layer
    impl: str

    def __str__(self):
        return f"{self.device}-fp32-{self.layer}-{self.impl}"


def pytest_generate_tests(metafunc):
    if "fastdeconv_case" in metafunc.fixturenames:
        cases = [Case(device, layer, impl) for device in selected_devices(metafunc.config)
                 for layer in LAYERS[metafunc.config.getoption("bench_size")] for impl in IMPLS]
        metafunc.parametrize("fastdeconv_case", cases, ids=str)


def describe(benchmark, case, what):
    shape = "x".join(str(v) for v in case.layer.input)
    benchmark.group = f"fastdeconv {what} | {case.device} fp32 | {case.layer.name} {shape}"
    benchmark.extra_info.update(task=f"fastdeconv_{what.replace(' ', '_')}", impl=case.impl,
                                device=case.device, precision="fp32", shape=shape, layer=case.layer.name,
                                input_grad=case.layer.input_grad, baselines=["original"] if case.impl == "aecr" else [])


def record(benchmark, case, gflop):
    n, _, h, w = case.layer.input
    record_work(benchmark, gflop=gflop, images=n, pixels_per_image=h * w)


@pytest.mark.parametrize("what", list(STEPS))
def test_fastdeconv_op(benchmark, fastdeconv_case, what):
    case = fastdeconv_case
    require_device(case.device)
    describe(benchmark, case, what)
    module, x = make_layer(case.impl, case.layer, case.device)
    with precision_mode(case.device, "fp32"):
        record(benchmark, case, count_gflop(STEPS[what]("aecr", module, x)))
        measure(benchmark, STEPS[what](case.impl, module, x), case.device)


def test_fastdeconv_training_step(benchmark, fastdeconv_case):
    case = fastdeconv_case
    require_device(case.device)
    describe(benchmark, case, "training step")
    with precision_mode(case.device, "fp32"):
        record(benchmark, case, count_gflop(training_step(*make_layer("aecr", case.layer, case.device))))
        measure(benchmark, training_step(*make_layer(case.impl, case.layer, case.device)), case.device)
