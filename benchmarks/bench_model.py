"""Benchmark of AECR-Net: a training step and inference, against the same network built from the operators
users had before (torchvision.ops.deform_conv2d for the DCN layer, the original FastDeconv).

Both networks start from the same weights; their steps alternate; times are medians.

    python benchmarks/bench_model.py                      # CPU: a 1x3x256x256 training step (L1, Adam) and
                                                          # 1920x1080 inference
    python benchmarks/bench_model.py --device cuda        # GPU: batch 16 of 240x240 crops (L1 + CR), fp32,
                                                          # fp32 with TF32, bf16 autocast; 1920x1080 inference
    python benchmarks/bench_model.py --batch 16 --crop 240 --cr --precisions fp32 bf16 --repeat 1
                                                          # the GPU configuration on the CPU

On CUDA ours runs once per DCN path (AECR_DCN_CUDA_PATH=simple and implicit: aecr_ops_simple,
aecr_ops_implicit), alternating with the baseline in the same loop. Each row says which path the DCN layer really
ran ("paths"); where the implicit path does not apply (fp32 without TF32, or compute capability below 8.0) it is
not timed again under its name but listed in "not_applicable".

With --json the file is rewritten after every row, so an interrupted run keeps its finished rows; an
implementation that fails is recorded in the row's "errors" and the others go on (exit code 1).
"""
import argparse
import contextlib
import copy
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import aecr_ops
from aecr_model import AECRNet
from aecr_ops import reference
from aecr_ops.deform_conv import output_size
from bench_common import sync, write_json_atomic
from bench_dcn import dcn_path_that_runs


class TorchvisionDCN(aecr_ops.DCN):
    """aecr_ops.DCN with its convolution done by torchvision.ops.deform_conv2d."""

    def forward(self, input):
        import torchvision
        out = self.conv_offset_mask(input)
        o1, o2, mask = torch.chunk(out, 3, dim=1)
        offset = torch.cat((o1, o2), dim=1)
        mask = torch.sigmoid(mask)
        if input.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # torchvision has no fp16/bf16 CPU kernel (nor autocast on the CPU): the baseline runs this layer in fp32.
            with torch.autocast("cpu", enabled=False):
                return torchvision.ops.deform_conv2d(input.float(), offset.float(), self.weight.float(),
                                                     self.bias.float(), self.stride, self.padding, self.dilation,
                                                     mask.float())
        return torchvision.ops.deform_conv2d(input, offset, self.weight, self.bias, self.stride, self.padding,
                                             self.dilation, mask)


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


def alternate(fns, device, warmup, repeat, errors=None):
    """Median seconds of each fn, calls interleaved. A fn that raises is dropped (its error in errors[name])."""
    errors = {} if errors is None else errors
    live = dict(fns)

    def call(name, fn):
        try:
            fn()
            sync(device)
            return True
        except Exception as error:  # noqa: BLE001 - one implementation failing must not stop the others
            errors[name] = f"{type(error).__name__}: {error}"[:600]
            live.pop(name, None)
            return False

    for _ in range(warmup):
        for name, fn in list(live.items()):
            call(name, fn)
    times = {k: [] for k in fns}
    for _ in range(max(1, repeat)):
        for name, fn in list(live.items()):
            start = time.perf_counter()
            if call(name, fn):
                times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items() if v and k in live}


def dcn_path(model, run_dtype, path):
    """The path the model's first DCN layer would run with AECR_DCN_CUDA_PATH=path on run_dtype inputs now."""
    dcn = next(m for m in model.modules() if isinstance(m, aecr_ops.DCN))
    device = dcn.weight.device
    size = 8
    kh, kw = dcn.kernel_size
    ho = output_size(size, kh, dcn.stride[0], dcn.padding[0], dcn.dilation[0])
    wo = output_size(size, kw, dcn.stride[1], dcn.padding[1], dcn.dilation[1])
    taps = dcn.deformable_groups * kh * kw
    x = torch.zeros(1, dcn.in_channels, size, size, device=device, dtype=run_dtype)
    offset = torch.zeros(1, 2 * taps, ho, wo, device=device, dtype=run_dtype)
    mask = torch.zeros(1, taps, ho, wo, device=device, dtype=run_dtype)
    with dcn_path_env(path):
        return dcn_path_that_runs(x, offset, dcn.weight.detach().to(run_dtype), mask=mask, stride=dcn.stride,
                                  padding=dcn.padding, dilation=dcn.dilation)


