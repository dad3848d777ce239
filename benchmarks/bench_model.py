"""Benchmark of AECR-Net: a training step and inference, against the same network built from the operators
users had before (torchvision.ops.deform_conv2d for the DCN layer, the original FastDeconv).

Both networks start from the same weights; their steps alternate; times are medians.

    python benchmarks/bench_model.py                      # CPU: a 1x3x256x256 training step (L1, Adam) and
                                                          # 1920x1080 inference
    python benchmarks/bench_model.py --device cuda        # GPU: batch 16 of 240x240 crops (L1 + CR), fp32
                                                          # and bf16 autocast; 1920x1080 inference
"""
import argparse
import copy
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import aecr_ops
from aecr_model import AECRNet
from aecr_ops import reference


class TorchvisionDCN(aecr_ops.DCN):
    """aecr_ops.DCN with its convolution done by torchvision.ops.deform_conv2d."""

    def forward(self, input):
        import torchvision
        out = self.conv_offset_mask(input)
        o1, o2, mask = torch.chunk(out, 3, dim=1)
        offset = torch.cat((o1, o2), dim=1)
        return torchvision.ops.deform_conv2d(input, offset, self.weight, self.bias, self.stride, self.padding,
                                             self.dilation, torch.sigmoid(mask))


def baseline_of(model: AECRNet) -> AECRNet:
    """The same network and weights on torchvision's deform_conv2d and the original FastDeconv."""
    base = copy.deepcopy(model)
    for module in base.modules():
        if type(module) is aecr_ops.DCN:
            module.__class__ = TorchvisionDCN
    deconv = reference.FastDeconv(3, 3, 3, stride=1, padding=1).to(next(model.parameters()).device)
    deconv.load_state_dict(model.deconv.state_dict())
    base.deconv = deconv
    return base


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def alternate(fns, device, warmup, repeat):
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times = {k: [] for k in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def training_step(model, optimizer, hazy, clear, cr, cr_weight, autocast_dtype):
    def step():
        with torch.autocast(hazy.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            out = model(hazy)
            loss = F.l1_loss(out.float(), clear)
            if cr is not None:
                loss = loss + cr_weight * cr(out.float(), clear, hazy)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--inference-size", default="1080x1920", help="HxW of the inference image")
    parser.add_argument("--inference-repeat", type=int, default=2)
    parser.add_argument("--skip-inference", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    device = args.device
    torch.manual_seed(0)
    ours = AECRNet().to(device)
    with torch.no_grad():  # non-zero offsets, as after training
        ours.dcn_block.dcn.conv_offset_mask.weight.normal_(0, 1e-3)
    base = baseline_of(ours)
    name = torch.cuda.get_device_name() if device == "cuda" else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"AECR-Net, {name}, torch {torch.__version__}")
    results = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d"),
               "training": [], "inference": []}

    if device == "cuda":
        from aecr_model.losses import ContrastiveRegularization
        batch, crop, cr = 16, 240, ContrastiveRegularization("random").to(device)
        precisions = [("fp32", None), ("bf16", torch.bfloat16)]
    else:
        batch, crop, cr = 1, 256, None
        precisions = [("fp32", None)]
    hazy = torch.rand(batch, 3, crop, crop, device=device)
    clear = torch.rand(batch, 3, crop, crop, device=device)
    for label, dtype in precisions:
        fns = {}
        for impl, model in (("aecr_ops", ours), ("baseline", base)):
            opt = torch.optim.Adam(model.parameters(), lr=1e-6)
            fns[impl] = training_step(model.train(), opt, hazy, clear, cr, 0.1, dtype)
        times = alternate(fns, device, args.warmup, args.repeat)
        row = {"what": f"training step, batch {batch} of {crop}x{crop}, L1{' + CR' if cr else ''}, Adam",
               "precision": label, "seconds": times, "speedup": times["baseline"] / times["aecr_ops"]}
        results["training"].append(row)
        print(f"train {label}: aecr_ops {1e3 * times['aecr_ops']:.1f} ms, baseline {1e3 * times['baseline']:.1f} ms, "
              f"speed-up {row['speedup']:.2f}x")

    if not args.skip_inference:
        h, w = (int(v) for v in args.inference_size.split("x"))
        image = torch.rand(1, 3, h, w, device=device)
        for label, dtype in precisions:
            fns = {}
            for impl, model in (("aecr_ops", ours.eval()), ("baseline", base.eval())):
                def infer(model=model):
                    with torch.no_grad(), torch.autocast(device, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                        model(image)
                fns[impl] = infer
            times = alternate(fns, device, 1, args.inference_repeat)
            row = {"what": f"inference {h}x{w}", "precision": label, "seconds": times,
                   "images_per_s": {k: 1 / v for k, v in times.items()}, "speedup": times["baseline"] / times["aecr_ops"]}
            results["inference"].append(row)
            print(f"inference {h}x{w} {label}: aecr_ops {times['aecr_ops']:.3f} s, baseline {times['baseline']:.3f} s, "
                  f"speed-up {row['speedup']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
