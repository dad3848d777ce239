"""The cost of a dehazing network: parameters, multiply-accumulates, latency and peak memory (``aecr-net profile``).

:func:`profile_model` measures one model at one resolution on one device; :func:`format_profile` prints rows of
such measurements as a table, beside the figures published for the architecture where there are some
(:data:`PUBLISHED`).

What is measured
----------------
- **parameters**: ``sum(p.numel() for p in model.parameters())``; a shared module counts once (AECR-Net's single FA
  block and DCN layer, run 6 and 2 times).
- **FLOPs / MACs** of one forward in eval mode (the first call of a fresh copy, ``torch.no_grad``), counted by
  ``torch.utils.flop_counter.FlopCounterMode``: 2 FLOPs per multiply-accumulate, MACs = FLOPs / 2. It counts the
  convolutions (transposed ones by their input pixels, i.e. their real work), the matrix products, and the aecr
  ops through the formulas of :mod:`aecr_ops.flops` (the deformable convolution: its dense part plus the
  bilinear sampling, the mask and the bias). It counts no elementwise work (activations, attention products,
  additions, poolings). A shared module is counted at every call. ``train_step_flops`` is forward + backward of a
  training step (train mode: FastDeconv computes its patch statistics), the optimizer's elementwise update not
  included.
- **latency**: median wall-clock seconds over ``repeat`` calls, after ``warmup`` calls, each call synchronised on
  CUDA: inference = ``model(x)`` in eval mode under ``torch.no_grad``; training step = forward in train mode, L1
  loss against a fixed random target, backward, Adam step (on a copy of the model: the caller's is untouched).
- **peak memory** of one inference call and of one training step (after the timed ones). CUDA:
  ``torch.cuda.max_memory_allocated`` after ``torch.cuda.reset_peak_memory_stats``: every tensor on the device
  during the call, weights, inputs and optimizer state included (the caching allocator's unused reserve is not).
  CPU: the same quantity from PyTorch's CPU allocator: the tensors alive when the call starts (parameters, buffers,
  gradients, optimizer state, input and target) plus the highest running sum of the allocations and frees made
  during the call, recorded by ``torch.profiler`` (``profile_memory=True``), so that temporaries inside the ops
  (the DCN's column buffers, which are released first so that the call allocates them) count too. Memory
  allocated outside PyTorch's allocator (oneDNN / BLAS scratch, thread stacks) is not seen. benchmarks/bench_memory.py
  measures the process's RSS high-water mark in a fresh process instead; inside a process that has already run the
  model, freed memory that the C allocator keeps mapped hides the peak, which is why the allocator's own count is
  used here.

Our count against the published figures
---------------------------------------
DehazeFormer's comparison table (Song et al., IEEE TIP 2023) gives AECR-Net 2.61 M parameters and 52.2 G MACs,
FFA-Net 4.46 M and 287.8 G, at 256x256. Here AECR-Net (the official network, shared weights) has 2,614,229
parameters and 40.68 G MACs (81.36 GFLOPs); by layer, at 256x256 (P = 65,536 pixels; a 3x3 256->256 conv is
589,824 MACs per pixel):

========================================  ======================================  =======
layer                                     MACs                                    G
========================================  ======================================  =======
FastDeconv 3->3 3x3 (eval: a plain conv)  P * 3*3*9                               0.0053
down1 7x7 3->64                           P * 64*3*49                             0.6166
down2 3x3/2 64->128                       P/4 * 128*64*9                          1.2080
down3 3x3/2 128->256                      P/16 * 256*128*9                        1.2080
FA block x6: two 3x3 convs, PA, CA        6 * (P/16 * (2*589824 + 8224) + 16384)  29.1932
DCN x2: offset/mask conv 256->27 3x3      2 * P/16 * 27*256*9                     0.5096
DCN x2: the deformable 3x3 256->256       2 * P/16 * 589824                       4.8318
DCN x2: bilinear sampling, mask, bias     2 * P/16 * (256*9*8 + 9*10 + 256) / 2   0.0769
up1 ConvTranspose 3x3/2 256->128          P/16 * 256*128*9 (input pixels)         1.2080
up2 ConvTranspose 3x3/2 128->64           P/4 * 128*64*9 (input pixels)           1.2080
up3 7x7 64->3                             P * 3*64*49                             0.6166
total                                                                             40.6819
========================================  ======================================  =======

(and 2,268 MACs for FastDeconv's weight fold; tests/test_model_profile.py checks the total to the MAC.)

**The published 52.2 G, reconstructed (partly inferred).** The profiling script of the same first author's next
dehazing paper (IDKiro/gUNet, ``profile.py``; its baselines include AECR-Net and FFA-Net) counts MACs with
``torchprofile.profile_macs`` and parameters with ``thop``; DehazeFormer's repository has no profiling script.
Both tools count in ways that differ from ours:

1. **Transposed convolutions by their output pixels** (verified in both tools' code: torchprofile's
   ``convolution`` handler, ``prod(output shape) * C_in * kh * kw``; thop's ``count_convNd``, used for
   ``nn.ConvTranspose2d`` too): a stride-2 transposed convolution is counted at 4x its work (each input pixel
   meets each weight once). up1: 128x128 x 128 outputs x 256 x 9 = 4.832 G instead of 1.208 G; up2: 256x256 x 64
   x 128 x 9 = 4.832 G instead of 1.208 G: **+7.248 G**.
2. **The deformable convolution is invisible to them.** torchprofile counts an operator without a handler as 0,
   and its JIT trace records a custom autograd Function (mmcv's, DCNv2's) as one ``prim::PythonOp`` (checked
   with this torch's torch.jit: the body goes into a subgraph attribute that torchprofile does not visit); thop counts
   only module types it knows. Only the DCN's offset predictor, an ``nn.Conv2d``, is counted, unless a rule is
   added for the layer by hand.
3. torchprofile counts an elementwise multiply as one MAC per output element (+0.019 G here: CA, PA, mixups).

So with the tools alone AECR-Net would come out near 43 G (gUNet's AECR-Net baseline, mmcv's DCNv1
``DeformConv2dPack`` with an 18-channel offset conv: 42.87 G by torchprofile's rules, emulated on this network).
The published 52.2 G is matched, to 0.01 G, by one further assumption: that **each DCN call was counted at twice
its dense work (4.832 G, i.e. its FLOPs taken for MACs) and its offset convolution not at all** -- what thop does
when a rule is given for the DCN module by ``custom_ops`` (thop's ``dfs_count`` does not descend into a module it
has a rule for, so the offset conv inside is dropped) and that rule returns FLOPs. Under torchprofile's rules:
40.682 - 4.832 (DCN, once) - 0.077 (its sampling) - 0.510 (offset convs) + 7.248 + 0.019 + 2 * 4.832 = **52.194
G**; under thop's rules (biases and poolings counted, no products) 52.205 G. We could not run their count (it
needs mmcv) nor find the rule they used for the DCN, so this part is an inference from the arithmetic. What is
certain: the transposed-convolution rule alone puts +7.25 G into any torchprofile or thop count of AECR-Net, and
our 40.68 G counts those layers by their real work and each DCN call once, with its sampling.

**FFA-Net** (no transposed convolution, no DCN): flop_counter counts its convolutions, 287.28 G (per pixel
3*64*9 + 3 * (19 * (2*36864 + 520) + 36864) + 520 + 36864 + 64*3*9 = 4,383,568, times 65,536, plus the 1x1
attention convs on pooled maps). torchprofile adds its elementwise multiplies (57 blocks x 2 products, 3 group
weights and 1 PA product, 64 x 256 x 256 each: 0.495 G): 287.78 G, the published 287.8 G (emulated with
torchprofile's rules on aecr_model.ffa.FFANet: 287.7765 G). The parameters agree exactly: 4,455,913 = 4.46 M.
For AECR-Net, 2.61 M is our 2,614,229 rounded (AECR-Net's own paper gives 2.61 M too).
"""
import copy
import gc
import os
import platform
import statistics
import subprocess
import time
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

