"""Benchmark of deform_conv2d against torchvision.ops.deform_conv2d and conv2d of the same shape.

Forward and forward+backward (gradients of input, offset, mask, weight and bias; conv2d: input, weight and
bias), median of several runs, all measured in the same process so the ratios compare like with like.

    python benchmarks/bench_dcn.py                       # the CPU shapes of the DCN issue
    python benchmarks/bench_dcn.py --device cuda --dtype bfloat16 --shapes 16x256x64
    python benchmarks/bench_dcn.py --device cuda --dtype float32 --tf32     # TF32 allowed in matmuls and cuDNN
    python benchmarks/bench_dcn.py --json results.json

On CUDA both paths of aecr_ops are asked for (AECR_DCN_CUDA_PATH=simple / implicit), each also under
torch.use_deterministic_algorithms(True): aecr_ops_simple, aecr_ops_implicit, and the same with _deterministic.
Each measured entry says which path really ran ("path"); a variant whose path does not apply (implicit in fp32
without TF32, or below compute capability 8.0) is not measured again under another name but recorded as
{"not_applicable": "not applicable: runs the simple path"}.

Each implementation is measured on its own: one that fails is recorded ({"unsupported": message} when the
library has no kernel for the dtype, {"error": message} otherwise) and the others still run; with --json the file
is rewritten after every implementation, so an interrupted run keeps what it measured. torchvision has no
bfloat16 (nor, on the CPU, float16) kernel: it is then also measured in float32 on the same values
("torchvision_float32"), the row says "baseline_dtype": "float32", and the speed-ups are against that. Exit code
1 when any implementation failed with an error (not for "unsupported" or "not applicable").
"""
import argparse
import contextlib
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import aecr_ops
from bench_common import release_cuda_memory, write_json_atomic

DEFAULT_SHAPES = {"cpu": ["2x64x64", "1x256x64"], "cuda": ["16x256x64"]}


def parse_shape(text):
    batch, channels, size = (int(v) for v in text.split("x"))
    return batch, channels, size


def make_problem(batch, channels, size, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g)
    weight = torch.randn(channels, channels, 3, 3, generator=g) / (channels * 9) ** 0.5
    bias = torch.randn(channels, generator=g)
    offset = 2.0 * torch.randn(batch, 18, size, size, generator=g)
    mask = torch.rand(batch, 9, size, size, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (x, offset, weight, bias, mask)]


def timer(device, fn, warmup, repeat):
    """Median seconds of fn()."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def implementations():
    """name -> fn(x, offset, weight, bias, mask); torchvision's entry is None when it is not installed."""
    try:
        import torchvision
    except ImportError:
        torchvision = None

    def ours(x, offset, weight, bias, mask):
        return aecr_ops.deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)

    def tv(x, offset, weight, bias, mask):
        return torchvision.ops.deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)

    def conv(x, offset, weight, bias, mask):
        return F.conv2d(x, weight, bias, padding=1)

    return {"aecr_ops": ours, "torchvision": tv if torchvision is not None else None, "conv2d": conv}


# name -> (CUDA path asked for, deterministic) for the variants of aecr_ops measured on CUDA.
CUDA_VARIANTS = {
    "aecr_ops_simple": ("simple", False),
    "aecr_ops_simple_deterministic": ("simple", True),
    "aecr_ops_implicit": ("implicit", False),
    "aecr_ops_implicit_deterministic": ("implicit", True),
}


@contextlib.contextmanager
def cuda_variant(path, deterministic):
    """AECR_DCN_CUDA_PATH (None: left alone) and deterministic mode for the forward and backward of one measurement."""
    previous = os.environ.get("AECR_DCN_CUDA_PATH")
    if path is not None:
        os.environ["AECR_DCN_CUDA_PATH"] = path
    torch.use_deterministic_algorithms(deterministic)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)
        if previous is None:
            os.environ.pop("AECR_DCN_CUDA_PATH", None)
        else:
            os.environ["AECR_DCN_CUDA_PATH"] = previous


