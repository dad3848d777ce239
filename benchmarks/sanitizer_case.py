"""Small cases that run every CUDA kernel of aecr_ops at least once, for compute-sanitizer.

benchmarks/gpu_check.py runs this under memcheck, racecheck, synccheck and initcheck. Without a sanitizer it
takes seconds. Three groups, each case a forward and a backward (every gradient):

- simple: deform_conv2d on the default CUDA path (im2col / cuBLAS / col2im): float32, float64 and bfloat16,
  each with the atomic and the deterministic backward (torch.use_deterministic_algorithms(True): the
  sort-and-gather kernels), with and without a mask; float16 once; bfloat16 autocast once. Weight groups and
  offset groups, channel and pixel counts that leave partial tiles, batch 1 and 2, stride and dilation, and
  offsets that are NaN, infinite, huge or far outside the image.
- implicit: the same layer on AECR_DCN_CUDA_PATH=implicit: float32 with TF32 matmuls allowed and bfloat16, each
  with both backwards and with and without a mask; float16 once.
- fastdeconv: patch_statistics in the two-launch form (F <= 64: 3x3 with one block of 3, interleaved blocks, a
  1x1 kernel, groups) and the tiled form (F > 64: 3x3 with block 8, F = 72), with their backward (unfold and 1x1
  modes); isqrt_newton_schulz fused (F <= 48) and as batched GEMMs (F > 48) with its backward;
  the FastDeconv layer's training step (the running-update kernel, a finite and a non-finite batch) and eval
  step; float32 and float64.

    python benchmarks/sanitizer_case.py                          # every group, on CUDA
    python benchmarks/sanitizer_case.py --groups simple fastdeconv
    python benchmarks/sanitizer_case.py --device cpu             # dry run: the cases that apply on the CPU
    python benchmarks/sanitizer_case.py --list

Each case prints one line (with the DCN path it ran); the last line is `SANITIZER_CASE_SUMMARY {json}`. Exit
code 1 if any case raised.
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time
import traceback
import warnings

# cuBLAS is deterministic only with a fixed workspace, which must be set before it starts.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402

import aecr_ops  # noqa: E402
from bench_dcn import dcn_path_that_runs  # noqa: E402

GROUPS = ("simple", "implicit", "fastdeconv")
LOW_PRECISION = (torch.float16, torch.bfloat16)

# (batch, in channels, out channels, (H, W), weight groups, offset groups, stride, padding, dilation)
# A: 70 output channels (one full 64-tile and a partial one), 63 pixels per image, both kinds of groups.
# B: one image, no groups, stride 2 and dilation 2, H != W.
DCN_LAYERS = {
    "A": (2, 40, 70, (9, 7), 2, 2, 1, 1, 1),
    "B": (1, 24, 16, (11, 13), 1, 1, 2, 2, 2),
}


@contextlib.contextmanager
def dcn_mode(path, deterministic, allow_tf32):
    previous = (os.environ.get("AECR_DCN_CUDA_PATH"), torch.backends.cuda.matmul.allow_tf32)
    os.environ["AECR_DCN_CUDA_PATH"] = path
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.use_deterministic_algorithms(deterministic)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)
        if previous[0] is None:
            os.environ.pop("AECR_DCN_CUDA_PATH", None)
        else:
            os.environ["AECR_DCN_CUDA_PATH"] = previous[0]
        torch.backends.cuda.matmul.allow_tf32 = previous[1]


def autocast_to(dtype):
    return torch.autocast("cuda", dtype=dtype)


def dcn_tensors(layer, use_mask, seed=0):
    batch, cin, cout, (h, w), groups, offset_groups, stride, padding, dilation = DCN_LAYERS[layer]
    ho = (h + 2 * padding - (2 * dilation + 1)) // stride + 1
    wo = (w + 2 * padding - (2 * dilation + 1)) // stride + 1
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cin, h, w, generator=g)
    weight = torch.randn(cout, cin // groups, 3, 3, generator=g) / math.sqrt(9 * cin / groups)
    offset = 3.0 * torch.randn(batch, 2 * offset_groups * 9, ho, wo, generator=g)
    offset[0, 0, 0, 0] = float("nan")
    offset[-1, 1, min(2, ho - 1), min(3, wo - 1)] = float("inf")
    offset[0, 3, ho // 2, wo // 2] = -1e30
    offset[0, 4, 0, wo - 1] = 1e4   # far outside the image, still finite in every dtype
    offset[-1, 6, ho - 1, 0] = -float("inf")
    mask = torch.rand(batch, offset_groups * 9, ho, wo, generator=g) if use_mask else None
    bias = torch.randn(cout, generator=g)
    return (x, offset, weight, bias, mask), dict(stride=stride, padding=padding, dilation=dilation)


def dcn_case(device, layer, dtype, path, deterministic, use_mask, autocast=False):
    """One forward and backward of deform_conv2d; returns the path it ran."""
    tensors, kwargs = dcn_tensors(layer, use_mask)
    run_dtype = torch.float32 if autocast else dtype
    x, offset, weight, bias, mask = [t.to(device=device, dtype=run_dtype).requires_grad_(True) if t is not None
                                     else None for t in tensors]
    with dcn_mode(path, deterministic, allow_tf32=dtype == torch.float32 and path == "implicit"):
        probe = [t.detach().to(dtype) if t is not None else None for t in (x, offset, weight, mask)]
        ran = dcn_path_that_runs(probe[0], probe[1], probe[2], mask=probe[3], **kwargs)
        with autocast_to(dtype) if autocast else contextlib.nullcontext():
            out = aecr_ops.deform_conv2d(x, offset, weight, bias, mask=mask, **kwargs)
        out.float().square().sum().backward()
    finite = bool(torch.isfinite(out).all()) and all(
        bool(torch.isfinite(t.grad).all()) for t in (x, offset, weight, bias, mask) if t is not None)
    return ran, finite


def statistics_case(device, dtype, kernel, channels, block, groups):
    """patch_statistics and isqrt_newton_schulz of its covariance, forward and backward."""
    g = torch.Generator().manual_seed(channels * 10 + kernel)
    x = torch.rand(2, channels, 11, 13, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    x.requires_grad_(True)
    mean, cov = aecr_ops.patch_statistics(x, kernel, 1, kernel // 2, 3, block, groups, 1e-5)
    deconv = aecr_ops.isqrt_newton_schulz(cov, 5)
    (mean.sum() + deconv.square().sum()).backward()
    features = cov.shape[-1]
    return f"F={features}", bool(torch.isfinite(x.grad).all())


def isqrt_case(device, dtype, features, batch):
    """isqrt_newton_schulz on a batch of well-conditioned SPD matrices, forward and backward."""
    g = torch.Generator().manual_seed(features)
    a = torch.randn(batch, features, features + 8, generator=g, dtype=torch.float64)
    a = (a @ a.transpose(1, 2) / (features + 8)).to(device=device, dtype=dtype).requires_grad_(True)
    d = aecr_ops.isqrt_newton_schulz(a, 5)
    d.square().sum().backward()
    return f"F={features}", bool(torch.isfinite(a.grad).all())


def layer_case(device, dtype, in_channels, block, autocast=False):
    """FastDeconv: two training steps (running update), a non-finite batch, an eval step."""
    torch.manual_seed(0)
    layer = aecr_ops.FastDeconv(in_channels, in_channels, 3, padding=1, block=block).to(device=device, dtype=dtype)
    x = torch.rand(2, in_channels, 16, 16, device=device, dtype=dtype)
    for _ in range(2):
        with autocast_to(torch.bfloat16) if autocast else contextlib.nullcontext():
            layer(x).float().square().mean().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        bad = x.clone()
        bad[0, 0, 3, 3] = float("nan")
        layer(bad).sum().backward()   # the running update keeps both buffers (a non-finite batch)
        layer(x).sum().backward()     # reports that batch late on CUDA
    finite = bool(torch.isfinite(layer.running_mean).all() and torch.isfinite(layer.running_deconv).all())
    layer.eval()
    with torch.no_grad():
        layer(x)
    return f"F={layer.num_features}", finite


def cases():
    """[(group, name, needs (dtype that only CUDA runs, or autocast on CUDA), fn(device) -> (note, finite))]."""
    out = []
    f32, f64, bf16, f16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
    names = {f32: "fp32", f64: "fp64", bf16: "bf16", f16: "fp16"}
    # Simple path first: it has never run on a GPU.
    for dtype in (f32, f64, bf16):
        for deterministic in (False, True):
            for use_mask in (True, False):
                name = f"dcn simple A {names[dtype]} {'deterministic' if deterministic else 'atomic'}" \
                       f"{'' if use_mask else ' no-mask'}"
                out.append(("simple", name, dtype in LOW_PRECISION,
                            lambda d, a=(dtype, deterministic, use_mask): dcn_case(d, "A", a[0], "simple", a[1], a[2])))
        out.append(("simple", f"dcn simple B {names[dtype]} atomic", dtype in LOW_PRECISION,
                    lambda d, t=dtype: dcn_case(d, "B", t, "simple", False, True)))
    out.append(("simple", "dcn simple B fp32 deterministic", False,
                lambda d: dcn_case(d, "B", f32, "simple", True, True)))
    out.append(("simple", "dcn simple A fp16 atomic", True, lambda d: dcn_case(d, "A", f16, "simple", False, True)))
    out.append(("simple", "dcn simple A bf16 autocast", True,
                lambda d: dcn_case(d, "A", bf16, "simple", False, True, autocast=True)))
    # FastDeconv next: its tiled kernels and the backward have never run either.
    for dtype in (f32, f64):
        for kernel, channels, block, groups, what in ((3, 3, 3, 1, "two-launch"), (3, 12, 4, 1, "interleaved"),
                                                      (1, 8, 4, 1, "1x1"), (3, 8, 4, 2, "groups"),
                                                      (3, 16, 8, 1, "tiled")):
            out.append(("fastdeconv", f"patch_statistics {what} {names[dtype]}", False,
                        lambda d, a=(dtype, kernel, channels, block, groups): statistics_case(d, *a)))
        for features, batch in ((27, 2), (48, 1), (60, 2)):
            out.append(("fastdeconv", f"isqrt {'fused' if features <= 48 else 'gemm'} F={features} "
                                      f"{names[dtype]}", False,
                        lambda d, a=(dtype, features, batch): isqrt_case(d, *a)))
        out.append(("fastdeconv", f"FastDeconv layer 3->3 {names[dtype]}", False,
                    lambda d, t=dtype: layer_case(d, t, 3, 64)))
    out.append(("fastdeconv", "FastDeconv layer 8->8 block 8 (F=72) fp32", False,
                lambda d: layer_case(d, f32, 8, 8)))
    out.append(("fastdeconv", "FastDeconv layer 3->3 bf16 autocast", True,
                lambda d: layer_case(d, f32, 3, 64, autocast=True)))
    # Implicit path.
    for dtype in (f32, bf16):
        for deterministic in (False, True):
            for use_mask in (True, False):
                name = f"dcn implicit A {names[dtype]}{'+tf32' if dtype == f32 else ''} " \
                       f"{'deterministic' if deterministic else 'atomic'}{'' if use_mask else ' no-mask'}"
                out.append(("implicit", name, dtype in LOW_PRECISION,
                            lambda d, a=(dtype, deterministic, use_mask): dcn_case(d, "A", a[0], "implicit", a[1],
                                                                                   a[2])))
    out.append(("implicit", "dcn implicit B bf16 atomic", True,
                lambda d: dcn_case(d, "B", bf16, "implicit", False, True)))
    out.append(("implicit", "dcn implicit A fp16 atomic", True,
                lambda d: dcn_case(d, "A", f16, "implicit", False, True)))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", nargs="*", default=list(GROUPS), choices=GROUPS)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: a dry run of the cases that apply there (no bfloat16/float16, no CUDA autocast)")
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    args = parser.parse_args()
    selected = [c for c in cases() if c[0] in args.groups]
    if args.list:
        for group, name, cuda_only, _ in selected:
            print(f"{group:>10}  {name}{'  (CUDA only)' if cuda_only else ''}")
        print("SANITIZER_CASE_SUMMARY " + json.dumps({"listed": len(selected), "cases": len(selected),
                                                      "groups": args.groups, "ran": 0}), flush=True)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("sanitizer_case: no CUDA device (use --device cpu for a dry run)", flush=True)
        return 2
    summary = {"device": args.device, "groups": args.groups, "cases": len(selected), "ran": 0, "skipped": 0,
               "failed": [], "non_finite": [], "paths": {}, "last": None}
    start = time.time()
    for index, (group, name, cuda_only, fn) in enumerate(selected, 1):
        if cuda_only and args.device != "cuda":
            summary["skipped"] += 1
            print(f"[{index}/{len(selected)}] {name}: skipped on the CPU", flush=True)
            continue
        summary["last"] = name
        try:
            note, finite = fn(args.device)
            if args.device == "cuda":
                torch.cuda.synchronize()
        except Exception:  # noqa: BLE001 - report and go on: the sanitizer's log names the kernel
            summary["failed"].append(name)
            print(f"[{index}/{len(selected)}] {name}: RAISED", flush=True)
            traceback.print_exc(limit=4, file=sys.stdout)
            continue
        summary["ran"] += 1
        if note in ("cpu", "simple", "implicit"):
            summary["paths"][f"{group}->{note}"] = summary["paths"].get(f"{group}->{note}", 0) + 1
            if group == "implicit" and note != "implicit" and args.device == "cuda":
                print(f"  note: the implicit path does not apply here, this case ran the {note} path", flush=True)
        if not finite:
            summary["non_finite"].append(name)
        print(f"[{index}/{len(selected)}] {name}: {note}{'' if finite else ', NON-FINITE result'}", flush=True)
    summary["seconds"] = round(time.time() - start, 2)
    print("SANITIZER_CASE_SUMMARY " + json.dumps(summary), flush=True)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