import aecr_ops
from aecr_ops import flops as _aecr_flops  # noqa: F401  (importing it registers the aecr ops' FLOP formulas)

__all__ = ["profile_model", "format_profile", "PUBLISHED", "PUBLISHED_SOURCE", "device_name"]

#: Published (parameters, MACs at 256x256) per architecture label.
PUBLISHED: Dict[str, Tuple[float, float]] = {
    "aecr": (2.61e6, 52.2e9),
    "ffa": (4.46e6, 287.8e9),
}
PUBLISHED_SOURCE = ("DehazeFormer (Song et al., \"Vision Transformers for Single Image Dehazing\", IEEE TIP 2023), "
                    "its comparison table: #Param and MACs at 256x256")

_DCN_OPS = ("aecr_ops.deform_conv2d", "aecr_ops.deform_conv2d_backward")
MB = 1024 * 1024


# ---- Inputs -----------------------------------------------------------------------------------------------------

def _check_size(size) -> Tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    try:
        height, width = size
    except (TypeError, ValueError):
        raise ValueError(f"profile_model: `size` must be an int or a pair (height, width), got {size!r}") from None
    for value in (height, width):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"profile_model: `size` must be positive ints (height, width), got {size!r}")
    return height, width


def _check_count(value, name: str, least: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"profile_model: `{name}` must be an int >= {least}, got {value!r}")
    return value


