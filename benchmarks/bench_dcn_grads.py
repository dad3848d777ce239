"""Forward+backward of deform_conv2d when only some gradients are needed, against all of them, in one run.

autograd asks the backward op for the gradients of the tensors that require grad (deform_conv2d_backward's
output_mask), and the kernels skip the work of the others: a first layer needs no input gradient, frozen
features need no weight gradient, constant offsets and masks need none of theirs.

    python benchmarks/bench_dcn_grads.py                     # B1 C256 64x64 on the CPU, as issue 11 asks
    python benchmarks/bench_dcn_grads.py --shape 2x64x64 --repeat 9 --json grads.json

Median of --repeat runs after --warmup; the ratio is the time with all gradients over the time of the row.
"""
import argparse
import platform
import subprocess

import torch

import aecr_ops
from bench_common import write_json_atomic
from bench_dcn import make_problem, parse_shape, timer

# name -> which of (input, offset, weight, bias, mask) require grad
VARIANTS = {
    "all gradients": (True, True, True, True, True),
    "input only": (True, False, False, False, False),
    "weight only": (False, False, True, False, False),
    "weight and bias (frozen input side)": (False, False, True, True, False),
    "offset and mask only": (False, True, False, False, True),
    "all but input (first layer)": (False, True, True, True, True),
}


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def measure(tensors, requires, device, warmup, repeat):
    leaves = [t.detach().clone().requires_grad_(r) for t, r in zip(tensors, requires)]
    x, offset, weight, bias, mask = leaves
    grad = torch.randn(x.shape[0], weight.shape[0], x.shape[2], x.shape[3], device=device, dtype=x.dtype)

    def step():
        for t in leaves:
            t.grad = None
        aecr_ops.deform_conv2d(x, offset, weight, bias, padding=1, mask=mask).backward(grad)

    return timer(device, step, warmup, repeat)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1x256x64", help="BxCxS: batch, channels (in = out), square size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    batch, channels, size = parse_shape(args.shape)
    tensors = make_problem(batch, channels, size, getattr(torch, args.dtype), args.device)
    rows = {name: measure(tensors, requires, args.device, args.warmup, args.repeat)
            for name, requires in VARIANTS.items()}
    full = rows["all gradients"]
    machine = cpu_model() if args.device == "cpu" else torch.cuda.get_device_name()
    print(f"deform_conv2d forward+backward, {args.shape} 3x3 pad 1, {args.dtype} on {args.device} ({machine}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeat}")
    print("| gradients | ms | all / this |\n|---|---|---|")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds * 1e3:.1f} | {full / seconds:.2f}x |")
    if args.json:
        write_json_atomic(args.json, {
            "benchmark": "bench_dcn_grads", "shape": args.shape, "dtype": args.dtype, "device": args.device,
            "machine": machine, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "repeat": args.repeat, "forward_backward_s": rows,
            "requires_grad": {name: dict(zip(["input", "offset", "weight", "bias", "mask"], r))
                              for name, r in VARIANTS.items()}})


if __name__ == "__main__":
    main()
