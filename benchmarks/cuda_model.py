"""A traffic and time model of every CUDA kernel, from the CPU emulator's counts (tests/cuda_emulation/traffic.h).

    python benchmarks/cuda_model.py            count, model and write benchmarks/cuda_model.json (~15 min, 2 cores)
    python benchmarks/cuda_model.py --check    exit 1 if cuda_model.json is stale against the sources (seconds)

Each case runs the real driver under the emulator, counting every launch (a sample of consecutive blocks of a
large launch, scaled); the cuBLAS GEMMs the simple path calls are caught at the dispatcher, not computed, and
modelled from their FLOPs and bytes. conv2d (cuDNN) of the same shape is modelled as one dense implicit GEMM on
tensor cores a pass (forward; backward: data and weight gradients).

Time per launch, a roofline: the largest of DRAM bytes / DRAM bandwidth, shared-memory wavefronts / (SMs x 1 a
clock), tensor-core FLOPs / the dtype's tensor peak, FP32 and FP64 FLOPs / their peaks; plus a launch overhead.
Library GEMMs: the larger of FLOPs / (peak x efficiency) and bytes / DRAM bandwidth, plus the overhead. Not
modelled: L2 bandwidth, atomic throughput, latency and occupancy limits, the FP32 arithmetic outside the shared
bilinear math. The figures are a *model*: no GPU has run these kernels.
"""
import argparse
import json
import os
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cuda_resources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JSON_PATH = os.path.join(ROOT, "benchmarks", "cuda_model.json")
sys.path.insert(0, os.path.join(ROOT, "tests"))

# Published peak figures (dense, no sparsity). H100 SXM5 and H200 SXM: NVIDIA's H100 and H200 datasheets and the
# Hopper architecture whitepaper (132 SMs, 50 MB L2, 1.98 GHz boost). Shared memory: 128 bytes (one wavefront) an
# SM a clock. The launch overhead is an assumption (a few microseconds between dependent launches).
DEVICES = {
    "H100 SXM": {"sms": 132, "l2_bytes": 50 << 20, "clock_ghz": 1.98, "dram_tbps": 3.35, "fp64_tflops": 33.5,
                 "fp32_tflops": 66.9, "tf32_tensor_tflops": 494.7, "fp16_tensor_tflops": 989.4,
                 "bf16_tensor_tflops": 989.4, "fp64_tensor_tflops": 66.9, "launch_us": 3.0,
                 "source": "NVIDIA H100 Tensor Core GPU datasheet (SXM5); launch_us assumed"},
    "H200": {"sms": 132, "l2_bytes": 50 << 20, "clock_ghz": 1.98, "dram_tbps": 4.8, "fp64_tflops": 33.5,
             "fp32_tflops": 66.9, "tf32_tensor_tflops": 494.7, "fp16_tensor_tflops": 989.4,
             "bf16_tensor_tflops": 989.4, "fp64_tensor_tflops": 66.9, "launch_us": 3.0,
             "source": "NVIDIA H200 Tensor Core GPU datasheet (SXM); launch_us assumed"},
}

# cuBLAS's efficiency on a large GEMM, from a published measurement on another GPU: 267.9 of A100 SXM's 312 BF16
# TFLOPS (the "maximum achievable matmul FLOPS" table of Stas Bekman's ml-engineering, CUDA 12.1). The H100
# figure of the same table (792.1 TFLOPS, 6144 x 17920 x 2816) validates it.
GEMM_EFFICIENCY = 267.9 / 312.0
PUBLISHED_GEMMS = [
    {"kernel": "cuBLAS BF16 GEMM 6144x17920x2816", "device": "H100 SXM", "m": 6144, "n": 17920, "k": 2816,
     "dtype": "bfloat16", "tflops": 792.1,
     "source": "stas00/ml-engineering, compute/accelerator/README.md, Maximum Achievable Matmul FLOPS table"},
]

CASE_SHAPE = (16, 256, 256, 64, 64)  # AECR-Net's DCN: batch, in, out channels, height, width; 3 x 3, pad 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SAMPLE_BLOCKS = 16
COLUMN_BUDGET = 1 << 28  # elements a chunk of columns: the CUDA op's default (kColumnBudget)
MODEL_SOURCES = ["csrc", os.path.join("tests", "cuda_emulation"), os.path.join("benchmarks", "cuda_model.py")]