def _in_channels(model: nn.Module, in_channels: Optional[int]) -> int:
    if in_channels is not None:
        return _check_count(in_channels, "in_channels", 1)
    config = getattr(model, "config", None)
    if isinstance(config, dict) and isinstance(config.get("in_channels"), int):
        return config["in_channels"]
    return 3


def _output_tensor(output) -> Tensor:
    """The image a model returns (the first tensor of a tuple or list)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"profile_model: the model must return a tensor (or a tuple starting with one), got "
                    f"{type(output).__name__}")


# ---- The machine ------------------------------------------------------------------------------------------------

def _cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.strip().lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: Union[str, torch.device]) -> str:
    """The CUDA device's name, or the CPU's model name (lscpu, /proc/cpuinfo, else platform)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_name()


def _load_average() -> Optional[List[float]]:
    """The 1, 5 and 15 minute load averages (None where the OS has none): latencies on a shared machine depend
    on them."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- Measurements -----------------------------------------------------------------------------------------------

def _timed(fn, device: torch.device, warmup: int, repeat: int) -> List[float]:
    for _ in range(warmup):
        fn()
    _synchronize(device)
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views and shared tensors count once)."""
    seen = {}
    for t in tensors:
        if isinstance(t, Tensor) and t.device.type == "cpu" and t.numel() > 0:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _allocations_peak(fn) -> int:
    """The highest running sum of the CPU allocator's allocations minus frees during fn() (torch.profiler's memory
    events; frees of blocks allocated before are not reported, so they never lower it)."""
    from torch.profiler import ProfilerActivity, profile
    # Kineto logs its start and stop (and, on a CUDA build without a GPU, an error) to stderr unless told not to;
    # it reads the level when it first starts, so it is set for the first profile only, and put back.
    quiet = "KINETO_LOG_LEVEL" not in os.environ
    if quiet:
        os.environ["KINETO_LOG_LEVEL"] = "6"
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    finally:
        if quiet:
            os.environ.pop("KINETO_LOG_LEVEL", None)
    try:
        deltas = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    except AttributeError:  # a torch without kineto results: the (coarser) function events
        deltas = [(e.time_range.start, e.cpu_memory_usage) for e in prof.events() if e.name == "[memory]"]
    live = peak = 0
    for _, nbytes in sorted(deltas, key=lambda d: d[0]):
        live += nbytes
        peak = max(peak, live)
    return peak


def _peak_memory(fn, device: torch.device, resident) -> int:
    """Peak bytes of the tensors alive during one fn() (see the module docstring); `resident` lists the tensors
    alive when it starts (counted on the CPU; CUDA's allocator knows them itself)."""
    gc.collect()
    if device.type == "cuda":
        _synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    if aecr_ops.extension_loaded():
        aecr_ops.release_workspaces()  # so that the call allocates its DCN column buffers where they are seen
    return _storage_bytes(resident) + _allocations_peak(fn)


def _memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return ("torch.cuda.max_memory_allocated after reset_peak_memory_stats: all tensors on the device during "
                "the call (weights, inputs, optimizer state, activations, workspaces)")
    return ("PyTorch's CPU allocator: tensors alive at the start of the call (parameters, buffers, gradients, "
            "optimizer state, input, target) + the peak running sum of the allocations and frees during it "
            "(torch.profiler profile_memory); memory outside PyTorch's allocator is not seen")


