"""Peak resident memory (RSS high-water mark) on the CPU of AECR-Net's DCN layer and of AECR-Net inference, whole
and tiled, beside the least memory each could take.

    python benchmarks/bench_memory.py                          # 1080p and 4K, every case (4K untiled: minutes)
    python benchmarks/bench_memory.py --sizes 1080p --cases model_untiled model_tiled --threads 2
    python benchmarks/bench_memory.py --sizes small --threads 2  # a quick check (256x256)
    python benchmarks/bench_memory.py --sizes 96x128 --tile 64 --tile-overlap 16

Each case runs in a fresh process of its own (`--worker`), so that peaks do not mix: its RSS high-water mark
(getrusage ru_maxrss) right after the imports ("baseline") and at the end ("peak"); the increment, peak - baseline,
is what the case itself took: its inputs, weights, outputs and working memory. Where Linux allows it
(/proc/self/clear_refs), the high-water mark is reset after the imports, so that the peak importing torch reaches on
its way cannot hide a small case; the parent process does not import torch, since a child's ru_maxrss starts from
its parent's RSS. Cases:

- dcn_aecr_ops, dcn_torchvision: one forward (torch.no_grad) of a 3x3 modulated deformable convolution, padding 1,
  at AECR-Net's DCN width: AECR-Net's DCN runs at quarter resolution with 256 channels, so an image of H x W gives
  an input of 1 x 256 x H/4 x W/4 (1080p: 1 x 256 x 270 x 480; 4K: 1 x 256 x 540 x 960), an offset of 18 and a mask
  of 9 channels. aecr_ops.deform_conv2d and torchvision.ops.deform_conv2d (skipped where torchvision is absent).
  Least memory: input + offset + mask + weight + bias + output.
- model_untiled, model_tiled: AECR-Net inference (aecr_model.network.AECRNet(), the official configuration,
  random weights with small non-zero DCN offsets, eval, no_grad) of a 1 x 3 x H x W image, whole
  (inference.dehaze_tensor) and tiled (tiled.dehaze_tiled, --tile and --tile-overlap, default 512 and 32).
  Least memory: input + output + weights.

Sizes: 1080p (1080x1920), 4k (2160x3840), small (256x256), or HxW. Everything is float32. With --json the file is
rewritten after every case, so an interrupted run keeps what it measured; a case that fails (killed for memory,
past --timeout, an exception) is recorded with its error and the others go on (exit code 1).
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

from bench_common import write_json_atomic
from bench_machine import cpu_model

SIZES = {"small": (256, 256), "1080p": (1080, 1920), "4k": (2160, 3840)}
CASES = ["dcn_aecr_ops", "dcn_torchvision", "model_untiled", "model_tiled"]
DCN_CHANNELS = 256      # AECR-Net's DCN width (4 * ngf, ngf = 64)
FLOAT32 = 4
MB = 1024 * 1024


def parse_size(text):
    if text.lower() in SIZES:
        return SIZES[text.lower()]
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be one of {', '.join(SIZES)} or HxW, got {text!r}") from None
    if height < 4 or width < 4:
        raise argparse.ArgumentTypeError(f"size must be at least 4x4, got {text!r}")
    return height, width


def max_rss_bytes():
    """This process's RSS high-water mark (Linux reports ru_maxrss in KiB, macOS in bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss():
    """Sets the high-water mark to the current RSS (Linux >= 4.0: /proc/self/clear_refs, 5), so that the peak
    that importing torch reaches on its way does not hide a smaller case; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def proc_status_bytes(field):
    """VmRSS / VmHWM from /proc/self/status (Linux), in bytes; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ----------------------------------------------------------------------------------------------------------------
# One case, in its own process


