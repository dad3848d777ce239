"""Benchmark of a FastDeconv training step: aecr_ops.FastDeconv against the original algorithm.

The original is aecr_ops.reference.FastDeconv (the yechengxi/deconvolution layer re-implemented in plain
PyTorch). A step is forward, loss (mean of squares) and backward; the two layers start from the same weights and
their steps alternate, so both see the same machine state; times are medians. Peak extra memory is the growth of
the peak resident set during one step, each layer in a fresh process (CPU), or the peak of allocated GPU memory.

    python benchmarks/bench_fastdeconv.py                 # the CPU shapes of the FastDeconv issue
    python benchmarks/bench_fastdeconv.py --device cuda --json out.json
    python benchmarks/bench_fastdeconv.py --tiny --warmup 0 --repeat 1     # a smoke test: same shapes, 12 x 12

With --json the file is rewritten after every shape (an interrupted run keeps what it measured); a shape that
fails is recorded with its error and the others still run (exit code 1).
"""
import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import torch

import aecr_ops
from bench_common import release_cuda_memory, sync, write_json_atomic
from aecr_ops import reference

# name: (input shape, out channels, block, input requires grad)
SHAPES = {
    "aecr_16x3x256": ((16, 3, 256, 256), 3, 64, False),
    "c64_8x64x64": ((8, 64, 64, 64), 64, 64, True),
}
IMPLS = {"aecr_ops": aecr_ops.FastDeconv, "original": reference.FastDeconv}
TINY_SIZE = 12  # --tiny: each shape's batch 2 and 12 x 12 pixels (same channels, block and layer)


def problem(name, tiny=False):
    """(input shape, out channels, block, input requires grad) of a named shape; --tiny shrinks the input."""
    shape, out_channels, block, input_grad = SHAPES[name]
    if tiny:
        shape = (min(2, shape[0]), shape[1], TINY_SIZE, TINY_SIZE)
    return shape, out_channels, block, input_grad


def setup(name, impl, device, tiny=False):
    shape, out_channels, block, input_grad = problem(name, tiny)
    torch.manual_seed(0)
    layer = IMPLS[impl](shape[1], out_channels, 3, stride=1, padding=1, block=block).to(device)
    x = torch.rand(shape, device=device).requires_grad_(input_grad)
    return layer, x


def step(layer, x):
    layer(x).square().mean().backward()


def whitening_step(layer, x):
    """The layer's own work without its convolution: statistics, inverse square root, their backward."""
    if isinstance(layer, aecr_ops.FastDeconv):
        mean, cov = aecr_ops.patch_statistics(x, layer.kernel_size, layer.dilation, layer.padding,
                                              layer.sampling_stride, layer.block, layer.groups, layer.eps)
        deconv = aecr_ops.isqrt_newton_schulz(cov, layer.n_iter)
    else:
        patches = reference.fastdeconv_patches(x, layer.kernel_size, layer.dilation, layer.padding,
                                               layer.sampling_stride)
        mean, cov = reference.fastdeconv_statistics(patches, layer.num_features, layer.groups, layer.eps)
        deconv = reference.isqrt_newton_schulz(cov, layer.n_iter)
    if x.requires_grad:
        (mean.sum() + deconv.sum()).backward()


def time_steps(name, device, warmup, repeat, tiny=False):
    pairs = {impl: setup(name, impl, device, tiny) for impl in IMPLS}
    for _ in range(warmup):
        for layer, x in pairs.values():
            step(layer, x)
    sync(device)
    times = {impl: [] for impl in IMPLS}
    for _ in range(max(1, repeat)):
        for impl, (layer, x) in pairs.items():
            start = time.perf_counter()
            step(layer, x)
            sync(device)
            times[impl].append(time.perf_counter() - start)
    return {impl: statistics.median(t) for impl, t in times.items()}


def peak_extra_bytes(fn, device):
    """Peak of tensor memory allocated while fn() runs, above what was allocated before."""
    if device == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e["args"] for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    if not events:
        return 0
    before = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - before


def peak_memory(name, device, tiny=False):
    """{"step": {impl: bytes}, "whitening": {impl: bytes}}; each after a warm-up of the same call."""
    out = {"step": {}, "whitening": {}}
    for impl in IMPLS:
        layer, x = setup(name, impl, device, tiny)
        for what, fn in (("step", step), ("whitening", whitening_step)):
            fn(layer, x)
            layer.zero_grad()
            x.grad = None
            out[what][impl] = peak_extra_bytes(lambda: fn(layer, x), device)
            layer.zero_grad()
            x.grad = None
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tiny", action="store_true", help=f"batch 2 of {TINY_SIZE}x{TINY_SIZE} inputs (a smoke test)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--json", help="write the results to this file (rewritten after every shape)")
    args = parser.parse_args()
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else (
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads")
    print(f"FastDeconv training step, {device_name}, torch {torch.__version__}")
    print("peak extra memory (MB): of the whole step, and of the whitening alone (statistics, inverse square root "
          "and their backward, without the convolution)")
    print(f"{'shape':>16} {'aecr_ops ms':>12} {'original ms':>12} {'speed-up':>9} {'step MB ours/orig':>18} "
          f"{'whitening MB ours/orig':>23}", flush=True)
    rows = []

    def save(complete):
        if args.json:
            write_json_atomic(args.json, {"benchmark": "fastdeconv_training_step", "device": device_name,
                                          "torch": torch.__version__, "cuda": torch.version.cuda,
                                          "date": time.strftime("%Y-%m-%d"), "tiny": args.tiny,
                                          "complete": complete, "results": rows})

    save(False)
    failed = False
    for name in args.shapes:
        shape = problem(name, args.tiny)
        row = {"shape": name, "input": list(shape[0]), "input_grad": shape[3], "tiny": args.tiny}
        try:
            times = time_steps(name, args.device, args.warmup, args.repeat, args.tiny)
            row.update(step_s=times, speedup=times["original"] / times["aecr_ops"])
            peaks = peak_memory(name, args.device, args.tiny)
            memory, whitening = peaks["step"], peaks["whitening"]
            row.update(peak_extra_bytes_step=memory, peak_extra_bytes_whitening=whitening)
            mb = lambda m: f"{m['aecr_ops'] / 2**20:.1f} / {m['original'] / 2**20:.1f}"  # noqa: E731
            print(f"{name:>16} {1e3 * times['aecr_ops']:>12.1f} {1e3 * times['original']:>12.1f} "
                  f"{row['speedup']:>9.2f} {mb(memory):>18} {mb(whitening):>23}", flush=True)
        except Exception as error:  # noqa: BLE001 - one shape failing must not lose the others
            failed = True
            row["error"] = f"{type(error).__name__}: {error}"[:600]
            print(f"{name:>16} failed: {row['error'][:200]}", flush=True)
            release_cuda_memory(args.device)
        rows.append(row)
        save(False)
    save(True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