def sources_sha256(root=ROOT):
    """The digest of the kernels, the emulator and this script (cuda_resources.py's, over MODEL_SOURCES)."""
    return cuda_resources.sources_sha256(root, MODEL_SOURCES)


def tensor_peak(device, dtype_name, tf32=True):
    d = DEVICES[device]
    if dtype_name == "float32":
        return (d["tf32_tensor_tflops"] if tf32 else d["fp32_tflops"]) * 1e12
    if dtype_name == "float64":
        return d["fp64_tensor_tflops"] * 1e12
    return d[{"float16": "fp16_tensor_tflops", "bfloat16": "bf16_tensor_tflops"}[dtype_name]] * 1e12


def gemm_seconds(device, m, n, k, element_bytes, dtype_name, tf32, accumulate=False):
    """A library GEMM (m x k times k x n): the larger of compute at GEMM_EFFICIENCY and its bytes at DRAM speed."""
    flops = 2.0 * m * n * k
    moved = element_bytes * (m * k + k * n + m * n * (2 if accumulate else 1))
    compute = flops / (tensor_peak(device, dtype_name, tf32) * GEMM_EFFICIENCY)
    memory = moved / (DEVICES[device]["dram_tbps"] * 1e12)
    return max(compute, memory) + DEVICES[device]["launch_us"] * 1e-6, moved


def kernel_seconds(device, t, dtype_name):
    """The roofline time of one counted launch (its counts already scaled to the whole launch)."""
    d = DEVICES[device]
    terms = [t["dram_bytes"][device] / (d["dram_tbps"] * 1e12),
             t["shared_wavefronts"] / (d["sms"] * d["clock_ghz"] * 1e9),
             t["mma_flops"] / tensor_peak(device, dtype_name, tf32=True),
             t["fp32_flops"] / (d["fp32_tflops"] * 1e12),
             t["fp64_flops"] / (d["fp64_tflops"] * 1e12)]
    return max(terms) + d["launch_us"] * 1e-6


class GemmLog(TorchDispatchMode):
    """Records the GEMMs the drivers call (the cuBLAS calls of the real build) and skips computing them: the
    kernels' addresses do not depend on the values (the modelled run's values are not checked)."""

    GEMMS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name not in self.GEMMS:
            return func(*args, **kwargs)
        accumulate = name.startswith("addmm") or name.startswith("baddbmm")
        a, b = (args[1], args[2]) if accumulate else (args[0], args[1])
        batch = a.shape[0] if a.dim() == 3 else 1
        m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
        self.calls.append({"m": batch * m, "n": n, "k": k, "dtype": str(a.dtype).replace("torch.", ""),
                           "element_bytes": a.element_size(), "accumulate": accumulate})
        out = kwargs.get("out")
        if name.endswith("_"):
            return args[0]
        if out is not None:
            return out
        shape = (batch, m, n) if a.dim() == 3 else (m, n)
        return torch.zeros(shape, dtype=a.dtype)


def dcn_problem(dtype):
    b, cin, cout, h, w = CASE_SHAPE
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, cin, h, w, generator=g).to(dtype)
    weight = (torch.randn(cout, cin, 3, 3, generator=g) / 48).to(dtype)
    offset = torch.randn(b, 18, h, w, generator=g) * 2  # float32 geometry, as the CUDA op keeps it (R5)
    mask = torch.rand(b, 9, h, w, generator=g)
    bias = torch.randn(cout, generator=g).to(dtype)
    grad = torch.randn(b, cout, h, w, generator=g).to(dtype)
    return x, weight, offset, mask, bias, grad


def count(emulated, fn):
    emulated.start_counting(SAMPLE_BLOCKS, DEVICES["H100 SXM"]["sms"], [d["l2_bytes"] for d in DEVICES.values()])
    log = GemmLog()
    try:
        with log:
            fn()
    finally:
        emulated.stop_counting()
    return emulated.counted_launches(), log.calls


def scaled(t):
    s = t["blocks"] / t["blocks_counted"]
    out = {k: t[k] * s for k in ("load_sectors", "store_sectors", "atomic_sectors", "atomics", "shared_wavefronts",
                                 "distinct_sectors", "mma_flops", "fp32_flops", "fp64_flops", "load_requests",
                                 "store_requests", "atomic_requests", "shared_requests")}
    out["dram_bytes"] = {name: 32 * t["dram_sectors"][i] * s for i, name in enumerate(DEVICES)}
    out["l2_bytes"] = 32 * (out["load_sectors"] + out["store_sectors"] + out["atomic_sectors"])
    out["compulsory_bytes"] = 32 * out["distinct_sectors"]
    return out


