"""AECR-Net: a training step and inference, aecr (on CUDA once per DCN path) against the same network on
torchvision's DCN and the original FastDeconv ("baseline"); and inference by ONNX Runtime (CPU, fp32) of the
exported network against aecr in PyTorch eager. One group per task, device, precision and problem; bf16 is
autocast."""
import copy
import dataclasses

import pytest
import torch

from aecr_model import host_memory
from bench_model import INFERENCE, TRAINING, VARIANTS, Networks, dcn_path, dehaze, inference, loss_of, training_step
from bench_runtime import PRECISIONS, ProcessCosts, dcn_variant, measure, precision_mode, require_device, \
    selected_devices, skip_unless_path
from bench_work import count_gflop, record_work

# (task, device, problem) -> GFLOP, shared by the implementations of a problem. Counted on a copy of the network:
# a count under FakeTensorMode would leave fake tensors in the layers' caches (FastDeconv's folded weight in eval).
COUNTS = {}
# Inference rows of the CPU in fp32 only: ONNX Runtime running the exported network, and aecr run channels-last
# (dehaze_tensor's memory_format) against aecr in the default layout.
CPU_FP32_ONLY = ["aecr-channels-last", "onnxruntime"]


@dataclasses.dataclass(frozen=True)
class Case:
    device: str
    precision: str
    problem: object
    impl: str

    def __str__(self):
        return f"{self.device}-{self.precision}-{self.problem}-{self.impl}"


def pytest_generate_tests(metafunc):
    size, devices = metafunc.config.getoption("bench_size"), selected_devices(metafunc.config)
    combos = [(device, precision) for device in devices for precision in PRECISIONS[device]]
    if "training_case" in metafunc.fixturenames:
        cases = [Case(d, p, TRAINING[size, d], impl) for d, p in combos for impl in [*VARIANTS[d], "baseline"]]
        metafunc.parametrize("training_case", cases, ids=str)
    if "inference_case" in metafunc.fixturenames:
        cases = [Case(d, p, image, impl) for d, p in combos for image in INFERENCE[size, d]
                 for impl in [*VARIANTS[d], "baseline", *(CPU_FP32_ONLY if (d, p) == ("cpu", "fp32") else [])]]
        metafunc.parametrize("inference_case", cases, ids=str)


@pytest.fixture(scope="session")
def networks():
    """networks(device): the Networks of that device, built once a session."""
    built = {}

    def get(device):
        if device not in built:
            built[device] = Networks(device)
        return built[device]
    return get


@pytest.fixture(scope="session")
def onnx_dehazer(networks, tmp_path_factory):
    """ONNX Runtime (CPU) running the CPU network exported to ONNX (once a session)."""
    for module in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(module)
    from aecr_model.onnx_export import OnnxDehazer, export_onnx
    path = export_onnx(copy.deepcopy(networks("cpu").ours).eval(), str(tmp_path_factory.mktemp("onnx") / "aecr.onnx"))
    return OnnxDehazer(path, threads=torch.get_num_threads())


def prepare(benchmark, case, task, baselines):
    """Skips what cannot run here, names the group, describes the benchmark; returns (autocast dtype, DCN path)."""
    require_device(case.device)
    if case.impl == "baseline":
        pytest.importorskip("torchvision")
    benchmark.group = f"aecr-net {task.replace('_', ' ')} | {case.device} {case.precision} | {case.problem}"
    benchmark.extra_info.update(task=f"model_{task}", impl=case.impl, device=case.device,
                                precision=case.precision, shape=str(case.problem), baselines=baselines)
    return (torch.bfloat16 if case.precision == "bf16" else None), VARIANTS[case.device].get(case.impl)


def check_path(benchmark, nets, case, path):
    if case.impl.startswith("aecr"):
        actual = dcn_path(nets.ours, torch.bfloat16 if case.precision == "bf16" else torch.float32, path)
        skip_unless_path(path, actual)
        benchmark.extra_info["path"] = actual


@pytest.mark.benchmark(min_rounds=3)
def test_training_step(benchmark, training_case, networks):
    case, problem = training_case, training_case.problem
    autocast, path = prepare(benchmark, case, "training_step", [] if case.impl == "baseline" else ["baseline"])
    nets = networks(case.device)
    g = torch.Generator().manual_seed(1)
    hazy, clear = (torch.rand(problem.batch, 3, problem.crop, problem.crop, generator=g).to(case.device)
                   for _ in range(2))
    cr = nets.cr if problem.cr else None
    with precision_mode(case.device, case.precision), dcn_variant(path):
        check_path(benchmark, nets, case, path)
        key = ("training", case.device, problem)
        if key not in COUNTS:
            counted = copy.deepcopy(nets.ours).train()
            COUNTS[key] = count_gflop(lambda: loss_of(counted, hazy, clear, cr, None).backward())
        record_work(benchmark, gflop=COUNTS[key], images=problem.batch, pixels_per_image=problem.crop ** 2)
        model = nets.of(case.impl).train()
        step = training_step(model, torch.optim.Adam(model.parameters(), lr=1e-6), hazy, clear, cr, autocast)
        with host_memory.retain_freed_memory(case.device == "cpu"):  # as aecr_model.train runs its steps
            measure(benchmark, step, case.device)


@pytest.mark.benchmark(min_rounds=3)
def test_inference(benchmark, inference_case, networks, request):
    case, image_size = inference_case, inference_case.problem
    baselines = {"baseline": [], "onnxruntime": ["aecr"], "aecr-channels-last": ["aecr"]}.get(case.impl, ["baseline"])
    autocast, path = prepare(benchmark, case, "inference", baselines)
    nets = networks(case.device)
    g = torch.Generator().manual_seed(2)
    image = torch.rand(1, 3, image_size.height, image_size.width, generator=g).to(case.device)
    with precision_mode(case.device, case.precision), dcn_variant(path):
        check_path(benchmark, nets, case, path)
        key = ("inference", case.device, image_size)
        if key not in COUNTS:
            COUNTS[key] = count_gflop(inference(copy.deepcopy(nets.ours).eval(), image, None))
        record_work(benchmark, gflop=COUNTS[key], images=1, pixels_per_image=image_size.height * image_size.width)
        if case.impl == "onnxruntime":
            dehazer = request.getfixturevalue("onnx_dehazer")
            run = lambda: dehazer(image)  # noqa: E731
        elif case.impl == "aecr-channels-last":
            run = dehaze(nets.ours.eval(), image, autocast, memory_format=torch.channels_last)
        else:
            run = dehaze(nets.of(case.impl).eval(), image, autocast)
        costs = ProcessCosts(run, skip=image_size.warmup_rounds)
        # Every row is timed warm: ONNX Runtime keeps its arena from call to call, and the torch rows run in one
        # host_memory scope, as dehaze_files runs a folder, so that each reuses the memory its warm-up faulted in.
        with host_memory.retain_freed_memory(case.device == "cpu" and case.impl != "onnxruntime"):
            measure(benchmark, costs, case.device, rounds=image_size.rounds, warmup_rounds=image_size.warmup_rounds)
        costs.record(benchmark)