def our_runs(model, candidates, run_dtype, allow_tf32):
    """(runs, paths, not_applicable): the variants of ours whose asked-for path really runs, and the others."""
    runs, paths, not_applicable = [], {}, {}
    with tf32(allow_tf32):
        for impl, path in candidates:
            actual = dcn_path(model, run_dtype, path)
            if path is not None and actual != path:
                not_applicable[impl] = f"not applicable: runs the {actual} path"
            else:
                runs.append((impl, path))
                paths[impl] = actual
    return runs, paths, not_applicable


# label -> (autocast dtype, TF32 allowed (None: PyTorch's setting))
PRECISIONS = {"fp32": (None, False), "fp32+tf32": (None, True), "bf16": (torch.bfloat16, None)}


@contextlib.contextmanager
def dcn_path_env(path):
    """AECR_DCN_CUDA_PATH for one call (None: leave it alone)."""
    previous = os.environ.get("AECR_DCN_CUDA_PATH")
    if path is not None:
        os.environ["AECR_DCN_CUDA_PATH"] = path
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("AECR_DCN_CUDA_PATH", None)
        else:
            os.environ["AECR_DCN_CUDA_PATH"] = previous


@contextlib.contextmanager
def tf32(enabled):
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if enabled is not None:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def training_step(model, optimizer, hazy, clear, cr, cr_weight, autocast_dtype, path=None):
    def step():
        with dcn_path_env(path):
            one_step()

    def one_step():
        with torch.autocast(hazy.device.type, dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
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
    parser.add_argument("--batch", type=int, help="training batch (default: 16 on CUDA, 1 on the CPU)")
    parser.add_argument("--crop", type=int, help="training crop size (default: 240 on CUDA, 256 on the CPU)")
    parser.add_argument("--cr", action=argparse.BooleanOptionalAction, default=None,
                        help="add the contrastive regularisation (VGG19, random weights) to L1 (default: on CUDA)")
    parser.add_argument("--precisions", nargs="*", choices=list(PRECISIONS),
                        help="default: fp32, fp32+tf32 and bf16 on CUDA; fp32 on the CPU")
    parser.add_argument("--json")
    args = parser.parse_args()
    device = args.device
    torch.manual_seed(0)
    ours = AECRNet().to(device)
    with torch.no_grad():  # non-zero offsets, as after training
        ours.dcn_block.dcn.conv_offset_mask.weight.normal_(0, 1e-3)
    base = baseline_of(ours)
    name = (torch.cuda.get_device_name() if device == "cuda"
            else f"{platform.machine()} CPU, {torch.get_num_threads()} threads")
    print(f"AECR-Net, {name}, torch {torch.__version__}")
    results = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
               "date": time.strftime("%Y-%m-%d"), "training": [], "inference": []}

    gpu = device == "cuda"
    batch = args.batch or (16 if gpu else 1)
    crop = args.crop or (240 if gpu else 256)
    cr = None
    if args.cr if args.cr is not None else gpu:
        from aecr_model.losses import ContrastiveRegularization
        cr = ContrastiveRegularization("random").to(device)
    labels = args.precisions or (["fp32", "fp32+tf32", "bf16"] if gpu else ["fp32"])
    precisions = [(label, *PRECISIONS[label]) for label in labels]
    candidates = [("aecr_ops_simple", "simple"), ("aecr_ops_implicit", "implicit")] if gpu else [("aecr_ops", None)]
    results["config"] = {"batch": batch, "crop": crop, "cr": cr is not None, "precisions": labels}
    results["complete"] = False
    failed = []

    def save():
        if args.json:
            write_json_atomic(args.json, results)

    def finish(row, times, ours_runs, errors):
        row["speedup"] = {impl: times["baseline"] / times[impl] for impl, _ in ours_runs
                          if impl in times and "baseline" in times}
        if errors:
            row["errors"] = errors
            failed.append((row["what"], row["precision"], sorted(errors)))

    def run_dtype_of(dtype):
        return dtype if dtype is not None and gpu else torch.float32

    save()
    hazy = torch.rand(batch, 3, crop, crop, device=device)
    clear = torch.rand(batch, 3, crop, crop, device=device)
    for label, dtype, allow_tf32 in precisions:
        row = {"what": f"training step, batch {batch} of {crop}x{crop}, L1{' + CR' if cr else ''}, Adam",
               "precision": label}
        errors = {}
        try:
            ours_runs, paths, not_applicable = our_runs(ours, candidates, run_dtype_of(dtype), allow_tf32)
            row.update(paths=paths, not_applicable=not_applicable)
            fns = {}
            for impl, path in ours_runs:
                opt = torch.optim.Adam(ours.parameters(), lr=1e-6)
                fns[impl] = training_step(ours.train(), opt, hazy, clear, cr, 0.1, dtype, path)
            fns["baseline"] = training_step(base.train(), torch.optim.Adam(base.parameters(), lr=1e-6), hazy, clear,
                                            cr, 0.1, dtype)
            with tf32(allow_tf32):
                times = alternate(fns, device, args.warmup, args.repeat, errors)
        except Exception as error:  # noqa: BLE001 - a failing row must not lose the others
            ours_runs, times = [], {}
            errors["row"] = f"{type(error).__name__}: {error}"[:600]
        row["seconds"] = times
        finish(row, times, ours_runs, errors)
        results["training"].append(row)
        save()
        print(f"train {label}: " + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in times.items()) + "; speed-up " +
              ", ".join(f"{k} {v:.2f}x" for k, v in row["speedup"].items()) +
              "".join(f"; {k} {v}" for k, v in row.get("not_applicable", {}).items()) +
              "".join(f"; {k} FAILED {v[:160]}" for k, v in errors.items()), flush=True)

    if not args.skip_inference:
        h, w = (int(v) for v in args.inference_size.split("x"))
        image = torch.rand(1, 3, h, w, device=device)
        for label, dtype, allow_tf32 in precisions:
            row = {"what": f"inference {h}x{w}", "precision": label}
            errors = {}
            try:
                ours_runs, paths, not_applicable = our_runs(ours, candidates, run_dtype_of(dtype), allow_tf32)
                row.update(paths=paths, not_applicable=not_applicable)
                fns = {}
                for impl, model, path in [(impl, ours.eval(), path) for impl, path in ours_runs] + [
                        ("baseline", base.eval(), None)]:
                    def infer(model=model, path=path, dtype=dtype):
                        with dcn_path_env(path), torch.no_grad(), torch.autocast(
                                device, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                            model(image)
                    fns[impl] = infer
                with tf32(allow_tf32):
                    times = alternate(fns, device, 1, args.inference_repeat, errors)
            except Exception as error:  # noqa: BLE001
                ours_runs, times = [], {}
                errors["row"] = f"{type(error).__name__}: {error}"[:600]
            row["seconds"] = times
            row["images_per_s"] = {k: 1 / v for k, v in times.items()}
            finish(row, times, ours_runs, errors)
            results["inference"].append(row)
            save()
            print(f"inference {h}x{w} {label}: " + ", ".join(f"{k} {v:.3f} s" for k, v in times.items()) +
                  "; speed-up " + ", ".join(f"{k} {v:.2f}x" for k, v in row["speedup"].items()) +
                  "".join(f"; {k} FAILED {v[:160]}" for k, v in errors.items()), flush=True)
    results["complete"] = True
    save()
    if failed:
        print(f"failed: {failed}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