def dcn_path_that_runs(input, offset, weight, mask=None, stride=1, padding=0, dilation=1):
    """The path aecr_ops.deform_conv2d would run for these arguments now ("cpu", "simple" or "implicit")."""
    return aecr_ops.deform_conv2d_path(input, offset, weight, mask=mask, stride=stride, padding=padding,
                                       dilation=dilation)


def failure_entry(error):
    """{"unsupported": message} when the library has no kernel for this dtype/device, else {"error": message}."""
    message = f"{type(error).__name__}: {error}".strip()
    if len(message) > 600:
        message = message[:600] + " ..."
    text = str(error)
    if isinstance(error, (NotImplementedError, aecr_ops.ArgumentTypeError)) or "not implemented for" in text:
        return {"unsupported": message}
    return {"error": message}


def measure(fn, tensors, device, warmup, repeat):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    grad = torch.randn_like(fn(*tensors))

    def forward():
        with torch.no_grad():
            fn(*tensors)

    def forward_backward():
        for t in leaves:
            t.grad = None
        fn(*leaves).backward(grad)

    return {"forward_s": timer(device, forward, warmup, repeat),
            "forward_backward_s": timer(device, forward_backward, warmup, repeat)}


def measured(entry):
    return isinstance(entry, dict) and "forward_backward_s" in entry


def torchvision_baseline(row):
    """The name of the torchvision entry the speed-ups of this row are against, or None."""
    for name in ("torchvision", "torchvision_float32"):
        if measured(row.get(name)):
            return name
    return None


def add_ratios(row, ours_names):
    """Speed-ups against torchvision, ratios to conv2d and deterministic/default, on every measured entry of ours."""
    baseline = torchvision_baseline(row)
    row["torchvision_baseline"] = baseline
    row["baseline_dtype"] = "float32" if baseline == "torchvision_float32" else row["dtype"]
    for name in ours_names:
        ours = row.get(name)
        if not measured(ours):
            continue
        if baseline:
            tv = row[baseline]
            ours["speedup_vs_torchvision_forward"] = tv["forward_s"] / ours["forward_s"]
            ours["speedup_vs_torchvision_forward_backward"] = tv["forward_backward_s"] / ours["forward_backward_s"]
        if measured(row.get("conv2d")):
            ours["ratio_to_conv2d_forward"] = ours["forward_s"] / row["conv2d"]["forward_s"]
            ours["ratio_to_conv2d_forward_backward"] = ours["forward_backward_s"] / row["conv2d"]["forward_backward_s"]
        default = name[:-len("_deterministic")] if name.endswith("_deterministic") else None
        if default and measured(row.get(default)):
            ours["ratio_to_default_forward_backward"] = (ours["forward_backward_s"]
                                                         / row[default]["forward_backward_s"])


def describe_entry(entry):
    if measured(entry):
        return None
    for key in ("not_applicable", "unsupported", "error"):
        if key in entry:
            return entry[key] if key == "not_applicable" else f"{key}: {entry[key]}"
    return "?"


def print_entry(text, name, entry, ours_names):
    note = describe_entry(entry)
    if note is not None:
        print(f"{text:>12} {name:>32}   {note[:150]}", flush=True)
        return
    extra = ""
    if name in ours_names:
        extra = (f" {entry.get('speedup_vs_torchvision_forward', float('nan')):>12.2f}"
                 f" {entry.get('speedup_vs_torchvision_forward_backward', float('nan')):>12.2f}"
                 f" {entry.get('ratio_to_conv2d_forward_backward', float('nan')):>14.2f}"
                 f" {entry.get('path', ''):>9}")
    print(f"{text:>12} {name:>32} {1e3 * entry['forward_s']:>9.2f} {1e3 * entry['forward_backward_s']:>11.2f}{extra}",
          flush=True)


