"""Benchmark of deform_conv2d against torchvision.ops.deform_conv2d and conv2d of the same shape.

Forward and forward+backward (gradients of input, offset, mask, weight and bias; conv2d: input, weight and
bias), median of several runs, all measured in the same process so the ratios compare like with like.

    python benchmarks/bench_dcn.py                       # the CPU shapes of the DCN issue
    python benchmarks/bench_dcn.py --device cuda --dtype bfloat16 --shapes 16x256x64
    python benchmarks/bench_dcn.py --device cuda --dtype float32 --tf32     # TF32 allowed in matmuls and cuDNN
    python benchmarks/bench_dcn.py --json results.json

On CUDA both paths of aecr_ops are measured (AECR_DCN_CUDA_PATH=simple / implicit), each also under
torch.use_deterministic_algorithms(True): aecr_ops_simple, aecr_ops_implicit, and the same with _deterministic.
"""
import argparse
import contextlib
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import aecr_ops

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
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def implementations():
    import torchvision

    def ours(x, offset, weight, bias, mask):
        return aecr_ops.deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)

    def tv(x, offset, weight, bias, mask):
        return torchvision.ops.deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)

    def conv(x, offset, weight, bias, mask):
        return F.conv2d(x, weight, bias, padding=1)

    return {"aecr_ops": ours, "torchvision": tv, "conv2d": conv}


# name -> (CUDA path, deterministic) for the variants of aecr_ops measured on CUDA.
CUDA_VARIANTS = {
    "aecr_ops_simple": ("simple", False),
    "aecr_ops_simple_deterministic": ("simple", True),
    "aecr_ops_implicit": ("implicit", False),
    "aecr_ops_implicit_deterministic": ("implicit", True),
}


@contextlib.contextmanager
def cuda_variant(path, deterministic):
    """AECR_DCN_CUDA_PATH and deterministic mode for the forward and backward of one measurement."""
    previous = os.environ.get("AECR_DCN_CUDA_PATH")
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


def measure(name, fn, tensors, device, warmup, repeat):
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    parser.add_argument("--shapes", nargs="*", help="BxCxS: batch, channels (in = out), square size; 3x3, pad 1")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--skip", nargs="*", default=[], help="implementations to leave out (e.g. torchvision)")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 in matmuls (and cuDNN) for float32")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    shapes = args.shapes or DEFAULT_SHAPES[args.device]
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    base = implementations()
    variants = {"aecr_ops": (None, False)}
    if args.device == "cuda":
        variants = dict(CUDA_VARIANTS)
    impls = {name: (base["aecr_ops"], variant) for name, variant in variants.items()}
    impls.update({k: (v, None) for k, v in base.items() if k != "aecr_ops"})
    impls = {k: v for k, v in impls.items() if k not in args.skip}
    ours_names = [k for k in impls if k.startswith("aecr_ops")]
    results = []
    header = f"{'shape':>12} {'impl':>32} {'fwd ms':>9} {'fwd+bwd ms':>11} {'tv/ours fwd':>12} {'tv/ours f+b':>12} " \
             f"{'ours/conv f+b':>14}"
    print(f"device {args.device} ({describe_device(args.device)}), dtype {args.dtype}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(header)
    for text in shapes:
        tensors = make_problem(*parse_shape(text), dtype=dtype, device=args.device)
        row = {"shape": text, "dtype": args.dtype, "device": args.device, "tf32": args.tf32}
        for name, (fn, variant) in impls.items():
            with cuda_variant(*variant) if variant and variant[0] else contextlib.nullcontext():
                row[name] = measure(name, fn, tensors, args.device, args.warmup, args.repeat)
        for name in ours_names:
            ours = row[name]
            if "torchvision" in row:
                ours["speedup_vs_torchvision_forward"] = row["torchvision"]["forward_s"] / ours["forward_s"]
                ours["speedup_vs_torchvision_forward_backward"] = (row["torchvision"]["forward_backward_s"]
                                                                   / ours["forward_backward_s"])
            if "conv2d" in row:
                ours["ratio_to_conv2d_forward"] = ours["forward_s"] / row["conv2d"]["forward_s"]
                ours["ratio_to_conv2d_forward_backward"] = (ours["forward_backward_s"]
                                                            / row["conv2d"]["forward_backward_s"])
            default = name[:-len("_deterministic")] if name.endswith("_deterministic") else None
            if default in row:
                ours["ratio_to_default_forward_backward"] = (ours["forward_backward_s"]
                                                             / row[default]["forward_backward_s"])
        for name in impls:
            extra = ""
            if name in ours_names:
                extra = (f" {row[name].get('speedup_vs_torchvision_forward', float('nan')):>12.2f}"
                         f" {row[name].get('speedup_vs_torchvision_forward_backward', float('nan')):>12.2f}"
                         f" {row[name].get('ratio_to_conv2d_forward_backward', float('nan')):>14.2f}")
            print(f"{text:>12} {name:>32} {1e3 * row[name]['forward_s']:>9.2f} "
                  f"{1e3 * row[name]['forward_backward_s']:>11.2f}{extra}")
        results.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "deform_conv2d", "machine": machine_info(args.device), "results": results}, f,
                      indent=2)


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
    main()