def dcn_problem(height, width):
    """The DCN layer's tensors for an image of height x width: quarter resolution, 256 channels."""
    import torch
    h, w = height // 4, width // 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, DCN_CHANNELS, h, w, generator=g)
    offset = 2.0 * torch.randn(1, 18, h, w, generator=g)
    mask = torch.rand(1, 9, h, w, generator=g)
    weight = torch.randn(DCN_CHANNELS, DCN_CHANNELS, 3, 3, generator=g) / (DCN_CHANNELS * 9) ** 0.5
    bias = torch.randn(DCN_CHANNELS, generator=g)
    return x, offset, mask, weight, bias


def run_case(case, height, width, tile, overlap):
    """Runs one case; returns its record (without the machine)."""
    import torch
    record = {"case": case, "size": f"{height}x{width}", "threads": torch.get_num_threads()}
    if case not in CASES:
        raise ValueError(f"unknown case {case!r}")
    if case == "dcn_torchvision":
        try:
            import torchvision
        except Exception as error:  # noqa: BLE001 - absent, or present and broken
            return {**record, "skipped": f"torchvision is not available ({type(error).__name__}: {error})"}
        record["torchvision"] = torchvision.__version__
        fn = torchvision.ops.deform_conv2d
    import aecr_ops
    from aecr_model import AECRNet
    from aecr_model.inference import dehaze_tensor
    from aecr_model.tiled import dehaze_tiled
    record["torch"] = torch.__version__
    record["peak_rss_reset"] = reset_peak_rss()
    record["baseline_rss_bytes"] = max_rss_bytes()     # after the imports, before any tensor is made
    record["baseline_vmrss_bytes"] = proc_status_bytes("VmRSS")

    if case.startswith("dcn_"):
        if case == "dcn_aecr_ops":
            fn = aecr_ops.deform_conv2d
        x, offset, mask, weight, bias = dcn_problem(height, width)
        record["shapes"] = {"input": list(x.shape), "offset": list(offset.shape), "mask": list(mask.shape),
                            "weight": list(weight.shape)}
        output_bytes = x.numel() * FLOAT32     # 256 channels in and out, the same size (3x3, padding 1)
        inputs_bytes = sum(t.numel() * t.element_size() for t in (x, offset, mask, weight, bias))
        record["least_bytes"] = inputs_bytes + output_bytes
        start = time.perf_counter()
        with torch.no_grad():
            out = fn(x, offset, weight, bias, padding=1, mask=mask)
        record["seconds"] = time.perf_counter() - start
        assert out.shape == x.shape, out.shape
    else:
        torch.manual_seed(0)
        model = AECRNet().eval()
        with torch.no_grad():   # non-zero offsets, as after training (as in bench_model.py)
            model.dcn_block.dcn.conv_offset_mask.weight.normal_(0, 1e-3)
        hazy = torch.rand(1, 3, height, width)
        weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        record["weights_bytes"] = weights
        record["least_bytes"] = 2 * hazy.numel() * FLOAT32 + weights
        start = time.perf_counter()
        if case == "model_tiled":
            record["tile"], record["tile_overlap"] = tile, overlap
            out = dehaze_tiled(model, hazy, tile, overlap)
        else:
            out = dehaze_tensor(model, hazy)
        record["seconds"] = time.perf_counter() - start
        assert out.shape == hazy.shape, out.shape
    record["peak_rss_bytes"] = max_rss_bytes()
    record["peak_vmhwm_bytes"] = proc_status_bytes("VmHWM")
    record["increment_bytes"] = record["peak_rss_bytes"] - record["baseline_rss_bytes"]
    return record