def run_row(text, args, dtype, impls, ours_names, save):
    """Measures every implementation on one shape; save(row) after each one."""
    tensors = make_problem(*parse_shape(text), dtype=dtype, device=args.device)
    row = {"shape": text, "dtype": args.dtype, "device": args.device, "tf32": args.tf32}
    for name, (fn, variant) in impls.items():
        try:
            if fn is None:
                row[name] = {"unsupported": "torchvision is not installed"}
            elif variant is None:
                row[name] = measure(fn, tensors, args.device, args.warmup, args.repeat)
            else:
                requested, deterministic = variant
                with cuda_variant(requested, deterministic):
                    x, offset, weight, _, mask = tensors
                    path = dcn_path_that_runs(x, offset, weight, mask=mask, padding=1)
                    if requested is not None and path != requested:
                        row[name] = {"not_applicable": f"not applicable: runs the {path} path", "would_run": path}
                    else:
                        row[name] = {"path": path, **measure(fn, tensors, args.device, args.warmup, args.repeat)}
        except Exception as error:  # noqa: BLE001 - one implementation failing must not lose the others
            row[name] = failure_entry(error)
            release_cuda_memory(args.device)
        if name == "torchvision" and fn is not None and "unsupported" in row[name] and args.dtype in ("float16",
                                                                                                     "bfloat16"):
            # torchvision has no kernel for this dtype: the same values in float32 are the baseline.
            try:
                row["torchvision_float32"] = measure(fn, [t.float() for t in tensors], args.device, args.warmup,
                                                     args.repeat)
            except Exception as error:  # noqa: BLE001
                row["torchvision_float32"] = failure_entry(error)
        add_ratios(row, ours_names)
        save(row)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    parser.add_argument("--shapes", nargs="*", help="BxCxS: batch, channels (in = out), square size; 3x3, pad 1")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--skip", nargs="*", default=[], help="implementations to leave out (e.g. torchvision)")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 in matmuls (and cuDNN) for float32")
    parser.add_argument("--json", help="write the results to this file (rewritten after every implementation)")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    shapes = args.shapes or DEFAULT_SHAPES[args.device]
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    base = implementations()
    variants = dict(CUDA_VARIANTS) if args.device == "cuda" else {"aecr_ops": (None, False)}
    impls = {name: (base["aecr_ops"], variant) for name, variant in variants.items()}
    impls.update({k: (v, None) for k, v in base.items() if k != "aecr_ops"})
    impls = {k: v for k, v in impls.items() if k not in args.skip}
    ours_names = [k for k in impls if k.startswith("aecr_ops")]
    results = []
    machine = machine_info(args.device)

    def save(current=None, complete=False):
        if args.json:
            rows = results + ([current] if current is not None else [])
            write_json_atomic(args.json, {"benchmark": "deform_conv2d", "machine": machine, "complete": complete,
                                          "results": rows})

    print(f"device {args.device} ({machine['device']}), dtype {args.dtype}, tf32 {args.tf32}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    print(f"{'shape':>12} {'impl':>32} {'fwd ms':>9} {'fwd+bwd ms':>11} {'tv/ours fwd':>12} {'tv/ours f+b':>12} "
          f"{'ours/conv f+b':>14} {'path':>9}", flush=True)
    save()
    for text in shapes:
        row = run_row(text, args, dtype, impls, ours_names, save)
        results.append(row)
        for name in [k for k in row if k in impls or k == "torchvision_float32"]:
            print_entry(text, name, row[name], ours_names)
        if row.get("torchvision_baseline") == "torchvision_float32":
            print(f"{text:>12} speed-ups against torchvision in float32 (no {args.dtype} kernel)", flush=True)
    save(complete=True)
    errors = [(row["shape"], k) for row in results for k, v in row.items() if isinstance(v, dict) and "error" in v]
    if errors:
        print(f"failed: {errors}", flush=True)
    return 1 if errors else 0


def describe_device(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def machine_info(device):
    info = {"device": describe_device(device), "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "platform": platform.platform(), "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d")}
    try:
        import torchvision
        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    return info


if __name__ == "__main__":
    raise SystemExit(main())