def dcn_case(emulated, path, pass_, dtype_name):
    x, weight, offset, mask, bias, grad = dcn_problem(DTYPES[dtype_name])
    geometry = [[1, 1], [1, 1], [1, 1], 1, 1]
    if pass_ == "forward":
        run = lambda: emulated.dcn_forward(x, weight, offset, mask, bias, *geometry, path, COLUMN_BUDGET)  # noqa: E731
    else:
        run = lambda: emulated.dcn_backward(grad, x, weight, offset, mask, *geometry, path, False, COLUMN_BUDGET,  # noqa
                                            [True] * 5)
    started = time.time()
    launches, gemms = count(emulated, run)
    kernels = []
    totals = {"l2_bytes": 0.0, "dram_bytes": 0.0, "compulsory_bytes": 0.0}
    predicted = {name: 0.0 for name in DEVICES}
    for t in launches:
        s = scaled(t)
        ms = {name: 1e3 * kernel_seconds(name, s, dtype_name) for name in DEVICES}
        kernels.append({"kernel": t["kernel"], "blocks": t["blocks"], "blocks_counted": t["blocks_counted"],
                        "load_sectors_per_request": t["load_sectors"] / max(t["load_requests"], 1),
                        "store_sectors_per_request": t["store_sectors"] / max(t["store_requests"], 1),
                        "shared_wavefronts_per_request": t["shared_wavefronts"] / max(t["shared_requests"], 1),
                        "atomics": s["atomics"], "mma_flops": s["mma_flops"], "fp32_flops": s["fp32_flops"],
                        "l2_bytes": s["l2_bytes"], "dram_bytes": s["dram_bytes"]["H100 SXM"],
                        "compulsory_bytes": s["compulsory_bytes"], "predicted_ms": ms})
        totals["l2_bytes"] += s["l2_bytes"]
        totals["dram_bytes"] += s["dram_bytes"]["H100 SXM"]
        totals["compulsory_bytes"] += s["compulsory_bytes"]
        for name in DEVICES:
            predicted[name] += ms[name]
    for g in gemms:
        tf32 = False  # torch's default for matmul (torch.backends.cuda.matmul.allow_tf32 = False)
        ms = {}
        for name in DEVICES:
            seconds, moved = gemm_seconds(name, g["m"], g["n"], g["k"], g["element_bytes"], g["dtype"], tf32,
                                          g["accumulate"])
            ms[name] = 1e3 * seconds
            predicted[name] += ms[name]
        kernels.append({"kernel": f"cuBLAS GEMM {g['m']}x{g['n']}x{g['k']} {g['dtype']}", "l2_bytes": moved,
                        "dram_bytes": moved, "compulsory_bytes": moved, "predicted_ms": ms})
        for key in totals:
            totals[key] += moved
    b, cin, _, h, w = CASE_SHAPE
    print(f"  deform_conv2d {path} {pass_} {dtype_name}: {len(launches)} launches, {len(gemms)} GEMMs, "
          f"{predicted['H100 SXM']:.3f} ms (H100 SXM), counted in {time.time() - started:.0f} s", flush=True)
    return {"op": "deform_conv2d", "path": path, "pass": pass_, "dtype": dtype_name, "shape": f"{b}x{cin}x{h}x{w}",
            "launches": len(launches) + len(gemms), **totals, "predicted_ms": predicted, "kernels": kernels}


def conv2d_case(pass_, dtype_name):
    """cuDNN's conv2d of the same shape as a dense implicit GEMM on tensor cores (TF32 for float32, PyTorch's
    default for cuDNN): M = B H W, N = out channels, K = in channels x 9; backward: data and weight gradients."""
    b, cin, cout, h, w = CASE_SHAPE
    element = DTYPES[dtype_name].itemsize
    m, n, k = b * h * w, cout, cin * 9
    gemms = [(m, n, k)] if pass_ == "forward" else [(m, cin, cout * 9), (cout, k, m)]
    # Compulsory bytes: each pass reads and writes its tensors once (the implicit GEMM never forms columns).
    image, out_bytes, weight_bytes = b * cin * h * w * element, b * cout * h * w * element, cout * k * element
    moved = image + weight_bytes + out_bytes if pass_ == "forward" else 2 * out_bytes + 2 * image + 2 * weight_bytes
    predicted = {}
    for name in DEVICES:
        d = DEVICES[name]
        total = 0.0
        for gm, gn, gk in gemms:
            compute = 2.0 * gm * gn * gk / (tensor_peak(name, dtype_name, tf32=True) * GEMM_EFFICIENCY)
            total += compute + d["launch_us"] * 1e-6
        total = max(total, moved / (d["dram_tbps"] * 1e12))
        predicted[name] = 1e3 * total
    return {"op": "conv2d", "path": "cudnn", "pass": pass_, "dtype": dtype_name, "shape": f"{b}x{cin}x{h}x{w}",
            "launches": len(gemms), "l2_bytes": moved, "dram_bytes": moved, "compulsory_bytes": moved,
            "predicted_ms": predicted}