def worker(args):
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    height, width = args.size
    try:
        record = run_case(args.worker, height, width, args.tile, args.tile_overlap)
    except Exception as error:  # noqa: BLE001 - reported to the parent as this case's error
        record = {"case": args.worker, "size": f"{height}x{width}", "error": f"{type(error).__name__}: {error}"[:600]}
    print("RESULT " + json.dumps(record), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# The parent: one process per case, the table, the JSON


def machine_info(threads):
    """The machine; torch's version and threads come from the first case (the parent does not import torch: a
    child's ru_maxrss starts from its parent's RSS at the fork)."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "platform": platform.platform(), "date": time.strftime("%Y-%m-%d")}


def run_in_subprocess(case, size, args):
    command = [sys.executable, os.path.abspath(__file__), "--worker", case, "--sizes", f"{size[0]}x{size[1]}",
               "--tile", str(args.tile), "--tile-overlap", str(args.tile_overlap)]
    env = dict(os.environ)
    if args.threads:
        command += ["--threads", str(args.threads)]
        env["OMP_NUM_THREADS"] = str(args.threads)
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"case": case, "size": f"{size[0]}x{size[1]}", "error": f"past --timeout {args.timeout} s"}
    wall = time.perf_counter() - start
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            return {**json.loads(line[len("RESULT "):]), "process_seconds": wall}
    tail = (done.stderr or done.stdout).strip()[-500:]
    reason = "killed (out of memory?)" if done.returncode in (-9, 137) else f"exit code {done.returncode}"
    return {"case": case, "size": f"{size[0]}x{size[1]}", "error": f"{reason}: {tail}", "process_seconds": wall}


def describe_case(record):
    case = record["case"]
    if case == "model_tiled" and "tile" in record:
        return f"{case} ({record['tile']}/{record['tile_overlap']})"
    return case


def table_row(record):
    name = describe_case(record)
    if "error" in record or "skipped" in record:
        note = record.get("error") or f"skipped: {record['skipped']}"
        return f"| {name} | {record['size']} | {note[:160]} | | | | | |"
    least = record["least_bytes"]
    return (f"| {name} | {record['size']} | {record['seconds']:.2f} | {record['baseline_rss_bytes'] / MB:.0f} | "
            f"{record['peak_rss_bytes'] / MB:.0f} | {record['increment_bytes'] / MB:.0f} | {least / MB:.1f} | "
            f"{record['increment_bytes'] / least:.2f} |")


HEADER = ("| case | size | time (s) | baseline RSS (MiB) | peak RSS (MiB) | increment (MiB) | least (MiB) | "
          "increment / least |\n|---|---|---|---|---|---|---|---|")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[SIZES["1080p"], SIZES["4k"]],
                        help="1080p, 4k, small (256x256) or HxW (default: 1080p 4k)")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=CASES)
    parser.add_argument("--tile", type=int, default=512, help="tile of model_tiled, in pixels (default 512)")
    parser.add_argument("--tile-overlap", type=int, default=32, help="overlap of model_tiled (default 32)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (and OMP_NUM_THREADS) per case")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per case before it is stopped")
    parser.add_argument("--json", help="write the results here (rewritten after every case)")
    parser.add_argument("--worker", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.size = args.sizes[0]
        return worker(args)

    if "model_tiled" in args.cases and not 0 <= 2 * args.tile_overlap < args.tile:
        parser.error(f"--tile ({args.tile}) must be larger than 2 * --tile-overlap ({args.tile_overlap})")
    machine = machine_info(args.threads)
    document = {"benchmark": "peak RSS, CPU", "machine": machine, "complete": False, "results": []}

    def save():
        if args.json:
            write_json_atomic(args.json, document)

    print(f"CPU: {machine['cpu']} ({machine['cores']} cores)", flush=True)
    print(HEADER, flush=True)
    save()
    for size in args.sizes:
        for case in args.cases:
            record = run_in_subprocess(case, size, args)
            document["results"].append(record)
            if "torch" in record and "torch" not in machine:
                machine.update(torch=record["torch"], threads=record.get("threads"))
            if record.get("torchvision"):
                machine["torchvision"] = record["torchvision"]
            save()
            print(table_row(record), flush=True)
    document["complete"] = True
    save()
    print(f"torch {machine.get('torch')}, torchvision {machine.get('torchvision')}, threads {machine.get('threads')}; "
          "baseline: RSS (high-water mark, reset) after the imports; increment: peak - baseline; least: the bytes "
          "of the inputs, outputs and weights", flush=True)
    failed = [(r["case"], r["size"]) for r in document["results"] if "error" in r]
    if failed:
        print(f"failed: {failed}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