def _count_flops(fn) -> Tuple[int, Dict[str, int], Dict[str, int]]:
    """(total FLOPs, FLOPs by operator, FLOPs by top-level submodule) of fn() under FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        fn()
    counts = counter.get_flop_counts()
    by_op = {str(op): int(n) for op, n in counts.get("Global", {}).items()}
    by_op = dict(sorted(by_op.items(), key=lambda item: -item[1]))
    by_module = {}
    for name, ops in counts.items():
        if name != "Global" and name.count(".") == 1:  # "Model.child"
            by_module[name.split(".", 1)[1]] = int(sum(ops.values()))
    return int(counter.get_total_flops()), by_op, by_module


def profile_model(model: nn.Module, size: Union[int, Sequence[int]] = (256, 256),
                  device: Union[str, torch.device] = "cpu", batch: int = 1, warmup: int = 2, repeat: int = 5,
                  train: bool = True, in_channels: Optional[int] = None, arch: Optional[str] = None,
                  lr: float = 1e-4) -> dict:
    """Parameters, forward FLOPs / MACs, inference and training-step latency and peak memory of ``model`` on
    ``batch`` random float32 images of ``size`` (an int or (height, width)) on ``device``.

    The caller's model is not modified: everything runs on copies (one in eval mode for inference, one in train
    mode with its own Adam optimizer for the training step). ``train=False`` skips the training step. Rows for
    :func:`format_profile` carry ``arch`` (the caller's label, e.g. "aecr", which selects the published figures).
    See the module docstring for what each figure is and how it is measured.

    Returns a dict: ``arch``, ``model`` (class name), ``size`` [H, W], ``batch``, ``device``, ``device_name``,
    ``torch``, ``threads``, ``dtype``, ``parameters``, ``forward_flops``, ``forward_macs`` (= FLOPs / 2, for the
    batch), ``forward_flops_by_operator`` ({"aten.convolution": ..., "aecr_ops.deform_conv2d": ..., ...}),
    ``forward_flops_by_module`` (top-level submodules, shared ones summed over their calls), ``dcn_flops`` (the
    deformable convolutions' part), ``train_step_flops``, ``inference_seconds`` (median) and
    ``inference_seconds_all``, ``train_step_seconds`` and ``train_step_seconds_all``, ``peak_memory_inference_bytes``,
    ``peak_memory_train_bytes``, ``memory_method``, ``warmup``, ``repeat``, ``flops_convention``. The training
    entries are None with ``train=False``.

    Raises:
        ValueError: a size, batch, warmup or repeat that is not a positive int (naming it), a size the model does
            not accept (``model.size_multiple``, e.g. 4 for AECR-Net, or the model's own error on its first call,
            passed on), an unavailable CUDA device.
    """
    height, width = _check_size(size)
    batch = _check_count(batch, "batch", 1)
    warmup = _check_count(warmup, "warmup", 0)
    repeat = _check_count(repeat, "repeat", 1)
    if not isinstance(model, nn.Module):
        raise TypeError(f"profile_model: `model` must be a torch.nn.Module, got {type(model).__name__}")
    multiple = getattr(model, "size_multiple", 1)
    if isinstance(multiple, int) and multiple > 1 and (height % multiple or width % multiple):
        raise ValueError(f"profile_model: `size` {height}x{width} is not accepted by {type(model).__name__}: height "
                         f"and width must be multiples of {multiple}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"profile_model: `device`={str(device)!r} but CUDA is not available")
    channels = _in_channels(model, in_channels)

    generator = torch.Generator().manual_seed(0)
    x = torch.rand(batch, channels, height, width, generator=generator).to(device)
    result = dict(arch=arch, model=type(model).__name__, size=[height, width], batch=batch, device=str(device),
                  device_name=device_name(device), torch=torch.__version__, threads=torch.get_num_threads(),
                  load_average=_load_average(), dtype="float32",
                  parameters=sum(p.numel() for p in model.parameters()), warmup=warmup,
                  repeat=repeat, memory_method=_memory_method(device),
                  flops_convention="torch.utils.flop_counter: 2 FLOPs per multiply-accumulate; MACs = FLOPs / 2")

    # Inference: the FLOP count is the first call of the fresh copy (it also checks that the model takes the size).
    net = copy.deepcopy(model).to(device=device, dtype=torch.float32).eval()
    outputs = {}

    def infer():
        with torch.no_grad():
            outputs["y"] = _output_tensor(net(x))

    try:
        flops, by_op, by_module = _count_flops(infer)
    except ValueError as error:  # aecr_ops.ArgumentError is a ValueError too
        raise ValueError(f"profile_model: `size` {height}x{width} (input {list(x.shape)}) is not accepted by "
                         f"{type(model).__name__}: {error}") from error
    target = torch.rand(outputs["y"].shape, generator=generator).to(device)
    result.update(forward_flops=flops, forward_macs=flops / 2, forward_flops_by_operator=by_op,
                  forward_flops_by_module=by_module,
                  dcn_flops=sum(n for op, n in by_op.items() if op in _DCN_OPS))
    seconds = _timed(infer, device, warmup, repeat)
    result.update(inference_seconds=statistics.median(seconds), inference_seconds_all=seconds)
    outputs.clear()
    result["peak_memory_inference_bytes"] = _peak_memory(
        infer, device, list(net.parameters()) + list(net.buffers()) + [x])
    outputs.clear()
    net = None  # freed before the training copy is made (CUDA's peak counts everything on the device)

    result.update(train_step_flops=None, train_step_seconds=None, train_step_seconds_all=None,
                  peak_memory_train_bytes=None)
    if train:
        trainee = copy.deepcopy(model).to(device=device, dtype=torch.float32).train()
        optimizer = torch.optim.Adam(trainee.parameters(), lr=lr)

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = F.l1_loss(_output_tensor(trainee(x)), target)
            loss.backward()
            optimizer.step()

        def step_flops():  # forward + backward, without the optimizer's (uncounted, elementwise) update
            optimizer.zero_grad(set_to_none=True)
            F.l1_loss(_output_tensor(trainee(x)), target).backward()

        result["train_step_flops"] = _count_flops(step_flops)[0]
        seconds = _timed(step, device, warmup, repeat)
        result.update(train_step_seconds=statistics.median(seconds), train_step_seconds_all=seconds)
        optimizer.zero_grad(set_to_none=True)
        state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, Tensor)]
        result["peak_memory_train_bytes"] = _peak_memory(
            step, device, list(trainee.parameters()) + list(trainee.buffers()) + state + [x, target])
        trainee = optimizer = state = None
    gc.collect()
    return result


# ---- The table --------------------------------------------------------------------------------------------------

def _fmt(value, scale: float, digits: int) -> str:
    return "-" if value is None else f"{value / scale:.{digits}f}"


def format_profile(rows: List[dict]) -> str:
    """A fixed-width table of :func:`profile_model` results, one line per row: architecture, parameters (M),
    GMACs per image, inference and training-step latency (ms), peak memory of inference and of a training step
    (MB = 2^20 bytes), and, where the row's ``arch`` is in :data:`PUBLISHED`, the published parameters and GMACs
    beside ours (the source is named under the table). Machine, size and batch of each row follow the table."""
    headers = ["arch", "params (M)", "GMACs", "infer (ms)", "train step (ms)", "peak MB infer", "peak MB train",
               "published params (M)", "published GMACs"]
    lines, sources = [], False
    table = []
    for row in rows:
        arch = row.get("arch") or row.get("model") or "?"
        published = PUBLISHED.get(arch)
        sources = sources or published is not None
        macs = row.get("forward_macs")
        per_image = None if macs is None else macs / max(1, row.get("batch") or 1)
        table.append([
            str(arch), _fmt(row.get("parameters"), 1e6, 3), _fmt(per_image, 1e9, 2),
            _fmt(row.get("inference_seconds"), 1e-3, 1), _fmt(row.get("train_step_seconds"), 1e-3, 1),
            _fmt(row.get("peak_memory_inference_bytes"), MB, 1), _fmt(row.get("peak_memory_train_bytes"), MB, 1),
            "-" if published is None else f"{published[0] / 1e6:.2f}",
            "-" if published is None else f"{published[1] / 1e9:.1f}",
        ])
    widths = [max(len(h), *(len(r[i]) for r in table)) if table else len(h) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines.append(line(headers))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(line(r) for r in table)
    for row in rows:
        size = row.get("size") or ["?", "?"]
        lines.append(f"{row.get('arch') or row.get('model') or '?'}: {size[0]}x{size[1]}, batch {row.get('batch')}, "
                     f"{row.get('device')} ({row.get('device_name')}), {row.get('threads')} threads, torch "
                     f"{row.get('torch')}")
    lines.append("MACs: torch.utils.flop_counter (FLOPs / 2), DCN counted by aecr_ops.flops; latency: median.")
    if sources:
        lines.append(f"published: {PUBLISHED_SOURCE}.")
    return "\n".join(lines)
