"""ONNX Runtime (CPU) inference of an exported AECR-Net against PyTorch eager on the CPU, in the same run.

    python benchmarks/bench_onnx.py                      # 512x512 and 1080x1920, median of 3
"""
import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import torch

from aecr_model import AECRNet
from aecr_model.onnx_export import OnnxDehazer, export_onnx


def median_seconds(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="*", default=["512x512", "1080x1920"], help="HxW")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = AECRNet().eval()
    with torch.no_grad():
        model.dcn_block.dcn.conv_offset_mask.weight.normal_(0, 1e-3)
    with tempfile.TemporaryDirectory() as folder:
        dehazer = OnnxDehazer(export_onnx(model, os.path.join(folder, "aecr.onnx")), threads=torch.get_num_threads())
        rows = []
        print(f"AECR-Net inference, {platform.machine()} CPU, {torch.get_num_threads()} threads, torch "
              f"{torch.__version__}")
        for text in args.sizes:
            h, w = (int(v) for v in text.split("x"))
            image = torch.rand(1, 3, h, w)
            times = {}
            for name, fn in (("pytorch_eager", lambda: model(image)), ("onnxruntime", lambda: dehazer(image))):
                with torch.no_grad():
                    times[name] = median_seconds(fn, args.repeat)
            rows.append({"size": [h, w], "seconds": times, "onnxruntime_over_pytorch":
                         times["onnxruntime"] / times["pytorch_eager"]})
            print(f"{text:>10}: PyTorch eager {times['pytorch_eager']:.3f} s, ONNX Runtime {times['onnxruntime']:.3f} s "
                  f"(ratio {rows[-1]['onnxruntime_over_pytorch']:.2f})")
    if args.json:
        import onnxruntime
        with open(args.json, "w") as f:
            json.dump({"benchmark": "onnx_inference", "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                       "date": time.strftime("%Y-%m-%d"), "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