def validation(emulated):
    """The emulator's counts on kernels with known answers, and the GEMM model against a published figure."""
    import emulation
    table = emulation.resource_table()
    table.update({n: (32, 1024, 0) for n in ["strided_copy_kernel", "transpose_kernel<32>", "transpose_kernel<33>"]})
    emulated.set_resources(table, True)
    rows = []

    def one(fn, *args):
        emulated.start_counting(0, 132, [1 << 30])
        try:
            fn(*args)
        finally:
            emulated.stop_counting()
        (t,) = emulated.counted_launches()
        return t

    t = one(emulated.strided_copy, torch.arange(4096.0), 1)
    rows.append({"kernel": "coalesced fp32 copy", "quantity": "load sectors per request",
                 "value": t["load_sectors"] / t["load_requests"], "expected": 4})
    t = one(emulated.strided_copy, torch.arange(32 * 1024.0), 32)
    rows.append({"kernel": "stride-32 fp32 copy", "quantity": "load sectors per request",
                 "value": t["load_sectors"] / t["load_requests"], "expected": 32})
    for padded, expected in ((False, 32), (True, 1)):
        t = one(emulated.transpose, torch.randn(64, 64), padded)
        warps = t["shared_requests"] // 2
        rows.append({"kernel": f"{'padded' if padded else 'naive'} shared-memory transpose",
                     "quantity": "wavefronts per column read", "value": t["shared_wavefronts"] / warps - 1,
                     "expected": expected})
    emulated.set_resources(emulation.resource_table(), True)
    for p in PUBLISHED_GEMMS:
        seconds, _ = gemm_seconds(p["device"], p["m"], p["n"], p["k"], 2, p["dtype"], True)
        seconds -= DEVICES[p["device"]]["launch_us"] * 1e-6
        rows.append({"kernel": p["kernel"] + f" ({p['device']})", "quantity": "TFLOPS",
                     "value": 2.0 * p["m"] * p["n"] * p["k"] / seconds / 1e12, "expected": p["tflops"],
                     "source": p["source"]})
    return rows


def build_model():
    import emulation
    import tempfile
    emulated = emulation.build(tempfile.mkdtemp(prefix="aecr_cuda_model_"))
    emulated.set_resources(emulation.resource_table(), True)
    emulated.set_multiprocessors(DEVICES["H100 SXM"]["sms"])
    cases = []
    for path in ("simple", "implicit"):
        for pass_ in ("forward", "backward"):
            for dtype_name in DTYPES:
                cases.append(dcn_case(emulated, path, pass_, dtype_name))
    for pass_ in ("forward", "backward"):
        for dtype_name in DTYPES:
            cases.append(conv2d_case(pass_, dtype_name))
    return {"sources_sha256": sources_sha256(), "sample_blocks": SAMPLE_BLOCKS,
            "gemm_efficiency": GEMM_EFFICIENCY, "devices": DEVICES, "validation": validation(emulated),
            "cases": cases}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if cuda_model.json is stale")
    args = parser.parse_args(argv)
    if args.check:
        with open(JSON_PATH) as f:
            committed = json.load(f)
        fresh = sources_sha256()
        if committed.get("sources_sha256") != fresh:
            print(f"cuda_model --check: benchmarks/cuda_model.json is stale (sources {fresh[:12]}, the file's "
                  f"{str(committed.get('sources_sha256'))[:12]}): run python benchmarks/cuda_model.py")
            return 1
        print(f"cuda_model --check: ok ({len(committed['cases'])} cases)")
        return 0
    started = time.time()
    model = build_model()
    with open(JSON_PATH, "w") as f:
        json.dump(model, f, indent=1)
        f.write("\n")
    print(f"wrote {JSON_PATH}: {len(model['cases'])} cases in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
